"""SAT <-> Diffusers conversions of the transformer, VAE, LoRA and whole pipelines.

Each conversion: read the source lazily, detect the model from its tensors, plan every output tensor from the
mapping (mapping.py), validate the plan against the Diffusers class's shape rules (shapes.py: data and
arithmetic, checked against the real classes by the tests; diffusers is never imported), stream the tensors into
a temporary folder (byte ranges copied by the kernel where no cast is asked for: io.direct_spans), check what
was written, rename the folder into place and return a Summary. A conversion first sweeps the temps that a
killed conversion to the same destination left (cogpipe.atomic).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import atomic
from ..family import DTYPES, LORA_FILE, VARIANTS, family_values, is_i2v, scheduler_config
from ..weights import LazyTensor, diagnose, materialize, open_state_dict, read_safetensors
from . import detect, fastcopy, shapes
from .detect import (
    NATIVE_CONFIG_META,
    ConversionError,
    is_lora_key,
    native_config,
    native_prefix,
    split_prefixed,
    split_sat,
    transformer_config,
    vae_config,
)
from .io import Out, atomic_dir, check_written, write_safetensors, write_safetensors_file, write_torch
from .mapping import LORA, NATIVE, SAT_PREFIX, TRANSFORMER, VAE
from .shapes import expected_shapes

TARGETS = ("diffusers", "sat", "comfyui")
NATIVE_FILE = "transformer_comfyui_core.safetensors"  # the native file's name when the destination is a folder
SAT_MAX_SEQUENCE_LENGTH = 64  # transformer_args.max_sequence_length in CogVideoX's SAT configs
COGPIPE_LORA_META = "cogpipe_sat_lora"  # safetensors metadata: how the SAT scale was baked in


@dataclass
class Options:
    dtype: torch.dtype | None = None
    lora_mode: str = "extract"
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    transformer_config: dict = field(default_factory=dict)
    vae_config: dict = field(default_factory=dict)
    sat_lora_alpha: float = 1.0
    max_shard_size: str | int = "5GB"
    overwrite: bool = False


@dataclass
class Summary:
    direction: str  # "sat->diffusers" | "diffusers->sat"
    kind: str  # transformer | vae | lora | pipeline
    model: str
    source: str
    destination: str
    parameters: int = 0
    tensors: int = 0
    dtypes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)  # {"reason", "count", "keys"}
    ignored: list[dict] = field(default_factory=list)  # {"prefix", "count", "reason"}
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    parts: list["Summary"] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.direction} {self.kind}: {self.model}", f"  source:      {self.source}",
                 f"  destination: {self.destination}"]
        if self.tensors:
            lines.append(f"  wrote {self.tensors} tensors, {self.parameters:,} parameters "
                         f"({', '.join(self.dtypes)}) in {len(self.files)} file(s)")
        for d in self.dropped:
            keys = ", ".join(d["keys"][:3]) + (" ..." if d["count"] > 3 else "")
            lines.append(f"  dropped {d['count']}: {keys} -- {d['reason']}")
        for g in self.ignored:
            lines.append(f"  ignored {g['count']} tensors {g['prefix']}* -- {g['reason']}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines + [str(p) for p in self.parts])


def convert(src, dst, *, to: str | None = None, dtype: str | torch.dtype | None = None, lora_mode: str = "extract",
            text_encoder=None, tokenizer=None, transformer_config: dict | None = None,
            vae_config: dict | None = None, sat_lora_alpha: float = 1.0, max_shard_size: str | int = "5GB",
            overwrite: bool = False) -> Summary:
    """Convert `src` to `dst`; direction and model are detected from the files.

    SAT transformer folder/.pt -> Diffusers transformer folder; SAT 3d-vae.pt -> Diffusers VAE folder;
    SAT LoRA -> folder with pytorch_lora_weights.safetensors; SAT folder with transformer/ and vae/ -> full
    pipeline folder; and the reverse of each. dtype casts floating tensors (default: keep each tensor's dtype).
    lora_mode: for a SAT transformer whose layers carry LoRA, "extract" writes the base weights plus the LoRA
    under dst/lora, "merge" folds the LoRA into the weights. sat_lora_alpha: SAT's lora_alpha (scale
    alpha/rank; SAT's default 1). transformer_config / vae_config override detected config values.
    to: the target format, "diffusers" | "sat" | "comfyui" (ComfyUI core's native single-file transformer, from
    any transformer or pipeline folder); default: SAT -> Diffusers, Diffusers -> SAT, ComfyUI-native -> Diffusers.
    """
    if to not in (None, *TARGETS):
        raise ConversionError(f"to {to!r}: choose one of {', '.join(TARGETS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if lora_mode not in ("extract", "merge"):
        raise ConversionError(f"lora_mode {lora_mode!r}: choose 'extract' or 'merge'")
    o = Options(dtype, lora_mode, Path(text_encoder) if text_encoder else None, Path(tokenizer) if tokenizer else None,
                dict(transformer_config or {}), dict(vae_config or {}), float(sat_lora_alpha), max_shard_size,
                overwrite)
    src, dst = Path(src), Path(dst)
    atomic.sweep(dst.parent, dst.name)
    readahead = fastcopy.start(src)  # None when the command line started it already
    try:
        fmt, kind = detect.source_kind(src)
        if to == "comfyui":
            return to_comfyui(src, dst, o, fmt, kind)
        target = to or {"sat": "diffusers", "diffusers": "sat", "comfyui": "diffusers"}[fmt]
        if target == fmt:
            raise ConversionError(f"{src}: already in {fmt} keys")
        if fmt == "comfyui":
            if target != "diffusers":
                raise ConversionError(f"{src}: a ComfyUI-native transformer converts to Diffusers (then to SAT)")
            return comfyui_transformer(src, dst, o)
        fn = {("sat", "transformer"): sat_transformer, ("sat", "vae"): sat_vae, ("sat", "lora"): sat_lora,
              ("sat", "pipeline"): sat_pipeline, ("diffusers", "transformer"): diffusers_transformer,
              ("diffusers", "vae"): diffusers_vae, ("diffusers", "lora"): diffusers_lora,
              ("diffusers", "pipeline"): diffusers_pipeline}[(fmt, kind)]
        return fn(src, dst, o)
    finally:
        fastcopy.stop(readahead)


# --- planning and validation -----------------------------------------------------------------------------------------


def _file_pos(t):
    return (t.path, t.offset + t.elem_offset * t.dtype.itemsize) if isinstance(t, LazyTensor) else ("", 0)


def _cast(dtype, t):
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


def plan_to_diffusers(mapping, tensors: dict, ctx: dict, dtype, src) -> tuple[list[Out], list[dict]]:
    """SAT tensors -> planned Diffusers outputs (in source file order) and dropped keys grouped by reason."""
    outs, dropped, unknown = [], {}, []
    for k in sorted(tensors, key=lambda k: _file_pos(tensors[k])):
        kind, res = mapping.to_diffusers(k, ctx)
        if kind == "map":
            outs += [Out(name, [(tensors[p.source], p.index, p.count) for p in pieces], _cast(dtype, tensors[k]))
                     for name, pieces in res]
        elif kind == "drop":
            dropped.setdefault(res, []).append(k)
        else:
            unknown.append(k)
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} keys match no rule of the CogVideoX mapping "
                              f"(docs/design.md, section 'SAT checkpoints'), refusing to guess: {unknown[:8]}")
    return outs, [{"reason": r, "count": len(v), "keys": v} for r, v in dropped.items()]


def plan_to_sat(mapping, tensors: dict, ctx: dict, dtype, src, prefix="") -> list[Out]:
    try:
        slots, unknown = mapping.to_sat(list(tensors), ctx)
    except KeyError as e:
        raise ConversionError(f"{src}: {e.args[0]}") from None
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} keys have no SAT equivalent in the mapping: {unknown[:8]}")
    outs = [Out(prefix + name, [(tensors[p.source], p.index, p.count) for p in pieces],
                _cast(dtype, tensors[pieces[0].source])) for name, pieces in slots.items()]
    return sorted(outs, key=lambda o: _file_pos(o.pieces[0][0]))


def validate(shapes: dict[str, tuple], expected: dict[str, tuple], what: str, where) -> None:
    """Every expected key present, nothing unexpected, every shape equal -- else one error listing all."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [diagnose(k, s, expected[k]) for k, s in shapes.items() if k in expected and tuple(s) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"{where}: the converted weights do not fit {what}:"] + wrong[:8]
        if missing:
            lines.append(f"missing ({len(missing)}): {missing[:8]}")
        if unexpected:
            lines.append(f"unexpected ({len(unexpected)}): {unexpected[:8]}")
        raise ConversionError("\n".join(lines))


def _summary(direction, kind, model, src, dst, outs, **kw) -> Summary:
    return Summary(direction, kind, model, str(src), str(dst), sum(math.prod(o.shape) for o in outs), len(outs),
                   sorted({str(o.dtype).removeprefix("torch.") for o in outs}), **kw)


# --- transformer -------------------------------------------------------------------------------------------------


def _plan_sat_transformer(src: Path, o: Options):
    """A SAT transformer's Diffusers outputs (its inline LoRA merged when o.lora_mode is "merge") ->
    (outs, config.json text, dropped, ignored, lora or None, notes)."""
    body, ignored = split_sat(open_state_dict(src, master_weights=False))
    lora_keys = {k: v for k, v in body.items() if is_lora_key(k)}
    base = {k.replace(".original.", "."): v for k, v in body.items() if not is_lora_key(k)}
    cfg = {**transformer_config({k: tuple(v.shape) for k, v in base.items()}, src), **o.transformer_config}
    outs, dropped = plan_to_diffusers(TRANSFORMER, base, cfg, o.dtype, src)
    expected, config_json = expected_shapes("CogVideoXTransformer3DModel", cfg)
    validate({out.name: out.shape for out in outs}, expected, f"CogVideoXTransformer3DModel({cfg})", src)
    notes = []
    lora = lora_to_diffusers(lora_keys, o, src) if lora_keys else None
    if lora and o.lora_mode == "merge":
        by_name = {out.name: out for out in outs}
        for module, (a, b, scale) in lora["raw"].items():
            by_name[f"{module}.weight"].merge.append((a, b, scale))
        notes.append(f"LoRA ({lora['what']}) merged into the weights "
                     f"with SAT's scale {o.sat_lora_alpha:g}/rank")
    return outs, config_json, dropped, ignored, lora, notes


def sat_transformer(src: Path, dst: Path, o: Options, lora_dst: Path | None = None) -> Summary:
    outs, config_json, dropped, ignored, lora, notes = _plan_sat_transformer(src, o)
    cfg = json.loads(config_json)
    with atomic_dir(dst, o.overwrite) as tmp:
        files = write_safetensors(tmp, outs, prefix="diffusion_pytorch_model", max_shard_size=o.max_shard_size)
        check_written(files, outs)
        (tmp / "config.json").write_text(config_json)
        if lora and o.lora_mode == "extract":
            where = lora_dst or dst / "lora"
            _write_lora((tmp / "lora" if lora_dst is None else lora_dst) / LORA_FILE, lora)
            notes.append(f"LoRA ({lora['what']}) extracted to {where}; "
                         f"load it with pipe.load_lora_weights('{where}')")
            notes += lora["notes"]
    return _summary("sat->diffusers", "transformer", detect.model_name(cfg), src, dst, outs,
                    config=json.loads(config_json), dropped=dropped, ignored=ignored, notes=notes,
                    files=[str(dst / f.name) for f in files])


_DETECTED = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
             "ofs_embed_dim", "text_embed_dim", "num_layers", "patch_size", "patch_size_t",
             "use_rotary_positional_embeddings", "use_learned_positional_embeddings")


