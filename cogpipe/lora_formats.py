"""LoRA files in the key formats people use for CogVideoX, read into one form and written for other tools.

    read_lora(path, module_names) -> LoraWeights    any format in: diffusers, peft, SAT, ComfyUI (kohya) keys
    comfyui_state_dict(lora) -> {key: tensor}        the keys ComfyUI-CogVideoXWrapper's merge_lora reads
    comfyui_native_state_dict(lora) -> {key: tensor} the keys ComfyUI core's LoRA loader reads (its native names)
    write_sat(diffusers_file, folder)                SAT lora2 (matrix_A/matrix_B), through cogpipe.convert

One form: `state` in diffusers keys (`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`, the tensors
unchanged) and `config`, the peft LoraConfig kwargs that give each module the scale its stored alpha says
(alpha / rank; rank_pattern / alpha_pattern where modules differ). Loading never bakes a scale into the weights,
so every format of the same LoRA gives the same video. The formats (docs/lora_formats.md):

    diffusers  transformer.<module>.lora_A.weight / lora_B.weight; alpha in the safetensors metadata
               (`lora_adapter_metadata`), else alpha = rank
    peft       base_model.model.<module>.lora_A[.default].weight, or <module>.lora_A.weight; alpha in
               adapter_config.json beside the file, else alpha = rank
    SAT        model.diffusion_model.transformer.layers.N.attention.query_key_value.matrix_A.{0,1,2} /
               matrix_B.{0,1,2} (q, k, v) and ….dense.matrix_A.0 / matrix_B.0 (to_out.0); a `latest` folder or a
               .pt; SAT's LoraMixin scales by lora_alpha / r with lora_alpha 1 unless configured: alpha 1
    ComfyUI    lora_unet_<module, dots as underscores>.lora_down.weight (A) / .lora_up.weight (B) / .alpha
               (ComfyUI-CogVideoXWrapper: Diffusers module names)
    ComfyUI-native  diffusion_model.<native module>.lora_down.weight / .lora_up.weight / .alpha, or
               lora_unet_<native module, dots as underscores>.…: ComfyUI core's own CogVideoX port's names
               (`blocks.N.q`, `blocks.N.attn_out`, `blocks.N.ff_proj`; cogpipe.convert.mapping.NATIVE_RULES)
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from cogpipe.convert import convert
from cogpipe.convert.detect import split_sat
from cogpipe.convert.mapping import LORA, diffusers_module, native_module
from cogpipe.family import LORA_FILE
from cogpipe.weights import materialize, open_state_dict

FORMATS = ("diffusers", "peft", "sat", "comfyui", "comfyui-native")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfig
COMFY_PREFIX = "lora_unet_"
NATIVE_PREFIX = "diffusion_model."  # ComfyUI core's own key for the model's weights
COMFY_PARTS = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "lora_A.weight": "lora_A",
               "lora_B.weight": "lora_B"}
SAT_LORA_ALPHA = 1.0  # SAT LoraMixin's default lora_alpha: what an unconfigured SAT run applies
PICKLES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoraWeights:
    """A LoRA in diffusers keys with the LoraConfig kwargs that reproduce its stored scale."""

    state: dict[str, torch.Tensor]
    config: dict
    format: str
    source: Path

    @property
    def modules(self) -> list[str]:
        return sorted(k[len("transformer."):-len(".lora_A.weight")] for k in self.state if k.endswith(".lora_A.weight"))

    def alpha(self, module: str) -> float:
        """The alpha that gives `module` its scale without rsLoRA (scale = alpha / rank)."""
        rank = self.state[f"transformer.{module}.lora_A.weight"].shape[0]
        alpha = _pattern(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", rank))
        if self.config.get("use_rslora"):
            alpha = alpha * rank ** 0.5  # rsLoRA scales by alpha / sqrt(rank)
        return float(alpha)


def _pattern(patterns: dict | None, module: str, default):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _config(a_shapes: dict[str, int], alphas: dict[str, float]) -> dict:
    """LoraConfig kwargs: the most common rank and alpha, patterns for the modules that differ."""
    rank = Counter(a_shapes.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return dict(r=rank, lora_alpha=alpha, target_modules=sorted(a_shapes),
                rank_pattern={m: r for m, r in a_shapes.items() if r != rank},
                alpha_pattern={m: a for m, a in alphas.items() if a != alpha})


# --- reading -----------------------------------------------------------------------------------------------------


def lora_file(path: Path) -> Path:
    """The weights file a LoRA path stands for: the file itself, or the one file of a LoRA folder."""
    if path.is_file():
        return path
    for name in (LORA_FILE, "adapter_model.safetensors"):
        if (path / name).is_file():
            return path / name
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    raise FileNotFoundError(f"--lora {path}: expected {LORA_FILE}, adapter_model.safetensors, one .safetensors "
                            f"file or a SAT LoRA folder (`latest`); found {[f.name for f in files] or 'none'}")


def _is_sat(path: Path) -> bool:
    return path.suffix in PICKLES or (path.is_dir() and ((path / "latest").is_file()
                                                         or any(path.glob("*/mp_rank_00_model_states.pt"))))


def read_lora(path, module_names=None) -> LoraWeights:
    """Read a LoRA in any of FORMATS. `module_names`: the transformer's module names (named_modules()), needed to
    undo the ComfyUI keys' dots-as-underscores."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--lora {path}: no such file or folder")
    if _is_sat(path):
        return _read_sat(path)
    file = lora_file(path)
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    meta = _file_metadata(file)
    if any(k.startswith(COMFY_PREFIX) for k in tensors):
        return _read_comfyui(file, tensors, module_names)
    if any(k.startswith(NATIVE_PREFIX) for k in tensors):
        return _read_native(file, tensors)
    state, fmt = {}, "diffusers"
    for k, v in tensors.items():
        name = k
        if name.startswith("base_model.model."):
            name, fmt = name[len("base_model.model."):], "peft"
        elif not name.startswith("transformer."):
            fmt = "peft"
        name = name.removeprefix("transformer.").replace(".default.", ".")
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise ValueError(f"--lora {file}: {k} is not a lora_A/lora_B weight of a CogVideoX transformer module "
                             f"(text-encoder LoRAs, DoRA and other adapters are not supported)")
        state[f"transformer.{name}"] = v
    config = _stored_config(file, meta, fmt)
    if config is None:  # no alpha stored: alpha = rank, what diffusers and peft assume
        ranks = {k[len("transformer."):-len(".lora_A.weight")]: v.shape[0] for k, v in state.items()
                 if k.endswith(".lora_A.weight")}
        config = _config(ranks, {m: float(r) for m, r in ranks.items()})
    return LoraWeights(state, config, fmt, file)


