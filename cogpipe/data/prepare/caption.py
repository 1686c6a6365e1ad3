"""Caption clips with a vision-language model through transformers (Qwen2.5-VL by default; docs/prepare.md says
which model for which card).

Each clip: FRAMES frames sampled evenly over it, given to the model as one video (its temporal patches and
time positions, not separate stills) with INSTRUCTION, which asks for CogVideoX's long dense style; greedy
decoding (the same text on every run). The caption (after an optional trigger word) is counted with the recipe's own
T5 tokenizer and kept to the recipe's text length (226 tokens for the released models): a longer one is cut at the
last sentence end that fits (at a word end where no sentence fits), never asked again.

Without torchvision: transformers' Qwen2.5-VL video processor needs torchvision, its image processor does not (the
PIL/numpy build, Qwen2VLImageProcessorPil). So each sampled frame goes through the image processor (the model's own
resize, rescale, normalise and patch layout), and the frames' patches are paired into the video layout the video
processor documents: rows (t, h/merge, w/merge, merge, merge), each row (channel, temporal_patch_size, patch, patch)
with frames 2t and 2t+1 in the temporal slots; video_grid_thw = (frames / 2, h / patch, w / patch);
second_per_grid_ts = temporal_patch_size / the sampled frames' rate. The prompt is Qwen's chat format with
`<|video_pad|>` repeated once per merged patch, as the processor writes it, and mm_token_type_ids marks those tokens
(2 = video) so the model computes its 3D rotary positions.
"""

from __future__ import annotations

import re

import numpy as np

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
FRAMES = 8  # frames sampled over a clip (even: two a temporal patch)
MAX_PIXELS = 448 * 448  # a frame's pixels at most after the model's resize
MIN_PIXELS = 56 * 56
MAX_NEW_TOKENS = 300
INSTRUCTION = (
    "Describe this video in one detailed paragraph for training a text-to-video model. Say what the main subject is "
    "and what it looks like, what it does and how it moves, how the camera moves, and the scene around it: the "
    "setting, lighting, colours and style. Write plain, concrete sentences in the present tense, without lists, "
    "headings or phrases such as 'the video shows'.")
SYSTEM = "You are a helpful assistant."
VIDEO_TOKEN, VISION_START, VISION_END = "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"


def sample_indices(num_frames: int, count: int = FRAMES) -> np.ndarray:
    """`count` frame indices spread evenly over a clip (centres of equal parts); repeats where the clip is shorter."""
    return np.minimum(((np.arange(count) + 0.5) * num_frames / count).astype(np.int64), num_frames - 1)


def t5_count(tokenizer, text: str) -> int:
    """Tokens the recipe's T5 tokenizer gives the caption, its end-of-text token included (what training pads)."""
    return len(tokenizer(text, add_special_tokens=True).input_ids)


def fit_caption(tokenizer, text: str, limit: int) -> tuple[str, int, bool]:
    """(caption, T5 tokens, cut?): the whole text where it fits in `limit` tokens, else the longest run of whole
    sentences that fits, else (one sentence too long) the longest run of whole words."""
    text = " ".join(text.split())
    n = t5_count(tokenizer, text)
    if n <= limit:
        return text, n, False
    sentences = re.split(r"(?<=[.!?])\s+", text)
    for units in (sentences, text.split(" ")):
        best = ""
        for k in range(1, len(units) + 1):
            candidate = " ".join(units[:k])
            if t5_count(tokenizer, candidate) > limit:
                break
            best = candidate
        if best and (units is not sentences or best[-1] in ".!?"):
            return best, t5_count(tokenizer, best), True
    return "", 0, True