def diffusers_transformer(src: Path, dst: Path, o: Options) -> Summary:
    sd = open_state_dict(src)
    cfg_in = {**json.loads((src / "config.json").read_text()), **o.transformer_config}
    expected, config_json = expected_shapes("CogVideoXTransformer3DModel", cfg_in)
    cfg = json.loads(config_json)
    validate({k: tuple(v.shape) for k, v in sd.items()}, expected, "its own config.json", src)
    outs = plan_to_sat(TRANSFORMER, sd, cfg, o.dtype, src, prefix=SAT_PREFIX)
    notes = []
    if not cfg["use_rotary_positional_embeddings"]:
        table = shapes.sincos_pos_embedding(cfg).to(o.dtype or sd["patch_embed.proj.weight"].dtype)
        outs.append(Out(SAT_PREFIX + "mixins.pos_embed.pos_embedding", [(table, 0, 1)], table.dtype))
        notes.append("wrote SAT's frozen 3D sin-cos table mixins.pos_embed.pos_embedding (SAT loads it, "
                     "Diffusers recomputes it)")
    else:  # SAT's base transformer keeps a position table that RoPE models never use; SAT's load expects it
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        table = torch.zeros(SAT_MAX_SEQUENCE_LENGTH, hidden, dtype=o.dtype or sd["patch_embed.proj.weight"].dtype)
        outs.append(Out(SAT_PREFIX + "transformer.position_embeddings.weight", [(table, 0, 1)], table.dtype))
        notes.append(f"wrote SAT's unused transformer.position_embeddings.weight as zeros [{SAT_MAX_SEQUENCE_LENGTH}, "
                     f"{hidden}] (max_sequence_length of CogVideoX's SAT configs); RoPE tables are rebuilt by SAT")
    back = transformer_config({o_.name[len(SAT_PREFIX):]: o_.shape for o_ in outs}, dst)
    diff = {k: (back[k], cfg.get(k)) for k in _DETECTED if back[k] != cfg.get(k)}
    if diff:
        raise ConversionError(f"{src}: the SAT layout would read back as a different model: {diff}")
    with atomic_dir(dst, o.overwrite) as tmp:
        (tmp / "1").mkdir()
        write_torch(tmp / "1" / "mp_rank_00_model_states.pt", outs, lambda sd: {"module": sd})
        (tmp / "latest").write_text("1")
    return _summary("diffusers->sat", "transformer", detect.model_name(cfg), src, dst, outs, config=cfg,
                    notes=notes, files=[str(dst / "1" / "mp_rank_00_model_states.pt")])


