"""`cogpipe prepare SOURCE... --for RECIPE --out DIR`: raw videos to a training set (docs/prepare.md).

    cogpipe prepare raw/ --for configs/cogvideox_2b_lora.yaml --out prepared/     every stage
    cogpipe prepare split raw/ --for RECIPE --out DIR                             one stage: split | filter |
    cogpipe prepare filter --for RECIPE --out DIR --min-motion 0.2                caption | write (the later
    cogpipe prepare caption --for RECIPE --out DIR --trigger zq                   stages read what the earlier
    cogpipe prepare write --for RECIPE --out DIR                                  ones left in DIR)

Resumable: started again, each stage does only what DIR does not hold yet.
"""

from __future__ import annotations

import sys

STAGES = ("split", "filter", "caption", "write")


def add_arguments(parser) -> None:
    from cogpipe.data.prepare import caption, filters

    parser.add_argument("items", nargs="*", metavar="[STAGE] SOURCE",
                        help=f"an optional stage ({' | '.join(STAGES)}; default: all), then the source videos or "
                             "folders (split needs them)")
    parser.add_argument("--for", dest="recipe", required=True, metavar="RECIPE",
                        help="the recipe the clips are for: its model version sets fps and frame counts, data.* sets "
                             "the size (or buckets), the model's T5 tokenizer counts caption tokens")
    parser.add_argument("--out", required=True, help="the prepared dataset's folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the recipe")
    parser.add_argument("--address", help="a Ray cluster's address (default: a local Ray on this machine); DIR must "
                                          "then be a folder every worker reaches")
    parser.add_argument("--cut-threshold", type=float, default=27.0,
                        help="PySceneDetect ContentDetector threshold: lower finds more cuts (default 27)")
    filters.add_arguments(parser)
    parser.add_argument("--caption-model", default=caption.DEFAULT_MODEL,
                        help=f"a Qwen2.5-VL model id or folder (default {caption.DEFAULT_MODEL}; 7B for 24 GB cards), "
                             "or `source`: each clip takes its source video's caption (a dataset folder's)")
    parser.add_argument("--trigger", help="a trigger word put before every caption (LoRA concepts)")
    parser.add_argument("--recaption", action="store_true", help="caption again clips that have a caption")
    parser.add_argument("--caption-batch", type=int, default=4, help="clips a model call (default 4)")
    parser.add_argument("--caption-workers", type=int, help="captioning actors (default: one a GPU, else 1)")
    parser.add_argument("--caption-frames", type=int, default=caption.FRAMES,
                        help=f"frames sampled over a clip (even; default {caption.FRAMES})")
    parser.add_argument("--caption-quantize", choices=("8bit", "4bit"),
                        help="load the captioning model's weights in 8 or 4 bits (bitsandbytes, CUDA)")
    parser.add_argument("--caption-dtype", choices=("fp32", "fp16", "bf16"),
                        help="default: bf16 on a GPU, fp32 on the CPU (cogpipe/devices.py)")
    parser.add_argument("--max-new-tokens", type=int, default=caption.MAX_NEW_TOKENS)


def prepare(args, log=print) -> int:
    from cogpipe.config import load_config
    from cogpipe.data import raycluster
    from cogpipe.data.prepare import filters, pipeline, split
    from cogpipe.models import component_configs

    items = list(args.items)
    stage = items.pop(0) if items and items[0] in STAGES else None
    if stage == "caption" and args.caption_model == "source":
        raise pipeline.PrepareError("--caption-model source takes the captions of the SOURCE folders: use it with "
                                    "the whole run (`cogpipe prepare SOURCE... --caption-model source ...`)")
    if stage in (None, "split") and not items:
        raise pipeline.PrepareError("no SOURCE given: `cogpipe prepare [split] SOURCE... --for RECIPE --out DIR`")
    if stage not in (None, "split") and items:
        raise pipeline.PrepareError(f"`cogpipe prepare {stage}` reads DIR only; drop the sources {items}")
    cfg = load_config(args.recipe, list(args.set), validate_model=False)
    target = split.target_for(cfg)
    if args.address:
        raycluster.connect(args.address)
    if stage in (None, "split"):
        records = pipeline.run_split(items, target, args.out, threshold=args.cut_threshold, log=log)
        if stage:
            return 0
    else:
        records = pipeline.load_records(args.out)
        if not records:
            raise pipeline.PrepareError(f"{args.out}: nothing split here yet (`cogpipe prepare split SOURCE... "
                                        f"--out {args.out}` first)")
    clips = pipeline.clip_rows(records)
    scored = pipeline.run_scores(args.out, clips, log=log)
    drops = pipeline.decide(scored, filters.from_args(args))
    log(f"filter: {sum(v is None for v in drops.values())} kept, {sum(v is not None for v in drops.values())} "
        "dropped")
    if stage == "filter":
        return 0
    kept = [c["clip"] for c in clips if drops.get(c["clip"]) is None]
    transformer_config, _ = component_configs(cfg.model)
    limit = int(transformer_config["max_text_seq_length"])
    if args.caption_model == "source" and stage is None:
        captions = source_caption_records(records, pipeline.source_captions(items), cfg, limit, args.trigger)
        if not args.recaption:  # a caption already kept (an edit on the page, say) stays, as the model path does
            captions.update(pipeline.read_captions(args.out, [c["clip"] for c in clips]))
        pipeline.save_captions(args.out, captions)  # so a later `write` alone finds them
    elif stage in (None, "caption"):
        captions = pipeline.run_captions(
            args.out, kept, cfg, model_id=args.caption_model, recaption=args.recaption, trigger=args.trigger,
            batch_size=args.caption_batch, workers=args.caption_workers, frames=args.caption_frames,
            quantize=args.caption_quantize, max_new_tokens=args.max_new_tokens, dtype=args.caption_dtype,
            log=log)["captions"]
    else:
        captions = pipeline.read_captions(args.out, kept)
    if stage == "caption":
        return 0
    report = pipeline.run_write(args.out, target, records, drops, captions, limit, log=log)
    return 0 if report["kept"] else 1


def source_caption_records(records, by_source: dict, cfg, limit: int, trigger) -> dict:
    """Each clip's caption taken from its source video's caption (fitted to the recipe's T5 length)."""
    from pathlib import Path

    from cogpipe.data.prepare.caption import fit_caption
    from cogpipe.models import build_tokenizer

    by_resolved = {str(Path(k).resolve()): v for k, v in by_source.items()}
    t5 = build_tokenizer(cfg.model)
    out = {}
    for r in records:
        text = by_resolved.get(str(Path(r["source"]).resolve()))
        for c in r["clips"]:
            if text:
                full = f"{trigger}, {text}" if trigger else text
                caption, n, cut = fit_caption(t5, full, limit)
                out[c["clip"]] = dict(caption=caption, tokens=n, cut=cut, model="source")
    return out


def run(args) -> int:
    from cogpipe.config import ConfigError
    from cogpipe.data.prepare.pipeline import PrepareError

    try:
        return prepare(args)
    except (ConfigError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
