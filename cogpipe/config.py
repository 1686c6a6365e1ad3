"""The training config: a dataclass schema merged with a YAML recipe and key=value overrides.

    cfg = load_config("configs/tiny_lora.yaml", ["train.max_steps=20"])

`OmegaConf.structured(Config)` gives the schema (a typo'd key or a wrong type fails there), then
`OmegaConf.to_object` builds the dataclasses so every `__post_init__` check runs once on the final
values. Checks that need the model (channels, frame and size rules) run in `validate_model()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cogpipe import atomic, family, model_sources
from cogpipe.family import frame_rule  # noqa: F401 (config.frame_rule stays importable)
from cogpipe.models import component_configs
from cogpipe.sequence_parallel import problem

# A field holding a file or folder path (or a list of them) carries metadata {"path": True}: the web page guards every
# such field, found from the schema (cogpipe.ui.safety.path_fields). "hub_id": True: a value may also be a hub id
# (model_sources.is_hub_id); "keywords": values that are no path (train.resume_from=latest).


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the key."""


def ensure(ok: bool, key: str, message: str) -> None:
    """ConfigError naming `key` unless `ok` (every schema rule; world/vae.py's too)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value, choices, key: str) -> None:
    ensure(value in choices, key, f"must be one of {sorted(choices)}, got {value!r}")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | 2b | 5b | 5b-i2v | 1.5-5b | 1.5-5b-i2v | ... (the table in cogpipe/family.py)
    # Diffusers folder, hub id, SAT checkpoint, single-file transformer; None: the preset
    pretrained: Optional[str] = field(default=None, metadata={"path": True, "hub_id": True})
    # SAT/single-file pretrained: where VAE, T5, tokenizer come from (a folder or hub id; default: the released)
    base: Optional[str] = field(default=None, metadata={"path": True, "hub_id": True})
    latent_input: bool = True  # the transformer trains on VAE latents, never on RGB frames
    init_seed: int = 0  # seed of a preset's random initialisation
    weight_dtype: str = "fp32"  # storage dtype of frozen weights: fp32 | fp16 | bf16
    vae_slicing: bool = False  # encode/decode one clip of a batch at a time
    vae_tiling: bool = False  # encode/decode in spatial tiles (large resolutions)
    fp8_frozen: bool = False  # store frozen transformer weights in fp8 (e4m3), compute in weight_dtype
    quantize_frozen: str = "none"  # none | int8: frozen block Linears stored int8 + a scale a row (torchao)

    def __post_init__(self):
        ensure(
            self.latent_input,
            "model.latent_input",
            "must be true. The CogVideoX transformer takes 16-channel VAE latents (32 for image-to-video), "
            "not 3-channel RGB frames: RGB frames are encoded by the VAE first (online or into the latent "
            "cache), so there is no RGB-input mode.",
        )
        _one_of(self.weight_dtype, set(family.DTYPES), "model.weight_dtype")
        ensure(not (self.fp8_frozen and self.weight_dtype == "fp32"), "model.fp8_frozen",
               "computes in model.weight_dtype: set model.weight_dtype=bf16 (or fp16) with it")
        _one_of(self.quantize_frozen, {"none", "int8"}, "model.quantize_frozen")
        ensure(not (self.fp8_frozen and self.quantize_frozen != "none"), "model.quantize_frozen",
               "and model.fp8_frozen both set the frozen weights' storage: choose one")
        if self.pretrained is None:
            _one_of(self.preset, set(family.VARIANTS), "model.preset")


@dataclass
class DataConfig:
    # dataset folder (prompts.txt + videos.txt, captioned videos, or metadata)
    root: Optional[str] = field(default=None, metadata={"path": True})
    # a latent store (cogpipe data encode): a folder or an fsspec URL (s3://...); trained from instead of data.root
    store: Optional[str] = field(default=None, metadata={"path": True})
    store_options: dict = field(default_factory=dict)  # fsspec storage options of data.store (endpoint, credentials)
    store_cache_dir: Optional[str] = field(default=None, metadata={"path": True})  # this machine's shard cache
    store_cache_bytes: int = 32 * 1024**3  # the shard cache's size limit (least recently used shards evicted)
    frames: int = 17
    height: int = 64
    width: int = 64
    cache_dir: Optional[str] = field(default=None, metadata={"path": True})  # default <data.root>/.cogpipe_cache
    skip_bad: bool = False  # false: refuse to train on a dataset with bad clips; true: warn, skip, count
    image_noise_variants: int = 4  # image-to-video: cached noisy encodings of each first frame
    # clips of one shape in one VAE forward while encoding (folder cache and `cogpipe data encode`); above 1, short
    # batches are filled so a clip's bits never depend on its neighbours (not with model.vae_slicing)
    encode_batch: int = 1
    buckets: list[list[int]] = field(default_factory=list)  # [[frames, height, width], ...]; [] = the one above
    num_workers: Optional[int] = None  # DataLoader workers reading cached latents; None: 4 beside a GPU, 0 on a CPU

    def __post_init__(self):
        ensure(self.store_cache_bytes > 0, "data.store_cache_bytes", f"must be positive, got {self.store_cache_bytes}")
        ensure(self.frames >= 1, "data.frames", f"must be positive, got {self.frames}")
        ensure(self.image_noise_variants >= 1, "data.image_noise_variants", "must be >= 1")
        ensure(self.encode_batch >= 1, "data.encode_batch", f"must be >= 1, got {self.encode_batch}")
        for i, b in enumerate(self.buckets):
            ensure(len(b) == 3 and b[0] >= 1, f"data.buckets[{i}]", f"must be [frames, height, width], got {list(b)}")
            ensure(b[1] % family.SIZE_MULTIPLE == 0 and b[2] % family.SIZE_MULTIPLE == 0 and min(b[1:]) > 0,
                   f"data.buckets[{i}]", f"height and width must be positive multiples of {family.SIZE_MULTIPLE}, "
                   f"got {list(b)}")
        for key in ("height", "width"):
            value = getattr(self, key)
            ensure(value > 0 and value % family.SIZE_MULTIPLE == 0, f"data.{key}",
                   f"must be a positive multiple of {family.SIZE_MULTIPLE} (VAE {family.VAE_SPATIAL}x times patch "
                   f"{family.PATCH}), got {value}")


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self):
        ensure(self.rank > 0, "lora.rank", f"must be positive, got {self.rank}")
        ensure(self.alpha > 0, "lora.alpha", f"must be positive, got {self.alpha}")
        ensure(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


@dataclass
class TrainConfig:
    mode: str = "lora"  # lora | full
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "cosine_with_restarts"  # any diffusers.optimization scheduler name
    warmup_steps: int = 0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 42
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only the final one
    checkpoints_total_limit: Optional[int] = None
    # latest | PATH to a checkpoint folder
    resume_from: Optional[str] = field(default=None, metadata={"path": True, "keywords": ("latest",)})
    overwrite: bool = False  # a fresh start into a used output_dir moves the old run aside (else it is refused)
    log_every: int = 10  # steps between the host's looks at the device: loss log, skipped steps, stop signals
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops (each such step is skipped)
    caption_dropout: float = 0.0  # probability of training on the empty prompt (classifier-free guidance)
    timestep_sampling: str = "uniform"  # uniform | logit_normal (t/T = sigmoid(N(mean, std)))
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    ema_decay: float = 0.0  # > 0 keeps an EMA of the trained weights, saved and exported instead of them
    collective_timeout_min: int = 120  # how long a process waits at a barrier (caching, validation, saves)
    cpu_threads: int = 0  # on a CPU: threads a process; 0 = every core, shared among the machine's processes
    compile: bool = False  # torch.compile each transformer block (regional: one compile serves every block)
    sequence_parallel: int = 1  # N processes share each sample (Ulysses; cogpipe/sequence_parallel.py); world = DP x N
    blocks_to_swap: int = 0  # frozen weights of this many blocks in host memory, fetched ahead of use (offload.py)
    activation_offload: bool = False  # the block inputs gradient checkpointing keeps, in host memory

    def __post_init__(self):
        if self.mixed_precision in ("False", "false"):  # `train.mixed_precision=no` reads as YAML false
            self.mixed_precision = "no"
        _one_of(self.mode, {"lora", "full"}, "train.mode")
        _one_of(self.mixed_precision, {"no", "fp16", "bf16"}, "train.mixed_precision")
        for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
            ensure(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        ensure(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        ensure(0.0 <= self.caption_dropout < 1.0, "train.caption_dropout", "must be in [0, 1)")
        _one_of(self.timestep_sampling, {"uniform", "logit_normal"}, "train.timestep_sampling")
        ensure(self.timestep_logit_std > 0, "train.timestep_logit_std", "must be positive")
        ensure(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1); 0 turns the EMA off")
        _one_of(self.optimizer, {"adamw", "adamw8bit"}, "train.optimizer")
        ensure(self.cpu_threads >= 0, "train.cpu_threads", "must be >= 0 (0: every core)")
        ensure(self.sequence_parallel >= 1, "train.sequence_parallel", f"must be >= 1, got {self.sequence_parallel}")
        ensure(self.blocks_to_swap >= 0, "train.blocks_to_swap", f"must be >= 0, got {self.blocks_to_swap}")
        for key in ("blocks_to_swap", "activation_offload"):
            ensure(not getattr(self, key) or self.gradient_checkpointing, f"train.{key}",
                   "needs train.gradient_checkpointing=true (the backward runs each block again, from what was "
                   "kept of its inputs)")
        ensure(not self.blocks_to_swap or self.mode == "lora", "train.blocks_to_swap",
               "swaps frozen weights: it needs train.mode=lora (a full fine-tune trains every weight)")
        ensure(not (self.blocks_to_swap and self.compile), "train.blocks_to_swap",
               "swaps weights in hooks around each block: it does not combine with train.compile")
        ensure(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        ensure(len(self.adam_betas) == 2, "train.adam_betas", "must hold two numbers")
        ensure(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               "train.checkpoints_total_limit", "must be >= 1 or null")
        from diffusers.optimization import SchedulerType

        _one_of(self.lr_scheduler, {s.value for s in SchedulerType}, "train.lr_scheduler")


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)  # generated at the end (and every `every` steps)
    # image-to-video first frames; default: a dataset clip's
    images: list[str] = field(default_factory=list, metadata={"path": True})
    every: int = 0  # optimizer steps between validations; 0 = only after training
    steps: int = 50
    guidance: float = 6.0
    seed: int = 0
    fps: int = 8
    # fast generation, as infer.py's switches (cogpipe/inference/speed.py, docs/inference.md): the step cache and
    # its threshold (None: the method's recommended), regional compilation, the attention kernel, a teacache-fit JSON
    cache: str = "none"  # none | fbc | pab | fastercache | teacache | magcache | taylorseer
    cache_threshold: Optional[float] = None
    compile: bool = False
    attention: str = "sdpa"  # sdpa | sage
    teacache_coefficients: Optional[str] = field(default=None, metadata={"path": True})

    def __post_init__(self):
        from cogpipe.attention import kernel_problem
        from cogpipe.inference.speed import CACHES, check

        _one_of(self.cache, set(CACHES), "validation.cache")
        _one_of(self.attention, {"sdpa", "sage"}, "validation.attention")
        try:
            check(self.speed())
        except (ValueError, FileNotFoundError) as e:
            key = "validation.attention" if kernel_problem(self.attention) else \
                "validation.teacache_coefficients" if "--teacache-coefficients" in str(e) or "magcache" in str(e) \
                else "validation.cache_threshold"
            message = str(e).removeprefix("--cache-threshold: ").replace("--cache-threshold", key)
            raise ConfigError(f"{key}: {message}") from None

    def speed(self):
        """The validation renders' cogpipe.inference.speed.Speed."""
        from cogpipe.inference.speed import Speed

        return Speed(self.cache, self.cache_threshold, self.compile, self.attention, self.teacache_coefficients)


