"""The SAT <-> Diffusers key mapping, written once as data (docs/design.md, "SAT checkpoints"), and the
ComfyUI-native <-> Diffusers one (NATIVE_RULES: ComfyUI core's own CogVideoX port, docs/lora_formats.md).
Both directions of each derive from it.

A rule maps one SAT tensor to one or more Diffusers tensors. The SAT tensor is cut into n equal pieces along
dim 0 (n = 1 + the largest piece index named) and each Diffusers tensor is the concatenation of the listed
pieces: qkv [3H, H] -> to_q = piece 0, to_k = 1, to_v = 2; the adaLN modulation [12H, T] -> norm1.linear =
pieces 0,1,2,6,7,8 and norm2.linear = 3,4,5,9,10,11. Going back, the pieces are put back in order, so a round
trip is a permutation of rows: bit-exact.

Placeholders: {i} {j} layer/block numbers, {p} weight|bias, {rest} any dotted tail, {part} encoder|decoder,
{top} conv_in|conv_out|norm_out, {up} a decoder up-block number, which Diffusers counts from the other end
(diffusers = n_up - 1 - sat). Rules are tried in order; the first match wins, in both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAT_PREFIX = "model.diffusion_model."  # transformer keys inside a SAT checkpoint

# fmt: off
TRANSFORMER_RULES = [
    # SAT (after model.diffusion_model.)                 Diffusers: {name: SAT pieces}           only when
    ("transformer.layers.{i}.input_layernorm.{p}",           "transformer_blocks.{i}.norm1.norm.{p}"),
    ("transformer.layers.{i}.post_attention_layernorm.{p}",  "transformer_blocks.{i}.norm2.norm.{p}"),
    ("transformer.layers.{i}.attention.query_key_value.{p}", {"transformer_blocks.{i}.attn1.to_q.{p}": [0],
                                                              "transformer_blocks.{i}.attn1.to_k.{p}": [1],
                                                              "transformer_blocks.{i}.attn1.to_v.{p}": [2]}),
    ("transformer.layers.{i}.attention.dense.{p}",           "transformer_blocks.{i}.attn1.to_out.0.{p}"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.{p}",         "transformer_blocks.{i}.ff.net.0.proj.{p}"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.{p}",         "transformer_blocks.{i}.ff.net.2.{p}"),
    ("mixins.adaln_layer.query_layernorm_list.{i}.{p}",      "transformer_blocks.{i}.attn1.norm_q.{p}"),
    ("mixins.adaln_layer.key_layernorm_list.{i}.{p}",        "transformer_blocks.{i}.attn1.norm_k.{p}"),
    ("mixins.adaln_layer.adaLN_modulations.{i}.1.{p}",       {"transformer_blocks.{i}.norm1.linear.{p}": [0, 1, 2, 6, 7, 8],
                                                              "transformer_blocks.{i}.norm2.linear.{p}": [3, 4, 5, 9, 10, 11]}),
    ("transformer.final_layernorm.{p}",                      "norm_final.{p}"),
    ("mixins.final_layer.norm_final.{p}",                    "norm_out.norm.{p}"),
    ("mixins.final_layer.adaLN_modulation.1.{p}",            "norm_out.linear.{p}"),
    ("mixins.final_layer.linear.{p}",                        "proj_out.{p}"),
    ("mixins.patch_embed.proj.{p}",                          "patch_embed.proj.{p}"),
    ("mixins.patch_embed.text_proj.{p}",                     "patch_embed.text_proj.{p}"),
    ("time_embed.0.{p}",                                     "time_embedding.linear_1.{p}"),
    ("time_embed.2.{p}",                                     "time_embedding.linear_2.{p}"),
    ("ofs_embed.0.{p}",                                      "ofs_embedding.linear_1.{p}"),
    ("ofs_embed.2.{p}",                                      "ofs_embedding.linear_2.{p}"),
    ("mixins.pos_embed.pos_embedding",                       "patch_embed.pos_embedding",              "use_learned_positional_embeddings"),
]

TRANSFORMER_DROPS = [  # SAT keys with no Diffusers tensor, and why
    ("mixins.pos_embed.pos_embedding",        "frozen 3D sin-cos table; Diffusers recomputes it"),
    ("mixins.pos_embed.freqs_sin",            "RoPE table; Diffusers recomputes it"),
    ("mixins.pos_embed.freqs_cos",            "RoPE table; Diffusers recomputes it"),
    ("transformer.position_embeddings.{p}",   "SAT base-transformer position table, unused by CogVideoX"),
    ("*embed_tokens*",                        "token embedding table, unused by CogVideoX"),
]

# SAT lora2 (LoraMixin): qkv carries 3 partitions, dense 1; the base weights move to `....original.{p}`.
LORA_RULES = [
    ("transformer.layers.{i}.attention.query_key_value.matrix_A.0", "transformer_blocks.{i}.attn1.to_q.lora_A.weight"),
    ("transformer.layers.{i}.attention.query_key_value.matrix_A.1", "transformer_blocks.{i}.attn1.to_k.lora_A.weight"),
    ("transformer.layers.{i}.attention.query_key_value.matrix_A.2", "transformer_blocks.{i}.attn1.to_v.lora_A.weight"),
    ("transformer.layers.{i}.attention.query_key_value.matrix_B.0", "transformer_blocks.{i}.attn1.to_q.lora_B.weight"),
    ("transformer.layers.{i}.attention.query_key_value.matrix_B.1", "transformer_blocks.{i}.attn1.to_k.lora_B.weight"),
    ("transformer.layers.{i}.attention.query_key_value.matrix_B.2", "transformer_blocks.{i}.attn1.to_v.lora_B.weight"),
    ("transformer.layers.{i}.attention.dense.matrix_A.0",           "transformer_blocks.{i}.attn1.to_out.0.lora_A.weight"),
    ("transformer.layers.{i}.attention.dense.matrix_B.0",           "transformer_blocks.{i}.attn1.to_out.0.lora_B.weight"),
]

# ComfyUI core's CogVideoX port (comfy/ldm/cogvideo/model.py) names its transformer's modules itself: one tensor
# each way, no cuts. The "SAT" column of Mapping holds the native name here.
NATIVE_RULES = [
    # native                                 Diffusers
    ("blocks.{i}.norm1.linear.{p}",          "transformer_blocks.{i}.norm1.linear.{p}"),
    ("blocks.{i}.norm1.norm.{p}",            "transformer_blocks.{i}.norm1.norm.{p}"),
    ("blocks.{i}.q.{p}",                     "transformer_blocks.{i}.attn1.to_q.{p}"),
    ("blocks.{i}.k.{p}",                     "transformer_blocks.{i}.attn1.to_k.{p}"),
    ("blocks.{i}.v.{p}",                     "transformer_blocks.{i}.attn1.to_v.{p}"),
    ("blocks.{i}.norm_q.{p}",                "transformer_blocks.{i}.attn1.norm_q.{p}"),
    ("blocks.{i}.norm_k.{p}",                "transformer_blocks.{i}.attn1.norm_k.{p}"),
    ("blocks.{i}.attn_out.{p}",              "transformer_blocks.{i}.attn1.to_out.0.{p}"),
    ("blocks.{i}.norm2.linear.{p}",          "transformer_blocks.{i}.norm2.linear.{p}"),
    ("blocks.{i}.norm2.norm.{p}",            "transformer_blocks.{i}.norm2.norm.{p}"),
    ("blocks.{i}.ff_proj.{p}",               "transformer_blocks.{i}.ff.net.0.proj.{p}"),
    ("blocks.{i}.ff_out.{p}",                "transformer_blocks.{i}.ff.net.2.{p}"),
    ("patch_embed.proj.{p}",                 "patch_embed.proj.{p}"),
    ("patch_embed.text_proj.{p}",            "patch_embed.text_proj.{p}"),
    ("patch_embed.pos_embedding",            "patch_embed.pos_embedding"),
    ("time_embedding_linear_1.{p}",          "time_embedding.linear_1.{p}"),
    ("time_embedding_linear_2.{p}",          "time_embedding.linear_2.{p}"),
    ("ofs_embedding_linear_1.{p}",           "ofs_embedding.linear_1.{p}"),
    ("ofs_embedding_linear_2.{p}",           "ofs_embedding.linear_2.{p}"),
    ("norm_final.{p}",                       "norm_final.{p}"),
    ("norm_out.linear.{p}",                  "norm_out.linear.{p}"),
    ("norm_out.norm.{p}",                    "norm_out.norm.{p}"),
    ("proj_out.{p}",                         "proj_out.{p}"),
]

VAE_RULES = [
    ("encoder.down.{i}.block.{j}.nin_shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}"),
    ("encoder.down.{i}.block.{j}.{rest}",           "encoder.down_blocks.{i}.resnets.{j}.{rest}"),
    ("encoder.down.{i}.downsample.{rest}",          "encoder.down_blocks.{i}.downsamplers.0.{rest}"),
    ("decoder.up.{up}.block.{j}.nin_shortcut.{p}",  "decoder.up_blocks.{up}.resnets.{j}.conv_shortcut.{p}"),
    ("decoder.up.{up}.block.{j}.{rest}",            "decoder.up_blocks.{up}.resnets.{j}.{rest}"),
    ("decoder.up.{up}.upsample.{rest}",             "decoder.up_blocks.{up}.upsamplers.0.{rest}"),
    ("{part}.mid.block_1.{rest}",                   "{part}.mid_block.resnets.0.{rest}"),
    ("{part}.mid.block_2.{rest}",                   "{part}.mid_block.resnets.1.{rest}"),
    ("{part}.{top}.{rest}",                         "{part}.{top}.{rest}"),
]

VAE_DROPS = [
    ("loss.*", "training loss (LPIPS and discriminator), not part of the VAE"),
]
# fmt: on

_FIELDS = {"i": r"\d+", "j": r"\d+", "up": r"\d+", "p": r"weight|bias", "rest": r"[\w.]+",
           "part": r"encoder|decoder", "top": r"conv_in|conv_out|norm_out"}


def _regex(pattern: str) -> re.Pattern:
    out = []
    for lit, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", pattern):
        out.append(re.escape(lit).replace(r"\*", ".*"))
        if name:
            out.append(f"(?P<{name}>{_FIELDS[name]})")
    return re.compile("".join(out) + "$")


@dataclass(frozen=True)
class Piece:
    """Rows [index * rows/count, (index+1) * rows/count) of tensor `source` (count 1: the whole tensor)."""

    source: str
    index: int = 0
    count: int = 1


class Mapping:
    """Name mapping in both directions; `ctx` carries n_up (VAE up blocks) and config flags for `when`."""

    def __init__(self, rules, drops=()):
        self.rules = []
        for rule in rules:
            sat, targets, when = (*rule, None)[:3]
            targets = {targets: [0]} if isinstance(targets, str) else targets
            n = 1 + max(i for idx in targets.values() for i in idx)
            self.rules.append((sat, _regex(sat), [(t, _regex(t), idx) for t, idx in targets.items()], n, when))
        self.drops = [(_regex(pattern), pattern, reason) for pattern, reason in drops]

    @staticmethod
    def _fields(m: re.Match, ctx: dict) -> dict:
        f = m.groupdict()
        if "up" in f:  # Diffusers counts decoder up blocks from the other end; the flip is its own inverse
            f["up"] = str(ctx["n_up"] - 1 - int(f["up"]))
        return f

    def to_diffusers(self, sat_name: str, ctx: dict | None = None):
        """-> ("map", [(diffusers_name, [Piece])]) | ("drop", reason) | ("unknown", None)."""
        ctx = ctx or {}
        for sat, rx, targets, n, when in self.rules:
            m = rx.match(sat_name)
            if m and (when is None or ctx.get(when)):
                f = self._fields(m, ctx)
                return "map", [(t.format(**f), [Piece(sat_name, i, n) for i in idx]) for t, _, idx in targets]
        for rx, pattern, reason in self.drops:
            if rx.match(sat_name):
                return "drop", reason
        return "unknown", None

    def to_sat(self, diffusers_names, ctx: dict | None = None):
        """Group Diffusers names into SAT tensors -> ({sat_name: [Piece in row order]}, [unmapped names])."""
        ctx = ctx or {}
        slots: dict[str, list] = {}
        unknown = []
        for name in diffusers_names:
            for sat, _, targets, n, when in self.rules:
                hit = next(((m, idx) for _, rx, idx in targets if (m := rx.match(name))), None)
                if hit and (when is None or ctx.get(when)):
                    m, idx = hit
                    sat_name = sat.format(**self._fields(m, ctx))
                    slot = slots.setdefault(sat_name, [None] * n)
                    for k, pos in enumerate(idx):
                        slot[pos] = Piece(name, k, len(idx))
                    break
            else:
                unknown.append(name)
        incomplete = {s: [i for i, p in enumerate(v) if p is None] for s, v in slots.items() if None in v}
        if incomplete:
            s, gaps = next(iter(incomplete.items()))
            raise KeyError(f"SAT tensor {s} needs all its parts; pieces {gaps} have no Diffusers tensor "
                           f"({len(incomplete)} such tensors)")
        return slots, unknown


TRANSFORMER = Mapping(TRANSFORMER_RULES, TRANSFORMER_DROPS)
LORA = Mapping(LORA_RULES)
NATIVE = Mapping(NATIVE_RULES)
VAE = Mapping(VAE_RULES, VAE_DROPS)


def native_module(module: str) -> str | None:
    """The ComfyUI-native name of a Diffusers module path (`transformer_blocks.0.attn1.to_out.0` ->
    `blocks.0.attn_out`); None when the port has no such module."""
    slots, unknown = NATIVE.to_sat([f"{module}.weight"])
    return None if unknown else next(iter(slots))[:-len(".weight")]


def diffusers_module(native: str) -> str | None:
    """The Diffusers module path of a ComfyUI-native module name; None when it names no module of the port."""
    kind, res = NATIVE.to_diffusers(f"{native}.weight")
    return res[0][0][:-len(".weight")] if kind == "map" else None
