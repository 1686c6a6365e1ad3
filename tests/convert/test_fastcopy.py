"""The converter's data path: tensors moved file to file by the kernel, its fallbacks, the torch zip writer, the
read-ahead, and that a conversion never imports diffusers."""

import errno
import json
import os
import subprocess
import sys
import zipfile
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cogpipe.convert import convert, fastcopy, io, torchzip  # noqa: E402
from cogpipe.convert.fastcopy import Readahead, Sink, Span, crc32_spans, weight_files  # noqa: E402
from cogpipe.weights import CorruptCheckpointError, load_state_dict, read_pickle  # noqa: E402

from fixtures import sat as F  # noqa: E402
from helpers import REPO  # noqa: E402

P = F.PREFIX
SAT_FILE = ("1000", "mp_rank_00_model_states.pt")


def bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def only_made_tensors(monkeypatch):
    """Fail when a tensor read from a file goes through a Python buffer (tensors made in memory may)."""
    from cogpipe.weights import LazyTensor

    build = io.Producer.__call__

    def call(self, out):
        assert not any(isinstance(src, LazyTensor) for src, _, _ in out.pieces), f"{out.name} went through memory"
        return build(self, out)

    monkeypatch.setattr(io.Producer, "__call__", call)


@pytest.fixture
def counted(monkeypatch):
    """Bytes moved by os.copy_file_range during the test."""
    moved = {"bytes": 0}
    real = os.copy_file_range

    def count(src, dst, n, offset_src=None, offset_dst=None):
        k = real(src, dst, n, offset_src, offset_dst)
        moved["bytes"] += k
        return k

    monkeypatch.setattr(os, "copy_file_range", count)
    return moved


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="os.copy_file_range is Linux-only")
def test_tensors_move_in_the_kernel_both_ways(tmp_path, monkeypatch, counted):
    """Without --dtype every tensor of a SAT <-> Diffusers conversion is a byte range copied by copy_file_range:
    no tensor read from the source is built in memory (only SAT's zero position table, made here), and the round
    trip is bit-exact."""
    sat = F.sat_transformer("5b-i2v", dtype=torch.bfloat16, seed=4)
    F.save_sat_folder(tmp_path / "sat", sat)
    only_made_tensors(monkeypatch)
    s = convert(tmp_path / "sat", tmp_path / "diffusers")
    assert counted["bytes"] == s.parameters * 2  # bf16: every output byte was copied by the kernel
    counted["bytes"] = 0
    convert(tmp_path / "diffusers", tmp_path / "back")
    back_file = tmp_path / "back" / "1" / "mp_rank_00_model_states.pt"
    back = torch.load(back_file, weights_only=True)["module"]
    made = P + "transformer.position_embeddings.weight"  # SAT's unused table: written as zeros, not read
    assert counted["bytes"] == sum(v.numel() * 2 for k, v in back.items() if k != made)
    assert back.keys() == sat.keys() and all(bits_equal(back[k], sat[k]) for k in sat if k != made)
    assert zipfile.ZipFile(back_file).testzip() is None  # every record's CRC-32 is right


@pytest.mark.parametrize("refuse", [["copy_file_range"], ["copy_file_range", "sendfile"], ["zero"]])
def test_fallbacks_write_the_same_bytes(tmp_path, monkeypatch, refuse):
    """Where the OS refuses copy_file_range (another file system: EXDEV) and sendfile (EINVAL), or copy_file_range
    copies nothing, the next method writes the same files."""
    sat = F.sat_transformer("5b", dtype=torch.bfloat16, seed=5)
    F.save_sat_folder(tmp_path / "sat", sat)
    convert(tmp_path / "sat", tmp_path / "kernel")
    convert(tmp_path / "kernel", tmp_path / "kernel_back")

    def refused(code):
        def call(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        return call

    for method, code in (("copy_file_range", errno.EXDEV), ("sendfile", errno.EINVAL)):
        if method in refuse and hasattr(os, method):
            monkeypatch.setattr(os, method, refused(code))
    if refuse == ["zero"] and hasattr(os, "copy_file_range"):
        monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: 0)
    fallbacks = []
    close = Sink.close

    def record(self):
        fallbacks.extend(self.fallbacks)
        close(self)

    monkeypatch.setattr(Sink, "close", record)
    convert(tmp_path / "sat", tmp_path / "fallback")
    convert(tmp_path / "fallback", tmp_path / "fallback_back")
    if hasattr(os, "copy_file_range"):
        assert fallbacks and fallbacks[0].startswith("copy_file_range")
    for f in (tmp_path / "kernel").iterdir():
        assert (tmp_path / "fallback" / f.name).read_bytes() == f.read_bytes(), f.name
    a, b = (load_state_dict(tmp_path / d) for d in ("kernel_back", "fallback_back"))
    assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("methods", [("copy_file_range",), ("sendfile",), ("read",)])
