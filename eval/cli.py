"""``vlmdrop eval`` command line.

The project CLI (``vlmdrop/cli.py``) mounts it with :func:`add_parser` and dispatches to
:func:`main`; ``python -m vlmdrop.eval`` and ``accelerate launch -m vlmdrop.eval`` use
:func:`cli` directly.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Sequence

from .tasks import EmptyDatasetError, get_task, task_names


def _floats(s: str) -> list[float]:
    parts = [x.strip() for x in s.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("no value given")
    try:
        vals = [float(x) for x in parts]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--budget takes comma-separated numbers, got {s!r}") from e
    for x, v in zip(parts, vals):
        if not math.isfinite(v):  # inf, nan, and 1e400 (which reads as inf)
            raise argparse.ArgumentTypeError(f"budget {x!r} is not a finite number")
        if not (0.0 < v <= 1.0 or (v > 1 and v == int(v))):
            raise argparse.ArgumentTypeError(f"budget {v:g} is neither a fraction in (0, 1] nor a token count")
    return vals


def _count(s: str) -> int:
    """A whole number >= 1 (``--limit``, ``--batch-size``, ``--max-new-tokens``)."""
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {s!r}")
    return v


def _method_args(s: str) -> dict:
    import json

    try:
        val = json.loads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--method-args is not JSON: {e}") from e
    if not isinstance(val, dict) or not all(isinstance(v, dict) for v in val.values()):
        raise argparse.ArgumentTypeError('--method-args must map method names to objects, e.g. {"fastv": {"layer": 3}}')
    return val


def _names(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no value given")
    return names


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``p``."""
    p.add_argument("--model", default=None,
                   help="Hugging Face model path or hub id (default: the embedded tiny LLaVA-NeXT model)")
    p.add_argument("--task", required=True, type=_names,
                   help=f"comma-separated tasks: {', '.join(task_names())}")
    p.add_argument("--data", default=None,
                   help="folder with the task's files as released (or a datasets.save_to_disk folder); "
                        "may hold one sub-folder per task name")
    p.add_argument("--method", default=["hired"], type=_names,
                   help="comma-separated dropping methods (the full model always runs as the reference)")
    p.add_argument("--budget", default=[0.2], type=_floats,
                   help="comma-separated kept fractions (e.g. 0.1,0.2) or token counts (e.g. 64)")
    p.add_argument("--limit", type=_count, default=None, help="first N samples of each task (N >= 1)")
    p.add_argument("--batch-size", type=_count, default=1)
    p.add_argument("--max-new-tokens", type=_count, default=None, help="default: the task's lmms-eval setting")
    p.add_argument("--method-args", default=None, type=_method_args,
                   help='other method parameters as JSON, per method, e.g. \'{"fastv": {"layer": 3}}\' '
                        '(not the swept budget parameter, not random\'s seed)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (results are resumed from it)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Mount ``eval`` on the project CLI's subparsers; sets ``func=main``."""
    p = subparsers.add_parser("eval", help="evaluate dropping methods on VQA benchmarks",
                              description="Sweep methods x budgets over VQA benchmarks; resumable and sharded.")
    configure_parser(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed ``args``; returns the exit code."""
    from .runner import EvalConfig, run_eval

    try:
        for t in args.task:
            get_task(t)
        cfg = EvalConfig(tasks=args.task, out=args.out, methods=args.method, budgets=args.budget, data=args.data,
                         model=args.model, limit=args.limit, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, seed=args.seed,
                         method_args=args.method_args or {}, progress=not args.no_progress)
        paths = run_eval(cfg)
    except (ValueError, EmptyDatasetError, FileNotFoundError) as e:
        print(f"vlmdrop eval: error: {e}", file=sys.stderr)
        return 2
    for task, md in paths.items():
        print(f"{task}: {md}")
        print(md.read_text())
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m vlmdrop.eval``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = configure_parser(argparse.ArgumentParser(prog="vlmdrop eval"))
    return main(p.parse_args(argv))