# --- ComfyUI core's native single file ----------------------------------------------------------------------------


def native_problems(cfg: dict) -> list[str]:
    """What ComfyUI core's CogVideoX port cannot hold: tensors its modules always have that this config lacks."""
    out = []
    if not cfg["attention_bias"]:
        out.append("attention_bias false (the port's q, k, v and attn_out always have a bias)")
    if not cfg["norm_elementwise_affine"]:
        out.append("norm_elementwise_affine false (the port's LayerNorms always have weights)")
    if cfg["activation_fn"] != "gelu-approximate":
        out.append(f"activation_fn {cfg['activation_fn']!r} (the port's feed-forward is tanh-GELU, 4x wide)")
    return out


def comfyui_notes(cfg: dict) -> list[str]:
    """What ComfyUI core makes of a native file of this config (its model_detection reads the shapes)."""
    notes = []
    if cfg["attention_head_dim"] != 64:
        notes.append(f"ComfyUI's model detection assumes 64-wide attention heads; this model's are "
                     f"{cfg['attention_head_dim']}, so ComfyUI core cannot build it (cogpipe reads the file back)")
    rope, learned = cfg["use_rotary_positional_embeddings"], cfg["use_learned_positional_embeddings"]
    if learned:
        notes.append("a learned position table with RoPE (CogVideoX-5B-I2V): ComfyUI's detection reads the table as "
                     "'no RoPE', so ComfyUI core runs this version without its RoPE: not supported there")
    elif not rope:
        notes.append("3D sin-cos positions (CogVideoX-2B): the table is stored as patch_embed.pos_embedding, by which "
                     "ComfyUI detects a model without RoPE, and which it adds as stored (Diffusers' table)")
    return notes