def test_a_source_shorter_than_planned_is_an_error(tmp_path, methods):
    if not all(m == "read" or hasattr(os, m) for m in methods):
        pytest.skip(f"no os.{methods[0]} here")
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 40)
    with Sink(tmp_path / "out.bin", methods=methods) as sink:
        sink.copy([Span(str(src), 100, 5000)])
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            sink.copy([Span(str(src), 10000, 500)])
    assert (tmp_path / "out.bin").read_bytes()[:5000] == src.read_bytes()[100:5100]
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        crc32_spans([Span(str(src), 10000, 500)])


def test_crc32_of_spans(tmp_path):
    data = os.urandom(3 * fastcopy.BUFFER // 2)
    (tmp_path / "a").write_bytes(data)
    spans = [Span(str(tmp_path / "a"), 5, 70_000), Span(str(tmp_path / "a"), 100_001, len(data) - 100_001),
             Span(str(tmp_path / "a"), 7, 0)]
    assert crc32_spans(spans) == zlib.crc32(data[5:70_005] + data[100_001:])


@pytest.mark.parametrize("zip64", [False, True])
def test_torch_zip_loads_everywhere(tmp_path, monkeypatch, zip64):
    """torch.load (plain and mmap), Python's zipfile (CRCs included) and cogpipe's reader all read what the writer
    writes, with the records torch writes, data aligned to 64 bytes; zip64 fields (forced by a low limit here;
    real at 4 GiB) too."""
    if zip64:
        monkeypatch.setattr(torchzip, "ZIP64_LIMIT", 1000)
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(40, 30, generator=g).bfloat16(), "empty": torch.zeros(0), "i": torch.arange(9),
               "big": torch.randn(2000, generator=g)}
    (tmp_path / "raw.bin").write_bytes(tensors["big"].numpy().tobytes())
    outs = [io.Out(k, [(v, 0, 1)], v.dtype) for k, v in tensors.items() if k != "big"]
    big = read_pickle(_save(tmp_path / "src.pt", {"big": tensors["big"]}))["big"]
    outs.append(io.Out("big", [(big, 0, 1)], big.dtype))  # a lazy source: copied by byte range
    path = tmp_path / "3d-vae.pt"
    io.write_torch(path, outs, lambda sd: {"state_dict": sd})
    for kwargs in ({}, {"mmap": True}):
        back = torch.load(path, weights_only=True, **kwargs)["state_dict"]
        assert back.keys() == tensors.keys() and all(bits_equal(back[k], tensors[k]) for k in tensors)
    zf = zipfile.ZipFile(path)
    assert zf.testzip() is None
    names = zf.namelist()
    assert names[:4] == ["3d-vae/data.pkl", "3d-vae/.format_version", "3d-vae/.storage_alignment", "3d-vae/byteorder"]
    assert names[-2:] == ["3d-vae/version", "3d-vae/.data/serialization_id"]
    raw = path.read_bytes()
    for info in zf.infolist():
        name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
            int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        assert (info.extra != b"") == (zip64 and max(info.header_offset, info.file_size) >= 1000)
    ours = read_pickle(path)["state_dict"]
    assert all(bits_equal(ours[k].load(), tensors[k]) for k in tensors)


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_weight_files_are_what_a_conversion_reads(tmp_path):
    F.save_sat_folder(tmp_path / "sat", F.sat_transformer("5b"))
    assert weight_files(tmp_path / "sat") == [tmp_path / "sat" / "1000" / "mp_rank_00_model_states.pt"]
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    F.save_sat_folder(tmp_path / "pipe" / "transformer", F.sat_transformer("5b"))
    torch.save({"state_dict": {}}, tmp_path / "pipe" / "vae" / "3d-vae.pt")
    assert [f.name for f in weight_files(tmp_path / "pipe")] == ["mp_rank_00_model_states.pt", "3d-vae.pt"]
    convert(tmp_path / "sat", tmp_path / "diffusers", max_shard_size=30_000)
    shards = weight_files(tmp_path / "diffusers")
    assert len(shards) > 1 and all(f.suffix == ".safetensors" for f in shards) and shards == sorted(shards)
    assert weight_files(tmp_path / "nothing") == []


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_readahead_stays_a_window_ahead(tmp_path, monkeypatch):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(b"x" * (3 * Readahead.STEP + 5))
    total = sum(f.stat().st_size for f in files)
    ra = Readahead(files, window=Readahead.STEP)
    try:
        import time

        time.sleep(0.3)
        assert Readahead.STEP <= ra.issued <= 2 * Readahead.STEP + 5  # waits for the conversion to catch up
        ra.used = total
        for _ in range(200):
            if not ra.thread.is_alive():
                break
            time.sleep(0.01)
        assert ra.issued == total and not ra.thread.is_alive()
    finally:
        ra.stop()
    monkeypatch.setenv("COGPIPE_CONVERT_READAHEAD", "0")
    assert fastcopy.start(files[0]) is None


