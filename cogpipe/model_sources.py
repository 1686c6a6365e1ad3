"""Any checkpoint in: a Diffusers pipeline folder, a hub id, a SAT checkpoint (pipeline folder with transformer/
and vae/, or a transformer folder with `latest`), or a single-file transformer (.safetensors in SAT, Diffusers or
ComfyUI core's native keys, .pt/.pth in SAT keys).

    src = resolve("CogVideoX-5b-sat/")            # converted once, then read from the cache
    pipe = cls.from_pretrained(src.base, transformer=..., vae=...)   # see inference.pipeline

A non-Diffusers source is converted by cogpipe.convert into a cache entry keyed by its content: the sha256 of
every source file (remembered by path, size and mtime, so an unchanged source is not read again), the converter
version and the settings taken from the base. A changed source has another key and is converted anew. Each entry
holds a manifest of its own files' sha256, checked on every load: an entry whose files changed is refused,
removed and rebuilt. Pickled sources go through cogpipe.weights' safe loader (no code runs from them).

What a SAT or single-file source lacks (T5, tokenizer, scheduler; the VAE for a transformer alone) comes from
`base`: a pipeline folder or hub id, by default the released model of the source's version (family table).
The cache lives in $COGPIPE_MODEL_CACHE (default ~/.cache/cogpipe/models). See docs/checkpoint_cache.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cogpipe import atomic, family, models, paths
from cogpipe.convert.core import Options, comfyui_transformer, sat_transformer, sat_vae
from cogpipe.convert.detect import is_lora_key, native_config, native_prefix, split_sat, transformer_config
from cogpipe.convert.mapping import TRANSFORMER
from cogpipe.convert.shapes import expected_shapes
from cogpipe.weights import open_state_dict, read_safetensors

CONVERTER_VERSION = 1  # bump when a conversion's output changes: every entry is then rebuilt
MANIFEST = "cogpipe_source.json"
DIGESTS = "digests.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# what SAT files do not store, taken from a base of the same version and mode
FROM_BASE = {"transformer": ("sample_frames", "sample_height", "sample_width", "max_text_seq_length"),
             "vae": ("norm_num_groups", "sample_height", "sample_width", "scaling_factor", "invert_scale_latents")}
conversions = 0  # conversions run by this process (tests count them)


def cache_root() -> Path:
    return Path(os.environ.get("COGPIPE_MODEL_CACHE", str(Path.home() / ".cache" / "cogpipe" / "models")))


@dataclass
class Source:
    """A model as from_pretrained reads it: `folder`, a pipeline folder or hub id (for a converted source, its
    cache entry: the converted parts plus hard links to the base's other components)."""

    spec: str  # what the user passed
    kind: str  # "diffusers" | "hub" | "sat-pipeline" | "sat-transformer" | "single-file"
    folder: str
    entry: Path | None = None  # the cache entry of a converted source
    converted: bool = False  # converted by this call

    @property
    def transformer_config(self) -> dict:
        return models.read_component_config(self.folder, "transformer")

    @property
    def vae_config(self) -> dict:
        return models.read_component_config(self.folder, "vae")


def is_hub_id(spec: str) -> bool:
    """How the loaders tell a hub id from a path: what exists here is a path; otherwise owner/name (one '/', not
    starting with '.', '/' or '~') is a hub id."""
    spec = str(spec)
    return not Path(spec).expanduser().exists() and not spec.startswith((".", "/", "~")) and spec.count("/") == 1


def kind_of(spec: str) -> str:
    path = Path(spec).expanduser()
    if not path.exists():
        if not is_hub_id(spec):
            raise FileNotFoundError(f"--model {spec}: no such file or folder (and not a hub id: owner/name)")
        return "hub"
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"--model {spec}: a single-file transformer must be {', '.join(WEIGHT_SUFFIXES)}")
        return "single-file"
    if (path / "model_index.json").is_file() or (path / "transformer" / "config.json").is_file():
        return "diffusers"  # a SAT folder has no config.json: its transformer/ holds `latest` and iterations
    if (path / "transformer").is_dir() and (path / "vae").is_dir():
        return "sat-pipeline"
    if (path / "latest").is_file() or any(path.glob("*/mp_rank_00_model_states.pt")):
        return "sat-transformer"
    raise ValueError(f"--model {spec}: not a Diffusers pipeline folder (model_index.json), a SAT checkpoint "
                     f"(transformer/ + vae/, or `latest` + <iteration>/mp_rank_00_model_states.pt) or a weights file")


# --- content digests ---------------------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not atomic.parse(p.name))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def source_digest(path: Path, extra) -> str:
    """sha256 over the source's files (relative path + content digest) and `extra` (converter version, settings);
    a file's digest is remembered by (path, size, mtime) in the cache root, so an unchanged source is not re-read."""
    memo_file = cache_root() / DIGESTS
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()), False
    for f in _files(path):
        st = f.stat()
        key, stamp = str(f.resolve()), [st.st_size, st.st_mtime_ns]
        if memo.get(key, {}).get("stamp") != stamp:
            memo[key], changed = {"stamp": stamp, "sha256": file_sha256(f)}, True
        rel = f.name if path.is_file() else str(f.relative_to(path))
        h.update(f"{rel}\0{memo[key]['sha256']}\n".encode())
    if changed:
        try:
            atomic.write_json(memo_file, memo)
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return h.hexdigest()