def _to_native(outs: list[Out], cfg: dict, dtype, src) -> list[Out]:
    """Diffusers-named outputs -> the same tensors under the port's names, plus the 3D sin-cos table of a model
    without RoPE (ComfyUI tells a 2B from a RoPE model by it)."""
    problems = native_problems(cfg)
    if problems:
        raise ConversionError(f"{src}: ComfyUI core's CogVideoX port cannot hold this transformer: "
                              f"{'; '.join(problems)}")
    slots, unknown = NATIVE.to_sat([out.name for out in outs])
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} tensors have no ComfyUI-native name: {unknown[:8]}")
    native = {pieces[0].source: name for name, pieces in slots.items()}
    res = [Out(native[out.name], out.pieces, out.dtype, out.merge) for out in outs]
    if not cfg["use_rotary_positional_embeddings"] and not cfg["use_learned_positional_embeddings"]:
        weight = next(out for out in outs if out.name == "patch_embed.proj.weight")
        table = shapes.sincos_pos_embedding(cfg).to(dtype or weight.dtype)
        res.append(Out("patch_embed.pos_embedding", [(table, 0, 1)], table.dtype))
    return res


def to_comfyui(src: Path, dst: Path, o: Options, fmt: str, kind: str) -> Summary:
    """Any transformer (a Diffusers or SAT transformer, or the transformer of a pipeline folder) -> one safetensors
    file in ComfyUI core's native keys (what its UNETLoader / "Load Diffusion Model" reads), the Diffusers config in
    its metadata (NATIVE_CONFIG_META) so that cogpipe reads it back exactly."""
    if kind == "pipeline":
        src = src / "transformer"
        kind = "transformer"
    if fmt == "comfyui":
        raise ConversionError(f"{src}: already in ComfyUI-native keys")
    if kind != "transformer":
        raise ConversionError(f"{src}: a {kind}; --to comfyui writes transformers (ComfyUI core loads the Diffusers "
                              f"VAE file and the T5 encoder as they are)")
    notes, dropped, ignored = [], [], []
    if fmt == "diffusers":
        sd = open_state_dict(src)
        expected, config_json = expected_shapes("CogVideoXTransformer3DModel",
                                                {**json.loads((src / "config.json").read_text()),
                                                 **o.transformer_config})
        validate({k: tuple(v.shape) for k, v in sd.items()}, expected, "its own config.json", src)
        outs = [Out(k, [(sd[k], 0, 1)], _cast(o.dtype, sd[k])) for k in sorted(sd, key=lambda k: _file_pos(sd[k]))]
    else:
        outs, config_json, dropped, ignored, lora, notes = _plan_sat_transformer(src, o)
        if lora and o.lora_mode != "merge":
            raise ConversionError(f"{src}: the SAT transformer carries a LoRA; a native file holds one set of weights: "
                                  f"pass lora_mode='merge' (--lora-mode merge), or convert the LoRA on its own")
    cfg = json.loads(config_json)
    native = _to_native(outs, cfg, o.dtype, src)
    dst = dst if dst.suffix == ".safetensors" else dst / NATIVE_FILE
    if dst.exists() and not o.overwrite:
        raise ConversionError(f"{dst}: exists (pass overwrite=True / --overwrite to replace it)")
    atomic.sweep(dst.parent, dst.name)
    with atomic.file(dst, sync=True) as tmp:
        write_safetensors_file(tmp, native, metadata={NATIVE_CONFIG_META: json.dumps(cfg, sort_keys=True)})
        check_written([tmp], native)
    return _summary(f"{fmt}->comfyui", "transformer", detect.model_name(cfg), src, dst, native, config=cfg,
                    dropped=dropped, ignored=ignored, notes=notes + comfyui_notes(cfg), files=[str(dst)])