def _file_metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _stored_config(file: Path, meta: dict, fmt: str) -> dict | None:
    if METADATA_KEY in meta:
        config = json.loads(meta[METADATA_KEY])
        return {k.removeprefix("transformer."): v for k, v in config.items()}
    side = file.parent / "adapter_config.json"
    if fmt == "peft" and side.is_file():
        keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
        stored = json.loads(side.read_text())
        return {k: stored[k] for k in keys if k in stored}
    return None


def _gather(file: Path, parts: dict[str, tuple[str, str, torch.Tensor]], fmt: str) -> LoraWeights:
    """{key: (diffusers module, part, tensor)} with part lora_A / lora_B / alpha -> LoraWeights."""
    state, ranks, alphas = {}, {}, {}
    for k, (module, part, v) in parts.items():
        if part == "alpha":
            alphas[module] = float(v.item())
        else:
            state[f"transformer.{module}.{part}.weight"] = v
            if part == "lora_A":
                ranks[module] = v.shape[0]
    halves = [m for m in {k.split(".lora_")[0][len("transformer."):] for k in state}
              if f"transformer.{m}.lora_A.weight" not in state or f"transformer.{m}.lora_B.weight" not in state]
    if halves or set(alphas) - set(ranks):
        raise ValueError(f"--lora {file}: modules without both lora_down and lora_up: "
                         f"{sorted(set(halves) | (set(alphas) - set(ranks)))[:8]}")
    return LoraWeights(state, _config(ranks, {m: alphas.get(m, float(r)) for m, r in ranks.items()}), fmt, file)


def _read_comfyui(file: Path, tensors: dict, module_names) -> LoraWeights:
    """lora_unet_ keys: the wrapper's (Diffusers module names) or ComfyUI core's (native names), dots as _."""
    if module_names is None:
        raise ValueError(f"--lora {file}: ComfyUI keys name modules with underscores; reading them needs the "
                         f"transformer's module names")
    flat = {n.replace(".", "_"): (n, "comfyui") for n in module_names}
    flat.update({native.replace(".", "_"): (n, "comfyui-native") for n in module_names
                 if (native := native_module(n)) is not None and native.replace(".", "_") not in flat})
    parts, unknown, formats = {}, [], set()
    for k, v in tensors.items():
        layer, _, elem = k[len(COMFY_PREFIX):].partition(".")
        module, fmt = flat.get(layer, (None, None))
        part = "alpha" if elem == "alpha" else COMFY_PARTS.get(elem)
        if not k.startswith(COMFY_PREFIX) or module is None or part is None:
            unknown.append(k)
            continue
        parts[k] = (module, part, v)
        formats.add(fmt)
    if unknown:
        raise ValueError(f"--lora {file}: {len(unknown)} keys name no module of this transformer (or are not "
                         f"lora_down/lora_up/alpha): {unknown[:8]}")
    return _gather(file, parts, "comfyui-native" if formats == {"comfyui-native"} else "comfyui")


