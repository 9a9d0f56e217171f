"""The JSONL result store of a sweep: one line per finished sample, resumable.

Files (``OUT`` is ``--out``)::

    OUT/<task>/<method>@<budget>.part<R>.jsonl     results of process R (one line per sample)

A line is written, flushed and fsynced as soon as its sample ends; a torn last line (a run killed
mid-write) is cut off before appending; any other line that is not a result of its file's
configuration is reported and ignored (left in the file). A finished row beats an error row.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["FULL", "CorruptLine", "ResultWriter", "budget_label", "config_key", "load_results", "read_jsonl",
           "result_files", "scan_results"]

#: The unmodified reference model's method name in a sweep.
FULL = "full"


def budget_label(budget: float) -> str:
    """``0.2``, ``64``: the short form when it reads back as the same number, else an exact one (two
    budgets never share a label: ``0.1234567`` and ``0.1234568`` both print as ``0.123457`` with ``:g``)."""
    short = f"{budget:g}"
    if float(short) == budget:
        return short
    if budget > 1 and budget == int(budget):
        return str(int(budget))
    return repr(float(budget))


def config_key(method: str, budget: float) -> str:
    """File stem of a configuration, e.g. ``hired@0.2``."""
    return f"{method}@{budget_label(budget)}"


@dataclass(frozen=True)
class CorruptLine:
    """A line of a result file that is not a result of its configuration (ignored, left in the file)."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"`{self.file}` line {self.line}: {self.reason}"


def _shown(raw: bytes, limit: int = 80) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _scan_jsonl(path: Path, repair: bool = False) -> tuple[list[tuple[int, bytes, dict]], list[CorruptLine]]:
    """(line number, raw line, object) per JSON-object line, and the lines that are not JSON objects.
    A torn last line (a run killed mid-write) is dropped -- and, with ``repair``, cut off the file so
    that appends start on a clean line; every other bad line stays where it is."""
    if not path.exists():
        return [], []
    rows: list[tuple[int, bytes, dict]] = []
    corrupt: list[CorruptLine] = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last_nonblank = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    offset = good_end = 0
    for i, raw in enumerate(lines):
        line_end = offset + len(raw) + (1 if i < len(lines) - 1 else 0)
        offset = line_end
        if not raw.strip():
            good_end = line_end
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            if i == last_nonblank:
                log.warning("%s: dropping a torn last line (%d bytes)", path, len(raw))
                break
            corrupt.append(CorruptLine(path.name, i + 1, f"not JSON: {_shown(raw)}"))
        else:
            if isinstance(obj, dict):
                rows.append((i + 1, raw, obj))
            else:
                corrupt.append(CorruptLine(path.name, i + 1, f"not a result object: {_shown(raw)}"))
        good_end = line_end
    if repair and data and (good_end < len(data) or not data.endswith(b"\n")):
        kept = data[:good_end]
        if kept and not kept.endswith(b"\n"):
            kept += b"\n"
        with open(path, "wb") as f:
            f.write(kept)
    return rows, corrupt


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Read the JSON-object lines of a result file. A torn last line (a run killed mid-write) is
    dropped -- and, with ``repair``, cut off the file so that appends start on a clean line. Any
    other line that is not a JSON object is skipped with a warning (and left in the file)."""
    rows, corrupt = _scan_jsonl(path, repair)
    for c in corrupt:
        log.warning("%s: skipping line %d (%s)", path, c.line, c.reason)
    return [obj for _, _, obj in rows]


def _result_problem(row: dict, method: str, budget: float) -> str | None:
    """Why ``row`` is not a result of (method, budget), or None."""
    err = row.get("error", ...)
    if (not isinstance(row.get("id"), str) or not isinstance(row.get("method"), str)
            or isinstance(row.get("budget"), bool) or not isinstance(row.get("budget"), (int, float))
            or not (err is None or isinstance(err, str))
            or (err is None and ("answer" not in row or "score" not in row))):
        return "not a result object"
    if row["method"] != method or float(row["budget"]) != float(budget):
        return f"a result of {config_key(row['method'], float(row['budget']))}, not of {config_key(method, budget)}"
    return None


def result_files(task_dir: Path, method: str, budget: float) -> list[Path]:
    """All parts (one per process) of one configuration."""
    return sorted(task_dir.glob(f"{config_key(method, budget)}.part*.jsonl"))


def scan_results(task_dir: Path, method: str, budget: float) -> tuple[list[dict], list[CorruptLine]]:
    """Merged results of all parts, one per sample id, and the lines that are not results of this
    configuration. A finished row beats an error row (an error is retried on resume); among
    finished rows the first is kept, among error rows the newest."""
    merged: dict[str, dict] = {}
    corrupt: list[CorruptLine] = []
    for p in result_files(task_dir, method, budget):
        rows, bad = _scan_jsonl(p)
        corrupt += bad
        for line, raw, r in rows:
            problem = _result_problem(r, method, budget)
            if problem is not None:
                corrupt.append(CorruptLine(p.name, line, f"{problem}: {_shown(raw)}" if problem == "not a result object"
                                           else problem))
                continue
            old = merged.get(r["id"])
            if old is None or old.get("error"):  # a finished row is final; an error row gives way to a newer row
                merged[r["id"]] = r
    corrupt.sort(key=lambda c: (c.file, c.line))
    return list(merged.values()), corrupt


def load_results(task_dir: Path, method: str, budget: float) -> list[dict]:
    """Merged results of all parts (see :func:`scan_results`)."""
    return scan_results(task_dir, method, budget)[0]


class ResultWriter:
    """Append-only JSONL writer: each line is flushed and fsynced as soon as a sample ends."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        read_jsonl(path, repair=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