NATIVE_EXTRAS = {  # what an all-in-one ComfyUI checkpoint holds beside the transformer
    "vae.": "VAE inside a ComfyUI checkpoint; the pipeline takes it from the base",
    "text_encoders.": "text encoder inside a ComfyUI checkpoint; the pipeline takes it from the base",
}


def comfyui_transformer(src: Path, dst: Path, o: Options) -> Summary:
    """A ComfyUI-native transformer file (bare keys, or under model.diffusion_model. / diffusion_model.) ->
    a Diffusers transformer folder. Every key must map (docs/lora_formats.md): an unknown one is an error naming it."""
    if src.is_dir():  # source_kind found one weights file in it
        src = next(f for f in sorted(src.iterdir()) if f.suffix == ".safetensors")
    tensors, metadata = read_safetensors(src)
    body, ignored = split_prefixed(tensors, native_prefix(tensors), NATIVE_EXTRAS)
    shapes_ = {k: tuple(v.shape) for k, v in body.items()}
    cfg_in = native_config(shapes_, metadata, src, given=o.transformer_config)
    expected, config_json = expected_shapes("CogVideoXTransformer3DModel", cfg_in)
    cfg = json.loads(config_json)
    outs, dropped, unknown = [], [], []
    for k in sorted(body, key=lambda k: _file_pos(body[k])):
        kind, res = NATIVE.to_diffusers(k)
        if kind != "map":
            unknown.append(k)
        elif res[0][0] == "patch_embed.pos_embedding" and res[0][0] not in expected:
            dropped.append(k)  # a 3D sin-cos model's table: Diffusers recomputes it
        else:
            outs.append(Out(res[0][0], [(body[k], 0, 1)], _cast(o.dtype, body[k])))
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} keys are not tensors of ComfyUI core's CogVideoX port "
                              f"(comfy/ldm/cogvideo/model.py), refusing to guess: {unknown[:8]}")
    validate({out.name: out.shape for out in outs}, expected, f"CogVideoXTransformer3DModel({cfg_in})", src)
    with atomic_dir(dst, o.overwrite) as tmp:
        files = write_safetensors(tmp, outs, prefix="diffusion_pytorch_model", max_shard_size=o.max_shard_size)
        check_written(files, outs)
        (tmp / "config.json").write_text(config_json)
    notes = [] if NATIVE_CONFIG_META in metadata else [
        "no cogpipe config in the file's metadata: the config was read from the shapes (sample size and text "
        "length: the version's defaults; override with transformer_config / --set transformer.KEY=VALUE)"]
    return _summary("comfyui->diffusers", "transformer", detect.model_name(cfg), src, dst, outs, config=cfg,
                    dropped=[{"reason": "3D sin-cos table; Diffusers recomputes it", "count": len(dropped),
                              "keys": dropped}] if dropped else [],
                    ignored=ignored, notes=notes, files=[str(dst / f.name) for f in files])


# --- VAE -----------------------------------------------------------------------------------------------------------


def sat_vae(src: Path, dst: Path, o: Options, family: dict | None = None) -> Summary:
    sd = open_state_dict(src, master_weights=False)
    notes = []
    if family is None:
        five, two = VARIANTS["5b"], VARIANTS["2b"]
        family = {"scaling_factor": five.scaling_factor, "invert_scale_latents": False}
        notes.append(f"a SAT VAE file does not store its latent scaling: wrote scaling_factor {five.scaling_factor} "
                     f"({five.title}); for {two.size} set vae.scaling_factor={two.scaling_factor}, for 1.5 also "
                     f"vae.invert_scale_latents=true (converting the whole SAT folder sets both from the transformer)")
    cfg = {**vae_config({k: tuple(v.shape) for k, v in sd.items()}, src), **family, **o.vae_config}
    outs, dropped = plan_to_diffusers(VAE, sd, {"n_up": len(cfg["up_block_types"])}, o.dtype, src)
    expected, config_json = expected_shapes("AutoencoderKLCogVideoX", cfg)
    validate({out.name: out.shape for out in outs}, expected, f"AutoencoderKLCogVideoX({cfg})", src)
    with atomic_dir(dst, o.overwrite) as tmp:
        files = write_safetensors(tmp, outs, prefix="diffusion_pytorch_model", max_shard_size=o.max_shard_size)
        check_written(files, outs)
        (tmp / "config.json").write_text(config_json)
    return _summary("sat->diffusers", "vae", "CogVideoX VAE", src, dst, outs, config=json.loads(config_json),
                    dropped=dropped, notes=notes, files=[str(dst / f.name) for f in files])