def _manifest(entry: Path) -> dict:
    return {str(f.relative_to(entry)): file_sha256(f) for f in _files(entry) if f.name != MANIFEST}


def verify_entry(entry: Path) -> str | None:
    """None when every converted file of the entry (the folders the manifest lists, and model_index.json) has the
    sha256 its manifest records, none missing and none added; else what differs. The base's linked components are
    the base's own files and are not hashed again."""
    try:
        recorded = json.loads((entry / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{entry / MANIFEST} missing or unreadable"
    parts = {name.split("/")[0] for name in recorded if "/" in name}
    actual = {name: digest for name, digest in _manifest(entry).items()
              if name.split("/")[0] in parts or name in recorded}
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            what = "missing" if name not in actual else "not in the manifest" if name not in recorded else "changed"
            return f"{entry / name} {what}"
    return None


# --- the base: what a transformer-only source lacks ------------------------------------------------------------


def _sat_transformer_config(path: Path) -> dict:
    body, _ = split_sat(open_state_dict(path, master_weights=False))
    shapes = {k.replace(".original.", "."): tuple(v.shape) for k, v in body.items() if not is_lora_key(k)}
    return transformer_config(shapes, path)


def _diffusers_keys_config(state: dict, path: Path) -> dict:
    """A transformer config from a Diffusers-key state dict's shapes (through the SAT mapping's shape rules). What
    shapes cannot say: 3D sin-cos positions (hidden 1920, CogVideoX-2B) or RoPE (every other size)."""
    learned = "patch_embed.pos_embedding" in state
    slots, _ = TRANSFORMER.to_sat(list(state), {"use_learned_positional_embeddings": learned})
    shapes = {}
    for sat_name, pieces in slots.items():
        first = tuple(state[pieces[0].source].shape)
        rows = sum(state[p.source].shape[0] // p.count for p in pieces) if len(first) else 0
        shapes[sat_name] = (rows, *first[1:]) if first else first
    if not learned:
        hidden = shapes["mixins.patch_embed.proj.weight"][0]
        if hidden != family.VARIANTS["2b"].hidden:
            shapes["mixins.pos_embed.freqs_sin"] = (1,)  # marks RoPE for the detection rules
    config = transformer_config(shapes, path)
    config["use_rotary_positional_embeddings"] = learned or "mixins.pos_embed.freqs_sin" in shapes or \
        config["patch_size_t"] is not None
    return config


def _is_diffusers_file(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    return any(k.startswith(("transformer_blocks.", "patch_embed.")) for k in read_safetensors(path)[0])


def _native_file_config(path: Path) -> dict | None:
    """The Diffusers config of a single file in ComfyUI core's native keys (cogpipe.convert.detect.native_config);
    None for any other file."""
    if path.suffix != ".safetensors":
        return None
    tensors, metadata = read_safetensors(path)
    prefix = native_prefix(tensors)
    if prefix is None:
        return None
    return native_config({k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)},
                         metadata, path)


def hub_download_command() -> str:
    """The download command of the installed huggingface_hub: `hf download` (its CLI since 0.34; 1.0 dropped
    `huggingface-cli`), else `huggingface-cli download`."""
    from importlib import metadata

    try:
        entries = metadata.distribution("huggingface_hub").entry_points
        scripts = {e.name for e in entries if e.group == "console_scripts"}
    except metadata.PackageNotFoundError:
        scripts = set()
    return "hf download" if "hf" in scripts or not scripts else "huggingface-cli download"


def _base_for(spec: str, config: dict, base: str | None, what: str) -> tuple[str, dict]:
    """(base, {"transformer": {...}, "vae": {...}} config values taken from it): `base`, else the released model of
    the source's version."""
    if base is None:
        kind = (family.version(config), family.is_i2v(config))
        same = [v for v in family.VARIANTS.values() if v.released and (v.version, v.i2v) == kind]
        # the same hidden size, else the same position encoding (3D sin-cos: 2B, RoPE: 5B)
        v = next((v for v in same if v.hidden == family.hidden_size(config)), None) or next(
            (v for v in same if bool(v.transformer.get("use_rotary_positional_embeddings")) ==
             bool(config.get("use_rotary_positional_embeddings"))), same[0])
        base, title = v.hub_id, v.title
    else:
        title = base
    try:
        base_config = models.read_component_config(base, "transformer")
        base_vae = models.read_component_config(base, "vae")
    except Exception as e:  # offline and not cached, or not a pipeline folder
        raise FileNotFoundError(
            f"--model {spec}: {what}; the rest of the pipeline (VAE, T5 text encoder, tokenizer, scheduler) comes "
            f"from {title} ({base}), which cannot be read here ({type(e).__name__}: {str(e)[:200]}). Download it "
            f"once while online ({hub_download_command()} {base}) or pass --base PATH, a CogVideoX pipeline folder "
            f"of the same version") from None
    same = (family.version(base_config), family.is_i2v(base_config)) == (family.version(config),
                                                                         family.is_i2v(config))
    if not same:
        return base, {"transformer": {}, "vae": {}}
    return base, {part: {k: c[k] for k in FROM_BASE[part] if k in c}
                  for part, c in (("transformer", base_config), ("vae", base_vae))}


# --- resolve -----------------------------------------------------------------------------------------------------


def resolve(spec, base: str | None = None, log=print) -> Source:
    """The pipeline parts of `spec` (see the module docstring), converting a non-Diffusers source into the cache
    once; later calls verify the entry and reuse it."""
    spec = str(spec)
    kind = kind_of(spec)
    if kind in ("diffusers", "hub"):
        return Source(spec, kind, str(Path(spec).expanduser()) if kind == "diffusers" else spec)
    path = Path(spec).expanduser().resolve()
    native = _native_file_config(path) if kind == "single-file" else None
    diffusers_file = native is None and kind == "single-file" and _is_diffusers_file(path)
    if native is not None:
        config = native
    elif diffusers_file:
        lazy = open_state_dict(path)
        config = _diffusers_keys_config({k: v for k, v in lazy.items()}, path)
    else:
        config = _sat_transformer_config(path / "transformer" if kind == "sat-pipeline" else path)
    what = "a SAT checkpoint holds the transformer and VAE" if kind == "sat-pipeline" else \
        "a transformer checkpoint holds the transformer alone"
    base, overrides = _base_for(spec, config, base, what)
    digest = source_digest(path, [kind, CONVERTER_VERSION, overrides, base])
    entry = cache_root() / digest[:32]
    if entry.is_dir():
        problem = verify_entry(entry)
        if problem is None:
            return Source(spec, kind, str(entry), entry)
        log(f"refusing the cached conversion of {spec}: {problem}; converting it again")
        shutil.rmtree(entry, ignore_errors=True)
    _convert(path, "comfyui-file" if native is not None else kind, entry, config, overrides, diffusers_file, base,
             log)
    return Source(spec, kind, str(entry), entry, converted=True)


def _convert(path: Path, kind: str, entry: Path, config: dict, overrides: dict, diffusers_file: bool, base: str,
             log) -> None:
    """Convert the source's parts into `entry` (atomically), link the base's other components beside them and
    write the manifest of what was converted."""
    global conversions
    conversions += 1
    log(f"converting {path} into the checkpoint cache ({entry}); later loads reuse it")
    entry.parent.mkdir(parents=True, exist_ok=True)
    atomic.sweep(entry.parent, entry.name)
    o = Options(transformer_config=overrides["transformer"], vae_config=overrides["vae"])
    with atomic.folder(entry) as tmp:
        if diffusers_file:
            _link_transformer(path, tmp / "transformer", {**config, **overrides["transformer"]})
        elif kind == "comfyui-file":
            comfyui_transformer(path, tmp / "transformer", o)
        else:
            sat_transformer(path / "transformer" if kind == "sat-pipeline" else path, tmp / "transformer", o)
        if kind == "sat-pipeline":
            vae_dir = path / "vae"
            vae_file = next((f for f in sorted(vae_dir.iterdir()) if f.suffix in WEIGHT_SUFFIXES), vae_dir)
            fam = family.family_values(config)
            sat_vae(vae_file, tmp / "vae", o, family={k: fam[k] for k in ("scaling_factor", "invert_scale_latents")})
        converted = _manifest(tmp)
        base_folder = models.pretrained_folder(base)
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            if not (tmp / part).exists() and (base_folder / part).is_dir():
                paths.link_or_copy_tree(base_folder / part, tmp / part)
        index = json.loads((base_folder / "model_index.json").read_text())
        index["_class_name"] = "CogVideoXImageToVideoPipeline" if family.is_i2v(config) else "CogVideoXPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        converted["model_index.json"] = file_sha256(tmp / "model_index.json")
        atomic.write_json(tmp / MANIFEST, {"source": str(path), "kind": kind, "base": base,
                                           "converter": CONVERTER_VERSION, "overrides": overrides,
                                           "files": converted}, indent=2)


def _link_transformer(file: Path, dst: Path, config: dict) -> None:
    """A Diffusers transformer folder around a single weights file: its config.json and the file (hard-linked
    where the file system allows, else copied)."""
    _, config_json = expected_shapes("CogVideoXTransformer3DModel", config)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(config_json)
    target = dst / "diffusion_pytorch_model.safetensors"
    try:
        os.link(file, target)
    except OSError:
        shutil.copy2(file, target)