def _read_native(file: Path, tensors: dict) -> LoraWeights:
    """diffusion_model.<native module>.lora_down.weight / .lora_up.weight / .alpha (ComfyUI core's names)."""
    parts, unknown = {}, []
    for k, v in tensors.items():
        body = k[len(NATIVE_PREFIX):] if k.startswith(NATIVE_PREFIX) else None
        native, part = None, None
        if body is not None:
            for elem, name in (*COMFY_PARTS.items(), ("alpha", "alpha")):
                if body.endswith("." + elem):
                    native, part = body[:-len(elem) - 1], name
                    break
        module = diffusers_module(native) if native else None
        if module is None:
            unknown.append(k)
        else:
            parts[k] = (module, part, v)
    if unknown:
        raise ValueError(f"--lora {file}: {len(unknown)} keys are not LoRA tensors (lora_down/lora_up/alpha) of a "
                         f"module of ComfyUI core's CogVideoX port: {unknown[:8]}")
    return _gather(file, parts, "comfyui-native")


def _read_sat(path: Path) -> LoraWeights:
    body, _ = split_sat(open_state_dict(path, master_weights=False))
    state, ranks = {}, {}
    for k, v in body.items():
        if ".matrix_A." not in k and ".matrix_B." not in k:
            continue  # base weights of a SAT save that carries its LoRA inline
        kind, res = LORA.to_diffusers(k)
        if kind != "map":
            raise ValueError(f"--lora {path}: {k} is outside SAT lora2's attention query_key_value/dense")
        name = res[0][0]
        state[f"transformer.{name}"] = materialize(v)
        if name.endswith(".lora_A.weight"):
            ranks[name[:-len(".lora_A.weight")]] = v.shape[0]
    if not state:
        raise ValueError(f"--lora {path}: a SAT checkpoint without matrix_A/matrix_B LoRA tensors")
    return LoraWeights(state, _config(ranks, {m: SAT_LORA_ALPHA for m in ranks}), "sat", path)


# --- writing -----------------------------------------------------------------------------------------------------


def comfyui_state_dict(lora: LoraWeights) -> dict[str, torch.Tensor]:
    """kohya/ComfyUI keys: lora_unet_<module>.lora_down.weight = A, .lora_up.weight = B, .alpha (fp32 scalar), the
    scale alpha / rank that ComfyUI-CogVideoXWrapper's merge_lora and ComfyUI's load_lora apply."""
    out = {}
    for module in lora.modules:
        key = COMFY_PREFIX + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = lora.state[f"transformer.{module}.lora_A.weight"]
        out[f"{key}.lora_up.weight"] = lora.state[f"transformer.{module}.lora_B.weight"]
        out[f"{key}.alpha"] = torch.tensor(lora.alpha(module), dtype=torch.float32)
    return out


def comfyui_native_state_dict(lora: LoraWeights) -> dict[str, torch.Tensor]:
    """ComfyUI core's keys: diffusion_model.<native module>.lora_down.weight = A, .lora_up.weight = B, .alpha (fp32
    scalar), the names its model_lora_keys_unet accepts for its own CogVideoX port (scale alpha / rank, as
    comfyui_state_dict). A module the port has no name for is an error naming it."""
    names = {m: native_module(m) for m in lora.modules}
    missing = [m for m, n in names.items() if n is None]
    if missing:
        raise ValueError(f"{lora.source}: modules with no ComfyUI-native name: {missing[:8]}")
    out = {}
    for module, native in names.items():
        key = NATIVE_PREFIX + native
        out[f"{key}.lora_down.weight"] = lora.state[f"transformer.{module}.lora_A.weight"]
        out[f"{key}.lora_up.weight"] = lora.state[f"transformer.{module}.lora_B.weight"]
        out[f"{key}.alpha"] = torch.tensor(lora.alpha(module), dtype=torch.float32)
    return out


def write_sat(diffusers_file: Path, folder: Path) -> Path:
    """The LoRA in SAT lora2 keys (`folder/latest`, `folder/1/mp_rank_00_model_states.pt`), scaled for SAT's default
    lora_alpha 1 (cogpipe.convert; only attention q, k, v and to_out.0 LoRAs have a SAT form)."""
    convert(diffusers_file, folder, sat_lora_alpha=SAT_LORA_ALPHA)
    return folder


def load_into(pipe, loras, scales, adapter_prefix: str = "lora") -> list[LoraWeights]:
    """Load each LoRA (any format) into pipe.transformer as its own adapter at its stored scale, then activate them
    with `scales` (the user's multipliers)."""
    names = [n for n, _ in pipe.transformer.named_modules()]
    read, adapters = [], []
    for i, path in enumerate(loras):
        lora = read_lora(path, names)
        name = f"{adapter_prefix}{i}" if len(loras) > 1 else adapter_prefix
        pipe.load_lora_into_transformer(lora.state, transformer=pipe.transformer, adapter_name=name, _pipeline=pipe,
                                        metadata={f"transformer.{k}": v for k, v in lora.config.items()})
        read.append(lora)
        adapters.append(name)
    pipe.set_adapters(adapters, list(scales))
    return read