def diffusers_vae(src: Path, dst: Path, o: Options) -> Summary:
    sd = open_state_dict(src)
    expected, config_json = expected_shapes("AutoencoderKLCogVideoX",
                                            {**json.loads((src / "config.json").read_text()), **o.vae_config})
    cfg = json.loads(config_json)
    validate({k: tuple(v.shape) for k, v in sd.items()}, expected, "its own config.json", src)
    outs = plan_to_sat(VAE, sd, {"n_up": len(cfg["up_block_types"])}, o.dtype, src)
    with atomic_dir(dst, o.overwrite) as tmp:
        write_torch(tmp / "3d-vae.pt", outs, lambda sd: {"state_dict": sd})
    return _summary("diffusers->sat", "vae", "CogVideoX VAE", src, dst, outs, config=cfg,
                    notes=["loss.* (LPIPS/discriminator) is training-only and not written"],
                    files=[str(dst / "3d-vae.pt")])


# --- LoRA ------------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def lora_to_diffusers(lora_keys: dict, o: Options, src) -> dict:
    """SAT LoRA matrices -> Diffusers LoRA tensors with SAT's scale (alpha/rank) baked into lora_B.

    diffusers/peft apply lora_alpha/r and, without metadata, take alpha = r (scale 1); so lora_B is stored
    multiplied by SAT's scale. When that product cannot be undone exactly in the source dtype (rank not a power
    of two), the LoRA is stored in fp32, which can (the summary says so).
    """
    named, unknown = {}, []
    for k, v in lora_keys.items():
        kind, res = LORA.to_diffusers(k)
        if kind != "map":
            unknown.append(k)
        else:
            named[res[0][0]] = v
    if unknown:
        raise ConversionError(f"{src}: LoRA keys outside SAT lora2's attention query_key_value/dense: {unknown[:8]}")
    raw, ranks = {}, set()
    for name in sorted(named):
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        if f"{module}.lora_B.weight" not in named:
            raise ConversionError(f"{src}: {module} has matrix_A but no matrix_B")
        a, b = materialize(named[name]), materialize(named[f"{module}.lora_B.weight"])
        ranks.add(a.shape[0])
        raw[module] = (a, b, o.sat_lora_alpha / a.shape[0])
    orphans = [n for n in named if ".lora_B." in n and n.split(".lora_B.")[0] not in raw]
    if orphans:
        raise ConversionError(f"{src}: matrix_B without matrix_A for {orphans[:4]}")
    src_dtype = next(iter(raw.values()))[0].dtype
    store = o.dtype or src_dtype
    notes = []

    def bake(dt):
        out, exact = {}, True
        for module, (a, b, scale) in raw.items():
            bp = (b.float() * scale).to(dt)
            back = (bp.float() * (a.shape[0] / o.sat_lora_alpha)).to(b.dtype)
            exact &= torch.equal(_bits(back), _bits(b))
            out[f"transformer.{module}.lora_A.weight"] = a.to(dt)
            out[f"transformer.{module}.lora_B.weight"] = bp
        return out, exact

    tensors, exact = bake(store)
    if not exact and o.dtype is None and store != torch.float32:
        tensors, exact = bake(torch.float32)
        notes.append(f"LoRA stored in fp32: SAT's scale baked into lora_B is exactly invertible only there "
                     f"(rank {sorted(ranks)} is not a power of two)")
    if not exact:
        notes.append("converting this LoRA back to SAT may differ in the last bit (scale baked into lora_B)")
    meta = {COGPIPE_LORA_META: json.dumps({"sat_dtype": str(src_dtype).removeprefix("torch."),
                                           "sat_lora_alpha": o.sat_lora_alpha, "scale_in_lora_B": True})}
    rank = sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)
    layers = len({m.split(".attn1.")[0] for m in raw})
    return {"tensors": tensors, "metadata": meta, "raw": raw, "rank": rank, "notes": notes,
            "what": f"rank {rank}, {len(raw)} modules in {layers} layers"}


def _write_lora(file: Path, lora: dict) -> Path:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora["tensors"].items()}, str(file),
              metadata={"format": "pt", **lora["metadata"]})
    return file