@dataclass
class ExportConfig:
    # a LoRA run on a pretrained base (a folder or hub id): copy the base into <output_dir>/export/ beside the
    # LoRA (true), or leave the LoRA alone as the output (false; load it onto the base, see the README)
    copy_base: bool = True


@dataclass
class Config:
    output_dir: str = field(default=MISSING, metadata={"path": True})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report_to: str = "wandb"  # wandb | tensorboard | none
    wandb_mode: str = "offline"  # offline | online | disabled (the WANDB_MODE environment variable wins)
    wandb_project: str = "cogpipe"

    def __post_init__(self):
        _one_of(self.report_to, {"wandb", "tensorboard", "none"}, "report_to")
        _one_of(self.wandb_mode, {"offline", "online", "disabled"}, "wandb_mode")


def merge_structured(schema, path=None, overrides=()):
    """An instance of the dataclass `schema`: its defaults, then the YAML at `path`, then `key=value` overrides.
    Unknown keys, wrong types, failed checks and missing values are a ConfigError naming the key."""
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required value missing" + (f" in {path}" if path else ""))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        source = f" ({path})" if path else ""
        message = str(e.msg if hasattr(e, "msg") else e).split("\n    full_key:")[0]  # the key is said first
        raise ConfigError(f"{key or 'config'}: {message}{source}") from None


