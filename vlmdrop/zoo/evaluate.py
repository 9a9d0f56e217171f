"""Accuracy per question type on easyvqa-hr test samples, full and with dropping, plus the share of
samples whose kept visual tokens touch the shape.

Usage::

    python -m vlmdrop.zoo.evaluate --model DIR --n 240 --methods hired,random --budget 0.1

The answer is the greedy first token of one prefill forward (every easyvqa-hr answer is one word).
"Touches the shape": some kept visual position (base image or AnyRes grid, see
`vlmdrop.zoo.token_boxes`) covers a canvas box overlapping the shape's bbox.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import numpy as np
import torch

from .easyvqa_hr import QTYPES, easyvqa_hr_records
from .token_boxes import boxes_touch, token_boxes

log = logging.getLogger(__name__)

__all__ = ["evaluate_dropping", "main"]

SUFFIX = "\nAnswer the question using a single word or phrase."


def _prompt(processor: Any, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + SUFFIX}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


@torch.no_grad()
def evaluate_dropping(model: Any, processor: Any, records: Sequence[dict[str, Any]], method: str | None,
                      budget: float, *, batch: int = 8, seed: int = 0) -> dict[str, float]:
    """Accuracy per qtype (fractions), ``touch`` (share of samples whose kept tokens touch the shape) and
    ``touch_grid`` (same, counting only the high-resolution AnyRes grid tokens, not the base image's).

    ``method=None`` runs the unmodified model (``touch`` is then 1 by construction).
    """
    import vlmdrop

    ip = processor.image_processor
    crop = ip.crop_size["height"]
    patch = processor.patch_size
    hits: dict[str, list[float]] = {q: [] for q in QTYPES}
    touch: list[float] = []
    touch_grid: list[float] = []
    kept: list[int] = []
    params: dict[str, Any] = {"budget": budget}
    if method == "random":
        params["seed"] = seed
    handle = vlmdrop.apply(model, method, **params) if method else None
    try:
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            inputs = processor(images=[r["image"] for r in chunk], text=[_prompt(processor, r["question"]) for r in chunk],
                               return_tensors="pt", padding=True)
            pred = model(**inputs).logits[:, -1].argmax(-1)  # (B,)
            for j, (r, p) in enumerate(zip(chunk, pred.tolist())):
                hits[r["qtype"]].append(float(processor.tokenizer.convert_ids_to_tokens(p) == r["answer"]))
                if handle is None:
                    touch.append(1.0)
                    touch_grid.append(1.0)
                    continue
                st = handle.stats.images[j]
                boxes = token_boxes(r["image"].size, ip.image_grid_pinpoints, crop, patch)
                if len(boxes) != st.n_before:
                    raise RuntimeError(f"token map has {len(boxes)} positions, the model {st.n_before} "
                                       f"(image size {r['image'].size})")
                idx = st.kept_indices.tolist()
                hit = [k for k in idx if boxes[k] is not None and boxes_touch(boxes[k], r["bbox"])]
                touch.append(float(bool(hit)))
                touch_grid.append(float(any(k >= (crop // patch) ** 2 for k in hit)))  # an AnyRes grid token
                kept.append(st.n_kept)
    finally:
        if handle is not None:
            handle.remove()
    out = {q: float(np.mean(v)) for q, v in hits.items() if v}
    out["all"] = float(np.mean([x for v in hits.values() for x in v]))
    out["touch"] = float(np.mean(touch))
    out["touch_grid"] = float(np.mean(touch_grid))
    if kept:
        out["kept_mean"] = float(np.mean(kept))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmdrop.zoo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder written by vlmdrop.zoo.train")
    p.add_argument("--n", type=int, default=240, help="easyvqa-hr test samples (multiple of 12 keeps types balanced)")
    p.add_argument("--methods", default="hired,random")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(a.model, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(a.model)
    records = list(easyvqa_hr_records("test", seed=a.seed, n=a.n))
    results = {"full": evaluate_dropping(model, processor, records, None, 1.0, batch=a.batch)}
    print(json.dumps({"full": results["full"]}), flush=True)
    for m in [m for m in a.methods.split(",") if m]:
        results[f"{m}@{a.budget}"] = evaluate_dropping(model, processor, records, m, a.budget, batch=a.batch, seed=a.seed)
        print(json.dumps({f"{m}@{a.budget}": results[f"{m}@{a.budget}"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
