"""cogpipe.convert.shapes against the real Diffusers classes: the converter validates with these rules and never
imports diffusers, so every rule is checked here, class by class, on the meta device."""

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.models.embeddings import CogVideoXPatchEmbed  # noqa: E402

from cogpipe.convert import shapes as S  # noqa: E402
from cogpipe.convert.detect import ConversionError, transformer_config, vae_config  # noqa: E402

from fixtures import sat as F  # noqa: E402


def real(cls_name: str, cfg: dict) -> tuple[dict, str]:
    """({key: shape}, config.json text) of the real class built from `cfg` on the meta device."""
    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model.to_json_string()


@pytest.mark.parametrize("cls_name", [S.TRANSFORMER, S.VAE, S.SCHEDULER])
def test_defaults_are_the_constructor_defaults(cls_name):
    params = list(inspect.signature(getattr(diffusers, cls_name).__init__).parameters.values())[1:]
    assert {p.name: p.default for p in params} == S.DEFAULTS[cls_name]


@pytest.mark.parametrize("dims", ["tiny", "full"])
@pytest.mark.parametrize("version", list(F.VERSIONS))  # 1.0 and 1.5, T2V and I2V; 2B sin-cos, 5B-I2V learned
def test_transformer_rules_equal_diffusers(version, dims):
    cfg = transformer_config(F.sat_transformer_shapes(version, **(F.TINY if dims == "tiny" else F.FULL_5B)))
    shapes, config = S.expected_shapes(S.TRANSFORMER, cfg)
    assert (shapes, config) == real(S.TRANSFORMER, cfg)
    assert ("patch_embed.pos_embedding" in shapes) == (version == "5b-i2v")
    assert ("ofs_embedding.linear_1.weight" in shapes) == (version == "1.5-5b-i2v")
    if dims == "full" and version == "5b":
        assert sum(torch.Size(s).numel() for s in shapes.values()) == 5_570_283_072


def test_transformer_rules_follow_the_switches_that_change_shapes():
    """Options no released model uses still get the real class's shapes (or a refusal where it refuses)."""
    for extra in (dict(activation_fn="geglu", norm_elementwise_affine=False, attention_bias=False),
                  dict(activation_fn="swiglu", patch_bias=False, ofs_embed_dim=16, out_channels=8),
                  dict(patch_size_t=2, patch_size=1, use_rotary_positional_embeddings=True,
                       use_learned_positional_embeddings=True, sample_frames=9, max_text_seq_length=7)):
        cfg = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, time_embed_dim=8, text_embed_dim=12,
                   **extra)
        assert S.expected_shapes(S.TRANSFORMER, cfg) == real(S.TRANSFORMER, cfg), extra
    with pytest.raises(ConversionError, match="rotary"):
        S.expected_shapes(S.TRANSFORMER, dict(use_learned_positional_embeddings=True))
    with pytest.raises(ConversionError, match="activation_fn"):
        S.expected_shapes(S.TRANSFORMER, dict(activation_fn="relu"))


def test_config_json_is_what_from_config_writes():
    """Keys the class does not know stay in config.json beside its arguments, as diffusers keeps them; the
    class name and version are the current ones."""
    cfg = {**transformer_config(F.sat_transformer_shapes("2b", **F.TINY)), "_class_name": "CogVideoXTransformer3DModel",
           "_diffusers_version": "0.30.0", "_name_or_path": "somewhere", "unknown_key": [1, 2]}
    assert S.expected_shapes(S.TRANSFORMER, cfg)[1] == real(S.TRANSFORMER, cfg)[1]
    assert S.diffusers_version() == diffusers.__version__


@pytest.mark.parametrize("kind", ["full", "sat-fixture", "quant-convs", "three-levels"])
def test_vae_rules_equal_diffusers(kind):
    cfg = {"full": {}, "sat-fixture": vae_config(F.sat_vae_shapes()),
           "quant-convs": dict(block_out_channels=(8, 16), down_block_types=("CogVideoXDownBlock3D",) * 2,
                               up_block_types=("CogVideoXUpBlock3D",) * 2, layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, in_channels=2, out_channels=5, use_quant_conv=True,
                               use_post_quant_conv=True),
           "three-levels": dict(block_out_channels=(16, 32, 32), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                up_block_types=("CogVideoXUpBlock3D",) * 3, layers_per_block=2, norm_num_groups=4,
                                scaling_factor=1.0)}[kind]
    shapes, config = S.expected_shapes(S.VAE, cfg)
    assert (shapes, config) == real(S.VAE, cfg)
    if kind == "full":
        assert len(shapes) == 436 and sum(torch.Size(s).numel() for s in shapes.values()) == 215_583_907
    with pytest.raises(ConversionError, match="block types"):
        S.expected_shapes(S.VAE, {**cfg, "down_block_types": ["DownBlock2D"] * 4})


@pytest.mark.parametrize("hidden,heads,extra", [(1920, 30, {}), (32, 2, {}),
                                                (64, 4, dict(sample_height=16, sample_width=24, sample_frames=9,
                                                             max_text_seq_length=5, spatial_interpolation_scale=1.0,
                                                             temporal_interpolation_scale=2.0))])
def test_sincos_table_is_diffusers_bit_for_bit(hidden, heads, extra):
    """The frozen table SAT keeps for sin-cos models (2B), as CogVideoXPatchEmbed computes it (float64)."""
    pe = CogVideoXPatchEmbed(in_channels=1, embed_dim=hidden, text_embed_dim=1, use_positional_embeddings=True,
                             use_learned_positional_embeddings=False, **extra).pos_embedding
    mine = S.sincos_pos_embedding(dict(num_attention_heads=heads, attention_head_dim=hidden // heads, **extra))
    assert mine.dtype == pe.dtype and torch.equal(mine, pe)
    with pytest.raises(ConversionError, match="16"):
        S.sincos_pos_embedding(dict(num_attention_heads=3, attention_head_dim=12))


def test_scheduler_config_is_what_save_pretrained_writes(tmp_path):
    from cogpipe.family import scheduler_config

    for shift in (1.0, 3.0):
        kwargs = scheduler_config(shift)
        diffusers.CogVideoXDDIMScheduler(**kwargs).save_pretrained(tmp_path / str(shift))
        assert S.scheduler_json(**kwargs) == (tmp_path / str(shift) / "scheduler_config.json").read_text()