def _recipe_relative(value: str | None, recipe) -> str | None:
    """A relative path in a recipe that does not exist from the current folder, but does from the checkout the
    recipe lives in (the folder above its configs/), as the shipped recipes' models/tiny-world and data/tiny do
    when a run starts elsewhere: that path. Anything else (hub ids included) is left as written."""
    if not value or recipe is None or Path(value).is_absolute() or Path(value).expanduser().exists():
        return value
    for root in Path(recipe).resolve().parents:
        if (root / "configs").is_dir():
            candidate = root / value
            return str(candidate) if candidate.exists() else value
    return value


def _converted(pretrained: str | None, base: str | None) -> str | None:
    """A SAT checkpoint or single-file transformer in model.pretrained -> its converted pipeline folder in the
    checkpoint cache (cogpipe.model_sources: converted once, verified on every later load)."""
    if not pretrained or not Path(pretrained).expanduser().exists():
        return pretrained
    try:
        if model_sources.kind_of(pretrained) == "diffusers":
            return pretrained
        return model_sources.resolve(pretrained, base=base).folder
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model.pretrained: {e}".replace("--model ", "").replace("--base", "model.base")) from None


def load_config(path=None, overrides=(), validate_model: bool = True) -> Config:
    """Merge the schema defaults, the YAML at `path` and `key=value` overrides; validate."""
    config = merge_structured(Config, path, overrides)
    config.model.pretrained = _recipe_relative(config.model.pretrained, path)
    config.model.pretrained = _converted(config.model.pretrained, config.model.base)
    config.data.root = _recipe_relative(config.data.root, path)
    ensure(bool(config.data.root or config.data.store), "data.root",
           "required value missing: a dataset folder (or data.store: a latent store)" + (f" in {path}" if path else ""))
    if validate_model:
        validate_against_model(config)
    ensure(not (config.model.fp8_frozen and config.train.mode != "lora"), "model.fp8_frozen",
           "stores frozen weights in fp8: it needs train.mode=lora (full fine-tuning trains every weight)")
    ensure(config.model.quantize_frozen == "none" or config.train.mode == "lora", "model.quantize_frozen",
           "stores frozen weights in int8: it needs train.mode=lora (full fine-tuning trains every weight)")
    return config


