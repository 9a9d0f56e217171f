"""Accuracy per question type on easyvqa-hr test samples, full and with dropping, plus the share of
samples whose kept visual tokens touch the shape.

Usage::

    python -m vlmdrop.zoo.evaluate --model DIR --n 240 --methods hired,random --budget 0.1

The answer is the greedy first token of one prefill forward (every easyvqa-hr answer is one word).
A budget maps to each method's parameters as in ``vlmdrop eval`` (``vlmdrop.eval.params.method_params``
with the LM's depth; on the embedded 5-layer LM FastV drops at layer 1 keeping ``budget``, PyramidDrop
at layers 1, 3 and 4 keeping ``budget ** (1 / 3)`` at each, i.e. ``budget`` after the last).
"Touches the shape": some kept visual position (base image or AnyRes grid, see
`vlmdrop.zoo.token_boxes`) covers a canvas box overlapping the shape's bbox.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..eval.params import method_params, num_text_layers
from .default import default_model_path, load_mini
from .easyvqa_hr import QTYPES, easyvqa_hr_records
from .mini import prompt
from .token_boxes import boxes_touch, token_boxes

log = logging.getLogger(__name__)

__all__ = ["evaluate_dropping", "main"]


@torch.no_grad()
def evaluate_dropping(model: Any, processor: Any, records: Sequence[dict[str, Any]], method: str | None,
                      budget: float, *, batch: int = 8, seed: int = 0,
                      progress: Callable[[int], Any] | None = None) -> dict[str, float]:
    """Accuracy per qtype (fractions), ``touch`` (share of samples whose kept tokens touch the shape) and
    ``touch_grid`` (same, counting only the high-resolution AnyRes grid tokens, not the base image's).

    ``method=None`` runs the unmodified model (``touch`` is then 1 by construction).  ``progress``, when
    given, is called with the number of samples of every finished batch (e.g. a tqdm bar's ``update``).
    """
    import vlmdrop

    ip = processor.image_processor
    crop = ip.crop_size["height"]
    patch = processor.patch_size
    hits: dict[str, list[float]] = {q: [] for q in QTYPES}
    touch: list[float] = []
    touch_grid: list[float] = []
    kept: list[int] = []
    before: list[int] = []
    missed: dict[str, list[float]] = {}  # per qtype: answer correct, for samples whose kept tokens miss the shape
    params = method_params(method, budget, seed=seed, num_layers=num_text_layers(model)) if method else {}
    handle = vlmdrop.apply(model, method, **params) if method else None
    try:
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            inputs = processor(images=[r["image"] for r in chunk],
                               text=[prompt(processor, r["question"]) for r in chunk],
                               return_tensors="pt", padding=True).to(model.device)
            pred = model(**inputs).logits[:, -1].argmax(-1)  # (B,)
            for j, (r, p) in enumerate(zip(chunk, pred.tolist())):
                hits[r["qtype"]].append(float(processor.tokenizer.convert_ids_to_tokens(p) == r["answer"]))
                boxes = token_boxes(r["image"].size, ip.image_grid_pinpoints, crop, patch)
                before.append(len(boxes))
                if handle is None:
                    touch.append(1.0)
                    touch_grid.append(1.0)
                    continue
                st = handle.stats.images[j]
                if len(boxes) != st.n_before:
                    raise RuntimeError(f"token map has {len(boxes)} positions, the model {st.n_before} "
                                       f"(image size {r['image'].size})")
                idx = set(st.kept_indices.tolist())
                for group in st.new_groups or []:  # merged / pooled rows carry the positions they summarise
                    idx.update(group.tolist())
                hit = [k for k in sorted(idx) if boxes[k] is not None and boxes_touch(boxes[k], r["bbox"])]
                touch.append(float(bool(hit)))
                if not hit:
                    missed.setdefault(r["qtype"], []).append(hits[r["qtype"]][-1])
                touch_grid.append(float(any(k >= (crop // patch) ** 2 for k in hit)))  # an AnyRes grid token
                kept.append(st.n_kept)
            if progress is not None:
                progress(len(chunk))
    finally:
        if handle is not None:
            handle.remove()
    out = {q: float(np.mean(v)) for q, v in hits.items() if v}
    out["all"] = float(np.mean([x for v in hits.values() for x in v]))
    out["touch"] = float(np.mean(touch))
    for q, v in missed.items():
        out[f"{q}_missed"] = float(np.mean(v))  # accuracy on the samples whose kept tokens miss the shape
        out[f"{q}_missed_n"] = len(v)
    out["touch_grid"] = float(np.mean(touch_grid))
    out["n_before_mean"] = float(np.mean(before))
    if kept:
        out["kept_mean"] = float(np.mean(kept))
    return out


def _missed(r: dict[str, float]) -> str:
    parts = [f"{r[q + '_missed']:.3f} ({r[q + '_missed_n']})" if q + "_missed" in r else "-"
             for q in ("shape", "color")]
    return ", ".join(parts)


def _table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of ``results`` (first entry ``full``), fractions with 3 decimals."""
    full = results["full"]
    lines = ["| config | shape | colour | yes/no | all | shape / full | colour / full | yes/no / full | touch "
             "| touch (grid) | shape, colour when missed | kept tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        kept = f"{r['kept_mean']:.1f}" if "kept_mean" in r else f"{r.get('n_before_mean', 0):.1f} (all)"
        rel = " | ".join(f"{r[q] / full[q]:.3f}" if full.get(q) else "-" for q in QTYPES)
        lines.append(f"| {name} | {r['shape']:.3f} | {r['color']:.3f} | {r['yes_no']:.3f} | {r['all']:.3f} | "
                     f"{rel} | {r['touch']:.3f} | {r['touch_grid']:.3f} | {_missed(r)} | {kept} |")
    return "\n".join(lines)


LEGEND = """\
shape, colour, yes/no, all: accuracy of the greedy first answer token, per question type and overall.
shape / full, colour / full, yes/no / full: that accuracy divided by the full model's.
touch: share of samples where some kept visual token's canvas box overlaps the shape (merged / pooled rows count
  the positions they summarise; FastV, PyramidDrop: the tokens left in the last layer); touch (grid): the same,
  counting only the high-resolution AnyRes grid tokens.
shape, colour when missed: accuracy on the shape / colour questions whose kept tokens miss the shape (how many).
kept tokens: mean visual tokens per image after dropping (full: all of them)."""


def _progress_bar(label: str, total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="sample", file=sys.stderr, leave=True, dynamic_ncols=True)


def main(argv: Sequence[str] | None = None) -> int:
    import vlmdrop

    p = argparse.ArgumentParser(prog="python -m vlmdrop.zoo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="folder written by vlmdrop.zoo.train (default: the embedded model)")
    p.add_argument("--n", type=int, default=240, help="easyvqa-hr test samples (multiple of 12 keeps types balanced)")
    p.add_argument("--methods", default="hired,random", help="comma-separated vlmdrop methods")
    p.add_argument("--budget", "--budgets", dest="budgets", default="0.1,0.05", help="comma-separated fractions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (without tqdm installed there is none: one log line per configuration)")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in vlmdrop.methods()]
    if unknown:
        p.error(f"--methods: unknown method(s) {unknown}; valid methods: {', '.join(vlmdrop.methods())}")
    try:
        budgets = [float(b) for b in a.budgets.split(",") if b]
    except ValueError:
        p.error(f"--budget {a.budgets!r}: give comma-separated fractions, e.g. 0.1,0.05")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, processor = load_mini(a.model)
    records = list(easyvqa_hr_records("test", seed=a.seed, n=a.n))
    configs: list[tuple[str, str | None, float]] = [("full", None, 1.0)]
    configs += [(f"{m}@{b:g}", m, b) for b in budgets for m in methods]
    print(f"model: {a.model or 'embedded default (' + str(default_model_path()) + ')'}; "
          f"{len(records)} easyvqa-hr test samples (seed {a.seed}); {len(configs)} configurations", flush=True)
    results: dict[str, dict[str, float]] = {}
    for k, (name, method, budget) in enumerate(configs, 1):
        label = f"[{k}/{len(configs)}] {name}"
        bar = _progress_bar(label, len(records), not a.no_progress)
        t0 = time.perf_counter()
        try:
            results[name] = evaluate_dropping(model, processor, records, method, budget, batch=a.batch,
                                              seed=0 if method is None else a.seed,
                                              progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if bar is None:
            log.info("%s: %d samples in %.1f s, accuracy (all) %.3f", label, len(records), time.perf_counter() - t0,
                     results[name]["all"])
    print(_table(results), flush=True)
    print(LEGEND, flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
