"""cogpipe plan: the activation formula against what autograd really saves, the ordering of estimates, the
fit advice, the command line, public numbers, and measured GPU peaks where bench/results/ has them."""

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cogpipe import plan
from cogpipe.cli import main as cli_main
from cogpipe.config import load_config

from helpers import REPO  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe(name, *overrides):
    """A shipped recipe as `cogpipe plan` reads it (the hub id falls back to the preset offline)."""
    cfg, transformer_config, note = plan.load(REPO / "configs" / f"{name}.yaml", list(overrides))
    return cfg, transformer_config


def gb(name, *overrides, **kw):
    cfg, transformer_config = recipe(name, *overrides)
    return plan.estimate(cfg, transformer_config=transformer_config, **kw)["gb"]


# --- the per-block activation formula against autograd's saved tensors --------------------------------------

def _small_transformer_config(frames_latent, h, w, text, heads=4, layers=3):
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.models import _with_defaults

    return _with_defaults(CogVideoXTransformer3DModel, dict(
        num_attention_heads=heads, attention_head_dim=64, num_layers=layers, time_embed_dim=64, text_embed_dim=64,
        sample_height=h, sample_width=w, sample_frames=(frames_latent - 1) * 4 + 1, max_text_seq_length=text,
        use_rotary_positional_embeddings=True))


def saved_bytes(transformer_config, mode, checkpointing=False, precision="bf16"):
    """Bytes of the tensors autograd saves for backward, per block (and outside the blocks), under CPU bf16
    autocast (or in fp32 with precision "no"); weights and their autocast copies (parameter-shaped) are
    left out: the formula counts them apart."""
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.config import LoraConfig
    from cogpipe.diffusion import rotary_embeddings
    from cogpipe.lora import add_lora

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**transformer_config)
    half = precision == "bf16"
    if mode == "lora":
        if half:
            model.to(torch.bfloat16)
        add_lora(model, LoraConfig(rank=8, alpha=8))
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    param_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    where, seen = ["outside"], {}
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))

    def pack(t):
        if tuple(t.shape) not in param_shapes:
            seen.setdefault(t.untyped_storage().data_ptr(), (where[0], t.untyped_storage().nbytes()))
        return t

    F = (transformer_config["sample_frames"] - 1) // 4 + 1
    h, w = transformer_config["sample_height"], transformer_config["sample_width"]
    dtype = torch.bfloat16 if (mode == "lora" and half) else torch.float32
    x = torch.randn(1, F, 16, h, w, dtype=dtype)
    text = torch.randn(1, transformer_config["max_text_seq_length"], transformer_config["text_embed_dim"], dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=half):
        model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]),
              image_rotary_emb=rotary_embeddings(transformer_config, F, h, w, "cpu"), return_dict=False)
    per = {}
    for place, nbytes in seen.values():
        per[place] = per.get(place, 0) + nbytes
    return per


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("precision", ["bf16", "no"])
@pytest.mark.parametrize("grid", [(5, 16, 16, 32), (9, 16, 24, 64)])
def test_block_activation_formula_matches_autograd(mode, precision, grid):
    transformer_config = _small_transformer_config(*grid)
    shape = plan.token_shape(transformer_config, transformer_config["sample_frames"],
                             transformer_config["sample_height"] * 8, transformer_config["sample_width"] * 8)
    policy = plan.precision_policy(precision, device="cpu")  # CPU autocast keeps LayerNorm in bf16
    formula = sum(plan.block_activations(transformer_config, shape, mode, policy, 8, TARGETS).values())
    measured = saved_bytes(transformer_config, mode, precision=precision)
    for block in (1, 2):  # block 0 also holds what all blocks share (the RoPE tables): counted outside
        assert measured[block] == pytest.approx(formula, rel=0.03), (block, measured[block], formula)
    total = sum(measured.values())
    outside = plan.outside_activations(transformer_config, shape, mode, policy, loss=False)
    assert total == pytest.approx(transformer_config["num_layers"] * formula + outside, rel=0.05)


