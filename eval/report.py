"""Per-task reports from the JSONL results: a markdown table, a CSV table and a Pareto PNG.

Columns: method, budget, score (the task's primary metric), % of full (score / full model's
score), visual tokens kept (mean per sample, with the mean before dropping), TTFT (mean, ms),
speedup (full TTFT / TTFT), decode tokens/s (mean), peak memory (max MB over samples),
samples scored and errors. Errors (missing or unreadable image, malformed record) are
listed below the table, then the parameters each configuration passed to ``vlmdrop.apply``
and any line of the result files that is not a result (ignored, left in the file).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .results import FULL, budget_label, config_key, scan_results
from .tasks import Task

log = logging.getLogger(__name__)

COLUMNS = ["method", "budget", "score", "pct_of_full", "tokens_kept", "tokens_before", "ttft_ms", "speedup",
           "decode_tps", "peak_mem_mb", "n", "errors"]


def _mean(xs: Iterable) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.mean(v) if v else None


def summarize(task: Task, out: Path, configs: Sequence[tuple[str, float]],
              expected: Sequence[str] | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per configuration plus the error records per configuration. Each row's ``corrupt``
    lists the lines of its result files that are not results (see ``results.scan_results``)."""
    task_dir = Path(out) / task.name
    rows, errors = [], {}
    full_score = full_ttft = None
    for method, budget in configs:
        res, corrupt = scan_results(task_dir, method, budget)
        if expected is not None:
            keep = set(expected)
            res = [r for r in res if r["id"] in keep]
        ok = [r for r in res if not r.get("error")]
        errs = [r for r in res if r.get("error")]
        agg = task.aggregate(ok) if ok else {"score": None}
        row = {
            "method": method, "budget": budget, "score": agg.get("score"),
            "tokens_kept": _mean(r.get("n_kept") for r in ok),
            "tokens_before": _mean(r.get("n_before") for r in ok),
            "ttft_ms": (None if _mean(r.get("ttft_s") for r in ok) is None
                        else 1000 * _mean(r.get("ttft_s") for r in ok)),
            "decode_tps": _mean(r.get("decode_tps") for r in ok),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in ok if r.get("peak_mem_mb") is not None), default=None),
            "n": len(ok), "errors": len(errs), "corrupt": [str(c) for c in corrupt],
            "extra": {k: v for k, v in agg.items() if k != "score"},
        }
        sub = task.submission(ok)
        if sub:
            path = task_dir / f"submission-{config_key(method, budget)}.json"
            path.write_text(json.dumps(sub), encoding="utf-8")
            row["extra"]["submission"] = path.name
        if method == FULL:
            full_score, full_ttft = row["score"], row["ttft_ms"]
        rows.append(row)
        errors[config_key(method, budget)] = errs
    for row in rows:
        row["pct_of_full"] = (100.0 * row["score"] / full_score
                              if row["score"] is not None and full_score else None)
        row["speedup"] = (full_ttft / row["ttft_ms"] if row["ttft_ms"] and full_ttft else None)
    return rows, errors


def _fmt(v, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_report(task: Task, out: Path, configs: Sequence[tuple[str, float]],
                 expected: Sequence[str] | None = None,
                 params: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``OUT/<task>/report.md``, ``report.csv`` and ``pareto.png``; returns the markdown path.
    ``params`` maps a configuration key (``hired@0.2``) to what ``vlmdrop.apply`` received."""
    task_dir = Path(out) / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    rows, errors = summarize(task, out, configs, expected)

    with open(task_dir / "report.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])

    lines = [f"# {task.title} ({task.name})", "",
             f"Primary metric: {task.metric}. Speedup = TTFT of the full model / TTFT.", "",
             "| method | budget | score | % of full | visual tokens (kept / before) | TTFT ms | speedup "
             "| decode tok/s | peak mem MB | n | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{_fmt(r['tokens_kept'], 1)} / {_fmt(r['tokens_before'], 1)}"
        lines.append(f"| {r['method']} | {budget_label(r['budget'])} | {_fmt(r['score'])} | "
                     f"{_fmt(r['pct_of_full'], 1)} | {tokens} | "
                     f"{_fmt(r['ttft_ms'], 1)} | {_fmt(r['speedup'])} | {_fmt(r['decode_tps'], 1)} | "
                     f"{_fmt(r['peak_mem_mb'], 0)} | {r['n']} | {r['errors']} |")
    extra_keys = sorted({k for r in rows for k in r["extra"]})
    if extra_keys:
        lines += ["", "Sub-scores:", "", "| method | budget | " + " | ".join(extra_keys) + " |",
                  "|---|---|" + "---|" * len(extra_keys)]
        for r in rows:
            lines.append(f"| {r['method']} | {budget_label(r['budget'])} | "
                         + " | ".join(_fmt(r['extra'].get(k)) for k in extra_keys) + " |")
    n_err = sum(len(v) for v in errors.values())
    lines += ["", f"## Errors ({n_err})", ""]
    if n_err:
        seen: dict[str, str] = {}
        for errs in errors.values():
            for e in errs:
                seen.setdefault(e["id"], e["error"])
        lines.append(f"{len(seen)} sample(s) could not be evaluated (each counted once per configuration):")
        lines.append("")
        lines += [f"- `{i}`: {msg}" for i, msg in seen.items()]
    else:
        lines.append("none")
    shown = [(config_key(m, b), params[config_key(m, b)]) for m, b in configs
             if m != FULL and params and config_key(m, b) in params]
    if shown:
        lines += ["", "Method parameters (what `vlmdrop.apply` received):", ""]
        lines += [f"- `{key}`: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in p.items()) for key, p in shown]
    corrupt = [c for r in rows for c in r["corrupt"]]
    if corrupt:
        lines += ["", f"## Corrupt result lines ({len(corrupt)})", "",
                  "Not results of their configuration: ignored (left in the file); their samples ran again.", ""]
        lines += [f"- {c}" for c in corrupt]
    md = task_dir / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        _plot(task, rows, task_dir / "pareto.png")
    except Exception as e:  # a plotting failure must not lose the tables
        log.warning("could not draw the Pareto plot for %s: %s", task.name, e)
    return md


def _plot(task: Task, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = sorted({r["method"] for r in rows})
    for ax, xkey, xlabel in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tokens_kept", "visual tokens kept")):
        for m in methods:
            pts = sorted((r[xkey], r["score"], r["budget"]) for r in rows
                         if r["method"] == m and r[xkey] is not None and r["score"] is not None)
            if not pts:
                continue
            xs, ys, bs = zip(*pts)
            ax.plot(xs, ys, marker="*" if m == FULL else "o", linestyle="-" if len(xs) > 1 else "",
                    markersize=12 if m == FULL else 6, label=m)
            for x, y, b in pts:
                if m != FULL:
                    ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"score ({task.metric})")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{task.title}: score vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