def add_recipe_arguments(parser, example: str = "configs/tiny_lora.yaml") -> None:
    """The command-line form every recipe command shares: --config FILE [key=value ...]."""
    parser.add_argument("--config", required=True, help=f"a YAML recipe, e.g. {example}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.max_steps=10")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Config, path) -> None:
    atomic.write_text(path, to_yaml(cfg))


def validate_against_model(cfg: Config) -> None:
    """Cross-field rules that need the model's configs: channels, frames and size (cogpipe/family.py)."""
    transformer_config, vcfg = component_configs(cfg.model)
    problem = family.channel_problem(transformer_config, vcfg)
    ensure(problem is None, "model", problem)
    shapes = [("data.frames", "data.height/width", (cfg.data.frames, cfg.data.height, cfg.data.width))]
    shapes += [(f"data.buckets[{i}]", f"data.buckets[{i}]", tuple(b)) for i, b in enumerate(cfg.data.buckets)]
    for frames_key, size_key, (frames, height, width) in shapes:
        for part, message in family.shape_problems(transformer_config, frames, height, width):
            raise ConfigError(f"{frames_key if part == 'frames' else size_key}: {message}")
    _check_sequence_parallel(cfg.train.sequence_parallel, transformer_config)


def launched_world_size() -> Optional[int]:
    """The process count of the launch this config loads in (WORLD_SIZE, set by accelerate launch and torchrun);
    None outside a launcher."""
    return int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None


def _check_sequence_parallel(sp: int, transformer_config: dict) -> None:
    """train.sequence_parallel divides the attention heads and the launched process count. A video token count that
    does not divide by it needs no rule: the tokens are padded to a multiple and the padding never attends."""
    message = problem(sp, transformer_config["num_attention_heads"], launched_world_size())
    ensure(message is None, "train.sequence_parallel", message)