class Captioner:
    """One vision-language model loaded once (one per Ray actor). `caption(frame_lists, fps_list)` -> texts."""

    def __init__(self, model_id: str = DEFAULT_MODEL, *, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS, max_pixels: int = MAX_PIXELS,
                 instruction: str = INSTRUCTION):
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from cogpipe.devices import inference_device, inference_dtype

        self.device = inference_device(device)
        self.dtype = inference_dtype(self.device, dtype, "bf16")  # bf16 on a GPU, fp32 on the CPU
        kwargs = dict(dtype=self.dtype)
        if quantize:  # 8-bit / 4-bit weights through bitsandbytes (CUDA only)
            from transformers import BitsAndBytesConfig

            if quantize not in ("8bit", "4bit"):
                raise ValueError(f"--caption-quantize must be 8bit or 4bit, got {quantize!r}")
            kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if quantize == "8bit" else
                                             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                bnb_4bit_compute_dtype=self.dtype))
            kwargs["device_map"] = {"": self.device.index or 0}
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_id, **kwargs).eval()
        if not quantize:
            self.model.to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side="left")
        self.images = Qwen2VLImageProcessorPil.from_pretrained(model_id)
        self.max_pixels, self.max_new_tokens, self.instruction = max_pixels, max_new_tokens, instruction
        self.merge = int(self.images.merge_size)
        self.temporal = int(self.images.temporal_patch_size)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.calls = 0  # generate() calls, for the tests and the report
        self._torch = torch

    def video_inputs(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """uint8 [F, H, W, 3] (F a multiple of temporal_patch_size) -> (pixel rows, [t, h, w] grid)."""
        out = self.images(images=list(frames), return_tensors="np",
                          size={"shortest_edge": MIN_PIXELS, "longest_edge": self.max_pixels})
        grid = out["image_grid_thw"]
        if (grid != grid[0]).any():
            raise ValueError("the sampled frames resized to different grids")
        _, gh, gw = (int(x) for x in grid[0])
        f = len(frames)
        p = int(self.images.patch_size)
        rows = out["pixel_values"].reshape(f, gh * gw, 3, self.temporal, p, p)[:, :, :, 0]  # one copy a frame
        rows = rows.reshape(f // self.temporal, self.temporal, gh * gw, 3, p, p).transpose(0, 2, 3, 1, 4, 5)
        return rows.reshape(f // self.temporal * gh * gw, 3 * self.temporal * p * p), [f // self.temporal, gh, gw]

    def prompt(self, tokens: int) -> str:
        return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{VISION_START}{VIDEO_TOKEN * tokens}"
                f"{VISION_END}{self.instruction}<|im_end|>\n<|im_start|>assistant\n")

    def caption(self, clips: list[np.ndarray], fps: list[float]) -> list[str]:
        """Captions of clips given as sampled frames (uint8 [F, H, W, 3] each) at their sampled frame rates."""
        torch = self._torch
        pixels, grids, texts = [], [], []
        for frames in clips:
            if len(frames) % self.temporal:
                frames = np.concatenate([frames, frames[-1:].repeat(self.temporal - len(frames) % self.temporal, 0)])
            rows, grid = self.video_inputs(frames)
            pixels.append(rows)
            grids.append(grid)
            texts.append(self.prompt(int(np.prod(grid)) // self.merge ** 2))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                      mm_token_type_ids=(enc.input_ids == self.video_token_id).int() * 2,
                      pixel_values_videos=torch.from_numpy(np.concatenate(pixels)).to(self.dtype),
                      video_grid_thw=torch.tensor(grids, dtype=torch.long),
                      second_per_grid_ts=torch.tensor([self.temporal / max(r, 1e-6) for r in fps]))
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        self.calls += 1
        new = out[:, enc.input_ids.shape[1]:]
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def clip_frames(path, count: int = FRAMES) -> tuple[np.ndarray, float]:
    """(frames sampled over the clip, their rate in frames per second of the clip's time)."""
    from cogpipe.video import open_video

    with open_video(path) as reader:
        idx = sample_indices(reader.num_frames, count)
        duration = reader.num_frames / reader.fps if reader.fps else float(count)
        return reader.frames(idx), count / duration