def test_conversion_never_imports_diffusers(tmp_path):
    """Every direction and kind (a SAT pipeline folder, its way back, a 2B transformer whose sin-cos table is
    recomputed, a lone VAE, a LoRA) converts in a process where diffusers and transformers never get imported."""
    (tmp_path / "sat" / "vae").mkdir(parents=True)
    F.save_sat_folder(tmp_path / "sat" / "transformer", F.sat_transformer("1.5-5b-i2v"))
    torch.save({"state_dict": F.sat_vae()}, tmp_path / "sat" / "vae" / "3d-vae.pt")
    F.save_sat_folder(tmp_path / "sat2b", F.sat_transformer("2b"))
    F.save_sat_folder(tmp_path / "lora", F.sat_lora_only(F.sat_transformer("5b", lora_rank=4, lora_layers=(0,))))
    jobs = [("sat", "pipe"), ("pipe", "pipe_back"), ("sat2b", "d2b"), ("d2b", "sat2b_back"),
            ("sat/vae/3d-vae.pt", "vae"), ("lora", "lora.safetensors"), ("lora.safetensors", "lora_back")]
    code = ("import sys\nfrom cogpipe.convert.cli import add_arguments, run\nimport argparse\n"
            f"for src, dst in {[(str(tmp_path / s), str(tmp_path / d)) for s, d in jobs]!r}:\n"
            "    p = argparse.ArgumentParser(); add_arguments(p)\n"
            "    assert run(p.parse_args([src, dst, '--json'])) == 0\n"
            "print('IMPORTED', [m for m in ('diffusers', 'transformers') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "IMPORTED []"
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [s["direction"] for s in summaries] == ["sat->diffusers", "diffusers->sat"] * 2 + \
        ["sat->diffusers", "sat->diffusers", "diffusers->sat"]
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    import diffusers  # the written pipeline loads with the real classes

    pipe = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(tmp_path / "pipe", text_encoder=None,
                                                                   tokenizer=None)
    assert index["_diffusers_version"] == diffusers.__version__ and pipe.scheduler.config.snr_shift_scale == 1.0
    two_b = torch.load(tmp_path / "sat2b_back" / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    table = F.sat_transformer("2b")[P + "mixins.pos_embed.pos_embedding"]
    assert bits_equal(two_b[P + "mixins.pos_embed.pos_embedding"], table)