def test_checkpointing_keeps_only_each_blocks_inputs():
    transformer_config = _small_transformer_config(5, 16, 16, 32)
    shape = plan.token_shape(transformer_config, transformer_config["sample_frames"],
                             transformer_config["sample_height"] * 8, transformer_config["sample_width"] * 8)
    plain = saved_bytes(transformer_config, "lora")
    ckpt = saved_bytes(transformer_config, "lora", checkpointing=True)
    assert not any(isinstance(k, int) for k in ckpt)  # nothing saved inside a block during the forward
    inputs = ckpt["outside"] - plain["outside"]  # what the checkpoints hold: each block's two inputs
    H = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    # bf16 hidden + text states per block (+ the tiny time embedding)
    assert inputs == pytest.approx(transformer_config["num_layers"] * shape["tokens"] * H * 2, rel=0.01)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages, sampled after every op; a storage leaves when it is freed."""

    def __init__(self, existing=()):
        super().__init__()
        self.seen, self.current = set(), 0
        for t in existing:
            self._add(t)
        self.peak = self.current

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.current -= nbytes

    def _add(self, t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()  # one Python object per live storage: finalized when it is freed
            if id(storage) not in self.seen:
                self.seen.add(id(storage))
                self.current += storage.nbytes()
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        self.peak = max(self.peak, self.current)
        return out


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_peak_estimate_matches_a_measured_training_step(mode, checkpointing):
    """Two steps as training.py runs them (autocast, loss, backward, clipping, AdamW), every tensor's bytes
    tracked: the estimate (CPU autocast policy) is within 10% of the measured peak."""
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.config import LoraConfig
    from cogpipe.diffusion import diffusion_loss, noisy_and_target, rotary_embeddings
    from cogpipe.lora import add_lora

    transformer_config = _small_transformer_config(5, 16, 16, 32, heads=2, layers=3)
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**transformer_config)
    if mode == "lora":
        model.to(torch.bfloat16)
        add_lora(model, LoraConfig(rank=8, alpha=8))
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dtype = torch.bfloat16 if mode == "lora" else torch.float32
    alphas = torch.linspace(0.99, 0.01, 1000)
    rope = rotary_embeddings(transformer_config, 5, 16, 16, "cpu")
    with LiveBytes(list(model.parameters()) + list(model.buffers())) as live:
        for _ in range(2):  # the second step has the AdamW state
            x0, t = torch.randn(1, 5, 16, 16, 16), torch.tensor([500])
            noisy, target = noisy_and_target(x0, torch.randn_like(x0), t, alphas)
            with torch.autocast("cpu", torch.bfloat16):
                v = model(hidden_states=noisy.to(dtype), timestep=t, image_rotary_emb=rope, return_dict=False,
                          encoder_hidden_states=torch.randn(1, 32, 64, dtype=dtype))[0]
            diffusion_loss(v, target).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del v
    cfg = load_config(None, ["output_dir=x", "data.root=x", f"train.mode={mode}", "data.frames=17", "data.height=128",
                             "data.width=128", f"train.gradient_checkpointing={str(checkpointing).lower()}",
                             "lora.rank=8", "train.mixed_precision=bf16",
                             f"model.weight_dtype={'bf16' if mode == 'lora' else 'fp32'}"], validate_model=False)
    estimated = plan.estimate(cfg, transformer_config=transformer_config, device="cpu")["gb"]["peak"] * plan.GB
    assert estimated == pytest.approx(live.peak, rel=0.10), (estimated, live.peak)


# --- estimates ------------------------------------------------------------------------------------------------

def test_estimates_are_positive_and_ordered():
    lora2, lora5 = gb("cogvideox_2b_lora"), gb("cogvideox_5b_lora")
    for e in (lora2, lora5):
        assert all(v >= 0 for v in e.values()) and e["peak"] > e["weights"] > 0
        assert e["activations_with_checkpointing"] < e["activations_without_checkpointing"]
        assert e["peak_with_checkpointing"] < e["peak_without_checkpointing"]
        assert e["peak"] == e["peak_with_checkpointing"]  # the recipes turn checkpointing on
    assert lora5["peak"] > lora2["peak"] and lora5["weights"] > lora2["weights"]
    full5 = gb("cogvideox_5b_full")
    trainable = lambda e: e["trainable_params"] + e["grads"] + e["adam"]  # noqa: E731
    assert trainable(lora5) < trainable(full5) / 20
    assert gb("cogvideox_5b_lora", "lora.rank=64")["peak"] < lora5["peak"]
    # 1.5 at 81 x 768 x 1360 has ~2.5x the tokens of 1.0 at 49 x 480 x 720
    assert gb("cogvideox1.5_5b_lora")["activations_with_checkpointing"] > 2 * lora5["activations_with_checkpointing"]
    # sharding a full fine-tune over 8 GPUs cuts the per-GPU peak, ZeRO-3 more than ZeRO-2
    cfg, transformer_config = recipe("cogvideox_5b_full")
    z2 = plan.estimate(cfg, transformer_config=transformer_config, strategy="zero2", num_gpus=8)["gb"]["peak"]
    z3 = plan.estimate(cfg, transformer_config=transformer_config, strategy="zero3", num_gpus=8)["gb"]["peak"]
    assert z3 < z2 < full5["peak"]


def test_the_ema_is_counted_where_it_lives():
    cfg, transformer_config = recipe("cogvideox_5b_full", "train.ema_decay=0.999")
    plain, ema = gb("cogvideox_5b_full"), plan.estimate(cfg, transformer_config=transformer_config)["gb"]
    trainable = plan.estimate(cfg, transformer_config=transformer_config)["trainable_params"]
    assert ema["ema"] == pytest.approx(4 * trainable / plan.GB) and plain["ema"] == 0
    assert ema["peak"] == pytest.approx(plain["peak"] + ema["ema"])  # kept all along, beside the weights
    sharded = plan.estimate(cfg, transformer_config=transformer_config, strategy="zero3", num_gpus=8)["gb"]["ema"]
    assert sharded == pytest.approx(ema["ema"] / 8)  # a shard of it with each shard of the weights


def test_the_largest_bucket_sets_the_shape():
    from types import SimpleNamespace

    _, transformer_config = recipe("cogvideox1.5_5b_lora")
    buckets = [[81, 768, 1360], [33, 480, 848]]
    cfg = SimpleNamespace(data=SimpleNamespace(frames=49, height=480, width=848, buckets=buckets),
                          train=SimpleNamespace(batch_size=2))
    shape = plan.largest_shape(cfg, transformer_config)
    assert (shape["frames"], shape["height"], shape["width"], shape["batch"]) == (81, 768, 1360, 2)
    assert shape["video_tokens"] == 11 * 48 * 85  # 21 latent frames padded to 22, / patch_t 2; 96/2 x 170/2


def test_lora_parameter_count_is_what_peft_adds():
    from diffusers import CogVideoXTransformer3DModel

    from cogpipe.config import LoraConfig
    from cogpipe.lora import add_lora

    transformer_config = _small_transformer_config(5, 16, 16, 32)
    model = CogVideoXTransformer3DModel(**transformer_config)
    add_lora(model, LoraConfig(rank=8, alpha=8))
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = load_config(None, ["output_dir=x", "data.root=x", "lora.rank=8"], validate_model=False)
    est = plan.estimate(cfg, transformer_config=transformer_config)
    assert est["trainable_params"] == added


def test_public_numbers():
    """The official finetune table (rank 128 LoRA, DDP, checkpointing): 2B fp16 at 49x480x720 on a 16 GB card,
    5B bf16 on a 24 GB card, 1.5-5B bf16 at 81x768x1360: 35 GB. The first two name GPU cards, so they are
    bounds; the third is a measurement. (The VAE and T5 are cached away here, as in the official trainer.)"""
    assert plan.needed_gb(gb("cogvideox_2b_lora")["peak"]) <= 16
    assert plan.needed_gb(gb("cogvideox_5b_lora")["peak"]) <= 24
    assert gb("cogvideox1.5_5b_lora")["peak"] == pytest.approx(35, rel=0.25)


# --- advice ---------------------------------------------------------------------------------------------------

def test_advice_names_gradient_checkpointing_when_only_that_makes_it_fit():
    cfg, transformer_config = recipe("cogvideox_2b_lora", "train.gradient_checkpointing=false")
    advice = plan.fit_advice(cfg, 24, transformer_config=transformer_config)
    assert not advice["fits"]
    assert [s["switch"] for s in advice["steps"]] == ["train.gradient_checkpointing=true"]
    assert advice["steps"][0]["fits"] and advice["fits_after_steps"]
    assert advice["sharded"] == {}  # one GPU is enough once checkpointing is on
    cfg, transformer_config = recipe("cogvideox_2b_lora")
    assert plan.fit_advice(cfg, 24, transformer_config=transformer_config)["fits"]


def test_advice_for_a_full_fine_tune_that_does_not_fit():
    cfg, transformer_config = recipe("cogvideox_5b_full")
    advice = plan.fit_advice(cfg, 48, transformer_config=transformer_config)
    assert not advice["fits"]
    lora = [st for st in advice["steps"] if st["switch"].startswith("train.mode=lora")]
    assert lora == [advice["steps"][-1]] and lora[0]["fits"]  # 5B full does not fit 48 GB (8-bit AdamW too), LoRA does
    # 8-bit AdamW comes first where the schema has a key for it, else it is reported as unavailable
    eight = [st["switch"] for st in advice["steps"] if "8bit" in st["switch"]]
    assert eight or "8-bit AdamW" in [u["switch"] for u in advice["unavailable"]]
    for strategy in ("zero2", "zero3", "fsdp"):
        assert 2 <= advice["sharded"][strategy]["num_gpus"] <= 64
        assert advice["sharded"][strategy]["needs_gb"] <= 48
    assert advice["sharded"]["zero3"]["num_gpus"] <= advice["sharded"]["zero2"]["num_gpus"]


def test_advice_lowers_frames_only_as_far_as_needed():
    cfg, transformer_config = recipe("cogvideox1.5_5b_lora")
    advice = plan.fit_advice(cfg, 24, transformer_config=transformer_config)
    labels = [s["switch"] for s in advice["steps"]]
    frames = [i for i, label in enumerate(labels) if label.startswith("data.frames=")]
    assert len(frames) == 1 and advice["steps"][frames[0]]["fits"]
    chosen = int(labels[frames[0]].split("=")[1])
    assert (chosen - 1) % 16 == 0 and chosen < 81  # CogVideoX 1.5 rule
    # the advice is a list of overrides: with the earlier ones, 16 more frames would not fit
    earlier = [kv for label in labels[:frames[0]] for kv in label.split()]
    before, _ = recipe("cogvideox1.5_5b_lora", *earlier, f"data.frames={chosen + 16}")
    assert plan.needed_gb(plan.estimate(before, transformer_config=transformer_config)["gb"]["peak"]) > 24
    after, _ = recipe("cogvideox1.5_5b_lora", *earlier, f"data.frames={chosen}")
    assert plan.needed_gb(plan.estimate(after, transformer_config=transformer_config)["gb"]["peak"]) <= 24


def test_switches_are_found_by_name_in_the_schema():
    from dataclasses import dataclass

    @dataclass
    class Train:
        mode: str = "lora"
        optimizer: str = "adamw"

    @dataclass
    class Model:
        fp8_frozen: bool = False

    @dataclass
    class Cfg:
        train: Train
        model: Model

    cfg = Cfg(Train(), Model())
    assert plan.memory_switches(cfg) == (8, None)
    label, on = plan.switch_on(cfg, "fp8")
    assert label == "model.fp8_frozen=true" and plan.memory_switches(on) == (8, 1)
    label, on = plan.switch_on(on, "8bit")
    assert label == "train.optimizer=adamw8bit" and plan.memory_switches(on) == (2, 1)
    assert plan.memory_switches(Cfg(Train(mode="full"), Model(fp8_frozen=True))) == (8, None)  # LoRA only


# --- command line ----------------------------------------------------------------------------------------------

def test_cli_json_and_table(capsys):
    assert cli_main(["plan", "--config", "configs/cogvideox_5b_lora.yaml", "--gpu-memory", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"]["model"]["params"] == 5_570_283_072
    assert "THUDM/CogVideoX-5b" in out["estimate"]["model"]["note"]  # offline: the preset stood in
    assert out["advice"]["fits"] is True
    assert cli_main(["plan", "--config", "configs/cogvideox_2b_lora.yaml", "--gpu-memory", "24",
                     "model.pretrained=null", "train.gradient_checkpointing=false"]) == 0
    text = capsys.readouterr().out
    assert "peak allocated" in text and "fits  train.gradient_checkpointing=true" in text


def test_cli_unreadable_model_without_preset(capsys):
    code = cli_main(["plan", "--config", "configs/tiny_lora.yaml", "model.pretrained=/nonexistent/model"])
    assert code == 2
    assert "model.preset" in capsys.readouterr().err


# --- measured peaks --------------------------------------------------------------------------------------------

def measured_results():
    files = sorted((REPO / "bench" / "results").glob("train_step*.json"))
    results = [(f, json.loads(f.read_text())) for f in files]
    return [(f, r) for f, r in results if r.get("device") == "cuda" and not r.get("like")]


TOLERANCE = 0.25


def test_estimates_match_measured_gpu_peaks():
    results = measured_results()
    if not results:
        pytest.skip("no GPU measurements in bench/results/ (train_step*.json from a CUDA device); run e.g. "
                    "python bench/train_step.py --size 5b --gradient-checkpointing --out bench/results/<name>.json "
                    "on a GPU to enable this comparison")
    for path, r in results:
        precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[r["dtype"]]
        overrides = ["output_dir=x", "data.root=x", f"model.preset={r['size']}", f"train.mode={r['mode']}",
                     f"data.frames={r['frames']}", f"data.height={r['height']}", f"data.width={r['width']}",
                     f"train.batch_size={r['batch']}", f"train.mixed_precision={precision}",
                     f"train.gradient_checkpointing={str(r['gradient_checkpointing']).lower()}",
                     f"model.weight_dtype={r['dtype'] if r['mode'] == 'lora' else 'fp32'}"]
        if r["mode"] == "lora":
            overrides.append(f"lora.rank={r['lora_rank']}")
        est = plan.estimate(load_config(None, overrides))["gb"]["peak"]
        assert est == pytest.approx(r["peak_memory_gb"], rel=TOLERANCE), (path.name, est, r["peak_memory_gb"])


def test_plan_names_gpu_memory_and_host_ram_for_each_launcher(capsys):
    assert cli_main(["plan", "--config", str(REPO / "configs" / "cogvideox_5b_full.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    launchers, params = report["launchers"], report["estimate"]["model"]["params"]
    assert list(launchers) == ["ddp", "zero2", "zero3", "fsdp"]
    gpu = {k: v["gpu_needs_gb"] for k, v in launchers.items()}
    assert gpu["fsdp"] < gpu["zero2"] < gpu["ddp"] and gpu["zero3"] < gpu["zero2"]
    loading = {k: v["host_ram_gb"]["loading"] for k, v in launchers.items()}
    assert loading["ddp"] == loading["zero2"] == pytest.approx(8 * 4 * params / plan.GB)  # 8 fp32 copies: ~178 GB
    assert loading["fsdp"] == pytest.approx(4 * params / plan.GB)  # the first process reads, the others receive
    assert loading["zero3"] < 1.0  # built partitioned, filled one block at a time
    assert all(v["host_ram_gb"]["peak"] >= v["host_ram_gb"]["caching"] for v in launchers.values())