def sat_lora(src: Path, dst: Path, o: Options) -> Summary:
    body, ignored = split_sat(open_state_dict(src, master_weights=False))
    lora = lora_to_diffusers(body, o, src)
    if dst.suffix == ".safetensors":
        if dst.exists() and not o.overwrite:
            raise ConversionError(f"{dst}: exists (pass overwrite=True / --overwrite)")
        with atomic.file(dst, sync=True) as tmp:
            _write_lora(tmp, lora)
        file = dst
    else:
        with atomic_dir(dst, o.overwrite) as tmp:
            _write_lora(tmp / LORA_FILE, lora)
        file = dst / LORA_FILE
    s = Summary("sat->diffusers", "lora", f"SAT LoRA, {lora['what']}", str(src),
                str(dst), sum(t.numel() for t in lora["tensors"].values()), len(lora["tensors"]),
                sorted({str(t.dtype).removeprefix("torch.") for t in lora["tensors"].values()}), ignored=ignored,
                notes=[f"SAT scale {o.sat_lora_alpha:g}/rank baked into lora_B; load with "
                       f"pipe.load_lora_weights('{dst}')"] + lora["notes"], files=[str(file)])
    return s


_PEFT_PREFIXES = ("transformer.", "base_model.model.")


def diffusers_lora(src: Path, dst: Path, o: Options) -> Summary:
    file = src if src.is_file() else (src / LORA_FILE if (src / LORA_FILE).is_file()
                                      else next(iter(sorted(src.glob("*.safetensors")))))
    lazy, meta = read_safetensors(file)
    cog = json.loads(meta.get(COGPIPE_LORA_META, "{}"))
    peft = json.loads(meta.get("lora_adapter_metadata", "{}"))
    peft = {k.removeprefix("transformer."): v for k, v in peft.items()}
    if peft.get("rank_pattern"):
        raise ConversionError(f"{file}: per-module ranks (rank_pattern) cannot be expressed in SAT lora2 (one rank)")
    sat_alpha = float(cog.get("sat_lora_alpha", o.sat_lora_alpha))
    names = {}
    for k in lazy:
        n = next((k[len(p):] for p in _PEFT_PREFIXES if k.startswith(p)), k).replace(".default.", ".")
        if n.endswith(".lora_A.weight") or n.endswith(".lora_B.weight"):
            names[n] = lazy[k]
        else:
            raise ConversionError(f"{file}: {k} is not a lora_A/lora_B weight (DoRA, biases and other adapters "
                                  f"have no SAT lora2 equivalent)")
    sat_dtype = getattr(torch, cog.get("sat_dtype", ""), None)
    dtype = o.dtype or (sat_dtype if isinstance(sat_dtype, torch.dtype) else next(iter(names.values())).dtype)
    tensors, ranks = {}, set()
    for n in names:
        if not n.endswith(".lora_A.weight"):
            continue
        module = n[: -len(".lora_A.weight")]
        if f"{module}.lora_B.weight" not in names:
            raise ConversionError(f"{file}: {module} has lora_A but no lora_B")
        a, b = materialize(names[n]), materialize(names[f"{module}.lora_B.weight"])
        r = a.shape[0]
        ranks.add(r)
        alpha = next((v for k, v in (peft.get("alpha_pattern") or {}).items() if module.endswith(k)),
                     peft.get("lora_alpha", r))
        peft_scale = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)
        factor = peft_scale * r / sat_alpha  # SAT computes (sat_alpha / r) * B @ A
        tensors[f"{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"{module}.lora_B.weight"] = (b.float() * factor).to(dtype)
    if len(ranks) > 1:
        raise ConversionError(f"{file}: SAT lora2 uses one rank for every layer; this LoRA has ranks {sorted(ranks)}")
    notes = []
    layers = {n.split(".attn1.")[0] for n in tensors}
    for layer in sorted(layers):  # SAT's qkv LoRA has three partitions: fill absent ones with zeros (no effect)
        present = [p for p in ("to_q", "to_k", "to_v") if f"{layer}.attn1.{p}.lora_A.weight" in tensors]
        if present and len(present) < 3:
            a, b = tensors[f"{layer}.attn1.{present[0]}.lora_A.weight"], \
                tensors[f"{layer}.attn1.{present[0]}.lora_B.weight"]
            for p in {"to_q", "to_k", "to_v"} - set(present):
                tensors[f"{layer}.attn1.{p}.lora_A.weight"] = torch.zeros_like(a)
                tensors[f"{layer}.attn1.{p}.lora_B.weight"] = torch.zeros_like(b)
            if not notes:
                notes.append("SAT's query_key_value LoRA has q, k and v parts: absent parts written as zeros")
    outs = plan_to_sat(LORA, tensors, {}, None, file, prefix=SAT_PREFIX)
    with atomic_dir(dst, o.overwrite) as tmp:
        (tmp / "1").mkdir()
        write_torch(tmp / "1" / "mp_rank_00_model_states.pt", outs, lambda sd: {"module": sd})
        (tmp / "latest").write_text("1")
    notes.append(f"SAT applies lora_alpha/rank = {sat_alpha:g}/{sorted(ranks)[0]}: set the LoraMixin to "
                 f"r={sorted(ranks)[0]}, lora_alpha={sat_alpha:g}")
    return _summary("diffusers->sat", "lora", f"LoRA, rank {sorted(ranks)[0]}, {len(layers)} layers", src, dst,
                    outs, notes=notes, files=[str(dst / "1" / "mp_rank_00_model_states.pt")])


# --- pipelines -------------------------------------------------------------------------------------------------------


def _copy_text_encoder(o: Options, tmp: Path) -> tuple[list, list, list[str]]:
    if o.text_encoder is None:
        return [None, None], [None, None], [
            "text encoder and tokenizer left out (model_index.json lists them as null): pass --text-encoder PATH "
            "(a CogVideoX pipeline folder or a T5 encoder folder such as google/t5-v1_1-xxl), or pass them when "
            "loading: from_pretrained(dst, text_encoder=T5EncoderModel..., tokenizer=...) (or =None for latents-only "
            "use)"]
    te = o.text_encoder / "text_encoder" if (o.text_encoder / "text_encoder").is_dir() else o.text_encoder
    if not (te / "config.json").is_file():
        raise ConversionError(f"{te}: not a text encoder folder (no config.json)")
    tok = o.tokenizer or next((d for d in (o.text_encoder / "tokenizer", o.text_encoder)
                               if (d / "tokenizer_config.json").is_file()), None)
    shutil.copytree(te, tmp / "text_encoder")
    te_cls = (json.loads((te / "config.json").read_text()).get("architectures") or ["T5EncoderModel"])[0]
    if tok is None:
        return ["transformers", te_cls], [None, None], [
            f"no tokenizer found beside {o.text_encoder}: pass --tokenizer PATH"]
    shutil.copytree(tok, tmp / "tokenizer")
    tok_cfg = json.loads((tok / "tokenizer_config.json").read_text()) if (tok / "tokenizer_config.json").is_file() \
        else {}
    return ["transformers", te_cls], ["transformers", tok_cfg.get("tokenizer_class", "T5Tokenizer")], []


def sat_pipeline(src: Path, dst: Path, o: Options) -> Summary:
    t_src, v_src = src / "transformer", src / "vae"
    if not (t_src.exists() and v_src.exists()):
        raise ConversionError(f"{src}: a SAT pipeline folder needs transformer/ and vae/; to convert one part, "
                              f"pass that subfolder")
    v_file = next((f for f in sorted(v_src.iterdir()) if f.suffix in (".pt", ".pth", ".ckpt")), v_src)
    with atomic_dir(dst, o.overwrite) as tmp:
        t = sat_transformer(t_src, tmp / "transformer", o, lora_dst=tmp / "lora")
        fam = family_values(t.config)
        v = sat_vae(v_file, tmp / "vae", o, family={k: fam[k] for k in ("scaling_factor", "invert_scale_latents")})
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(shapes.scheduler_json(**scheduler_config(t.config)))
        te, tok, notes = _copy_text_encoder(o, tmp)
        pipe = "CogVideoXImageToVideoPipeline" if is_i2v(t.config) else "CogVideoXPipeline"
        index = {"_class_name": pipe, "_diffusers_version": shapes.diffusers_version(),
                 "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": te, "tokenizer": tok,
                 "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
                 "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    for part in (t, v):
        part.destination = part.destination.replace(str(tmp), str(dst))
        part.files = [f.replace(str(tmp), str(dst)) for f in part.files]
        part.notes = [n.replace(str(tmp), str(dst)) for n in part.notes]
    fam_note = (f"{pipe} with CogVideoXDDIMScheduler (v-prediction, snr_shift_scale "
                f"{fam['snr_shift_scale']}), VAE scaling_factor {fam['scaling_factor']}"
                f"{', invert_scale_latents' if fam['invert_scale_latents'] else ''}")
    return Summary("sat->diffusers", "pipeline", t.model, str(src), str(dst), t.parameters + v.parameters,
                   t.tensors + v.tensors, sorted(set(t.dtypes + v.dtypes)), notes=[fam_note] + notes,
                   files=t.files + v.files, parts=[t, v])


def diffusers_pipeline(src: Path, dst: Path, o: Options) -> Summary:
    with atomic_dir(dst, o.overwrite) as tmp:
        t = diffusers_transformer(src / "transformer", tmp / "transformer", o)
        v = diffusers_vae(src / "vae", tmp / "vae", o)
    for part in (t, v):
        part.destination = part.destination.replace(str(tmp), str(dst))
        part.files = [f.replace(str(tmp), str(dst)) for f in part.files]
    return Summary("diffusers->sat", "pipeline", t.model, str(src), str(dst), t.parameters + v.parameters,
                   t.tensors + v.tensors, sorted(set(t.dtypes + v.dtypes)), files=t.files + v.files, parts=[t, v],
                   notes=["the T5 text encoder stays in its Hugging Face folder: SAT's conditioner config names it"])
