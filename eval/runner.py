"""Sweep runner: methods x budgets over tasks, one JSONL line per finished sample, resumable,
sharded over processes.

Files (``OUT`` is ``--out``)::

    OUT/run.json                                  what produced the results (checked on resume): model,
                                                  data, seed, batch size, max new tokens and the exact
                                                  method parameters of every configuration
    OUT/<task>/<method>@<budget>.part<R>.jsonl     results of process R (one line per sample)
    OUT/<task>/report.md|csv|png                   written by :mod:`vlmdrop.eval.report`

Timing (documented in ``docs-evaluating.md``): the inputs are on the device before the clock
starts, so image preprocessing and tokenisation are excluded. A ``LogitsProcessor`` stamps
the time (after a CUDA synchronise) every time ``generate`` hands it a step's logits.
TTFT = first stamp - start of ``generate``: vision tower, token dropping and LLM prefill.
Decode speed for a sample with n new tokens = (n - 1) / (stamp of its n-th step - first
stamp). With a batch, every sample of the batch shares the batch's TTFT. One untimed
warm-up generation runs per process before the first timed batch.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each batch); on CPU the
process peak RSS (``VmHWM``), reset before each batch through ``/proc/self/clear_refs``
when the kernel allows it, else the lifetime peak (``ru_maxrss``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .tasks import BadRecord, Sample, Task, get_task

log = logging.getLogger(__name__)

FULL = "full"


# ======================================================================================
# configuration
# ======================================================================================
@dataclass
class EvalConfig:
    """Everything one ``vlmdrop eval`` invocation needs."""

    tasks: list[str]
    out: str
    methods: list[str] = field(default_factory=lambda: ["hired"])
    budgets: list[float] = field(default_factory=lambda: [0.2])
    data: str | None = None
    model: str | None = None
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    seed: int = 0
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    report: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending value for anything that would run something else than
        what the rows, files and reports will say (checked at construction and again by ``run_eval``)."""
        _check_list("tasks", self.tasks, "task")
        canonical = [get_task(t).name for t in self.tasks]  # unknown names list the valid ones
        _check_unique("tasks", self.tasks, canonical, "task", repr)
        _check_list("methods", self.methods, "method")
        if not all(isinstance(m, str) and m for m in self.methods):
            raise ValueError(f"methods={self.methods!r}: every method must be a non-empty name")
        _check_unique("methods", self.methods, self.methods, "method", repr)
        _check_list("budgets", self.budgets, "budget")
        for b in self.budgets:
            check_budget(b)
        _check_unique("budgets", self.budgets, [float(b) for b in self.budgets], "budget", lambda b: f"{b:g}")
        _check_count("limit", self.limit, optional=True)
        _check_count("batch_size", self.batch_size)
        _check_count("max_new_tokens", self.max_new_tokens, optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")
        check_method_args(self.method_args)


def _check_list(name: str, values: Any, what: str) -> None:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{name}={values!r} must be a list of {what}s")
    if not values:
        raise ValueError(f"{name}={list(values)!r} is empty: give at least one {what}")


def _check_unique(name: str, values: Sequence[Any], keys: Sequence[Any], what: str, show: Callable[[Any], str]) -> None:
    seen: set[Any] = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"{name}={list(values)!r} lists {what} {show(k)} twice")
        seen.add(k)


def _check_count(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a whole number >= 1")


def check_budget(budget: Any) -> float:
    """A sweep budget: a fraction in (0, 1] or a whole token count > 1; raises ValueError naming it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget {budget!r} is not a number")
    if not math.isfinite(budget):
        raise ValueError(f"budget {budget!r} is not a finite number")
    if not (0.0 < budget <= 1.0 or (budget > 1 and budget == int(budget))):
        raise ValueError(f"budget {budget:g} is neither a fraction in (0, 1] nor a whole number of tokens")
    return float(budget)


def check_method_args(method_args: Any) -> None:
    """``--method-args`` may neither give parameters to the full model nor set the parameter that the
    budget axis sweeps (nor random's ``seed``, which ``--seed`` sets): the run would say ``hired@0.2``
    while something else ran. Names of methods are checked against the sweep by ``run_eval``."""
    if not isinstance(method_args, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                    for k, v in method_args.items()):
        raise ValueError(f'method_args={method_args!r} must map method names to objects, e.g. {{"fastv": {{"layer": 3}}}}')
    for name, args in method_args.items():
        if name == FULL:
            raise ValueError(f"--method-args gives parameters {sorted(args)} to 'full', the unmodified reference "
                             "model, which takes none")
        axis = BUDGET_PARAMETER.get(name, "budget")
        if axis in args:
            raise ValueError(f"--method-args sets {name}'s {axis!r} ({args[axis]!r}), the parameter that --budget "
                             f"sweeps: the results would be labelled {name}@<budget> while {axis}={args[axis]!r} ran; "
                             "give the value with --budget instead")
        if name == "random" and "seed" in args:
            raise ValueError(f"--method-args sets random's 'seed' ({args['seed']!r}); use --seed, which is recorded "
                             "with the run")


def configurations(methods: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """The sweep: the full model (reference) first, then every method x budget."""
    out: list[tuple[str, float]] = [(FULL, 1.0)]
    for m in methods:
        if m == FULL:
            continue
        for b in budgets:
            if (m, float(b)) not in out:
                out.append((m, float(b)))
    return out


# The parameter each method's budget axis maps to (the rest take ``budget``). PyramidDrop's
# ``ratio`` is the fraction kept at *each* stage boundary, not an overall budget.
BUDGET_PARAMETER: dict[str, str] = {"fastv": "keep", "pdrop": "ratio"}


def method_params(method: str, budget: float, seed: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vlmdrop.apply(model, method, **kw)`` at one sweep point.

    A budget above 1 is a token count (int), else a fraction; ``random`` also gets ``seed``;
    ``extra`` (from ``--method-args``) is added last.
    """
    kw: dict[str, Any] = {BUDGET_PARAMETER.get(method, "budget"): int(budget) if budget > 1 else budget}
    if method == "random":
        kw["seed"] = seed
    kw.update(extra or {})
    return kw


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


# ======================================================================================
# JSONL results with resume
# ======================================================================================
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


# ======================================================================================
# generation backends
# ======================================================================================
@dataclass
class GenOutput:
    """What a backend returns for one sample."""

    text: str
    n_before: int | None = None
    n_kept: int | None = None
    ttft_s: float | None = None
    decode_tps: float | None = None
    peak_mem_mb: float | None = None
    n_new_tokens: int | None = None


class Generator(Protocol):
    """A model backend. ``configure`` switches the dropping method; ``generate`` answers a batch."""

    def method_names(self) -> list[str]: ...

    def configure(self, method: str, budget: float, seed: int, params: dict[str, Any] | None = None) -> None: ...

    def generate(self, prompts: list[str], images: list[Any], max_new_tokens: int) -> list[GenOutput]: ...


class _StepClock:
    """LogitsProcessor that timestamps every decoding step (after a device synchronise)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class HFGenerator:
    """Backend for a Hugging Face VLM + processor, dropping through the public ``vlmdrop`` API."""

    def __init__(self, model: Any, processor: Any, device: Any = None):
        import torch

        if device is None and torch.cuda.is_available():
            device = torch.device("cuda")
        self.model = model
        self.processor = processor
        self.device = device if device is not None else next(model.parameters()).device
        if device is not None:
            self.model.to(device)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        self.handle = None
        self.method = FULL
        cfg = model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self._torch = torch
        self._cuda = self.device is not None and str(self.device).startswith("cuda")

    def method_names(self) -> list[str]:
        import vlmdrop

        return list(vlmdrop.methods())

    def configure(self, method: str, budget: float, seed: int, params: dict[str, Any] | None = None) -> None:
        import vlmdrop

        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.method = FULL
        self._torch.manual_seed(seed)
        if method != FULL:
            self.handle = vlmdrop.apply(self.model, method, **method_params(method, budget, seed, params))
            self.method = method

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def build_prompt(self, question: str) -> str:
        """The processor's chat template if it has one, else LLaVA-1.5's ``USER: <image>\\n{q}\\nASSISTANT:``."""
        template = getattr(self.processor, "chat_template", None)
        if template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return f"USER: <image>\n{question}\nASSISTANT:"

    def _sync(self) -> None:
        if self._cuda:
            self._torch.cuda.synchronize(self.device)

    def generate(self, prompts: list[str], images: list[Any], max_new_tokens: int) -> list[GenOutput]:
        torch = self._torch
        from transformers import LogitsProcessorList

        texts = [self.build_prompt(p) for p in prompts]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        pv = inputs.get("pixel_values")
        if pv is not None and pv.is_floating_point():
            inputs["pixel_values"] = pv.to(self.model.dtype)
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _rss_reset()
        clock = _StepClock(self._sync)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      logits_processor=LogitsProcessorList([clock]))
        self._sync()
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20) if self._cuda else _rss_peak_mb()
        prompt_len = inputs["input_ids"].shape[1]
        new = out[:, prompt_len:]  # (B, T_new)
        ttft = clock.times[0] - t0 if clock.times else None
        stats = list(self.handle.stats.images) if self.handle is not None else []
        results = []
        for i in range(new.shape[0]):
            ids = new[i].tolist()
            n = len(ids)
            for k, t in enumerate(ids):
                if t in self.eos_ids:
                    n = k + 1
                    break
            text = self.processor.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            if self.handle is None:
                n_img = int((inputs["input_ids"][i] == self.image_token_id).sum()) if self.image_token_id is not None else None
                n_before = n_kept = n_img
            elif len(stats) == new.shape[0]:
                n_before, n_kept = int(stats[i].n_before), int(stats[i].n_kept)
            else:
                rows = [s for s in stats if getattr(s, "sample", None) == i]
                n_before = sum(int(s.n_before) for s in rows) if rows else None
                n_kept = sum(int(s.n_kept) for s in rows) if rows else None
            tps = None
            if n > 1 and len(clock.times) >= n and clock.times[n - 1] > clock.times[0]:
                tps = (n - 1) / (clock.times[n - 1] - clock.times[0])
            results.append(GenOutput(text, n_before, n_kept, ttft, tps, peak, n))
        return results


def load_generator(spec: str | None, device: Any = None) -> Generator:
    """Build a backend. ``None``: the embedded default model (``vlmdrop.zoo.load_default``);
    ``py:module:factory``: ``factory()`` returns ``(model, processor)`` or a custom backend
    object (see :class:`Generator`); anything else: a
    Hugging Face model path or hub id (``AutoModelForImageTextToText`` + ``AutoProcessor``,
    sdpa attention, dtype from the checkpoint)."""
    if spec is None:
        from vlmdrop.zoo import load_default

        model, processor = load_default()
        return HFGenerator(model, processor, device)
    if spec.startswith("py:"):
        import importlib

        mod, _, attr = spec[3:].partition(":")
        obj = getattr(importlib.import_module(mod), attr)()
        if isinstance(obj, tuple) and len(obj) == 2:  # a (model, processor) factory
            return HFGenerator(obj[0], obj[1], device)
        return obj
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(spec)
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype="auto", attn_implementation="sdpa").eval()
    return HFGenerator(model, processor, device)


# ======================================================================================
# the sweep
# ======================================================================================
class _Dist:
    """Process rank / count through accelerate when launched with it, else a single process."""

    def __init__(self) -> None:
        self.rank, self.world, self.device, self._state = 0, 1, None, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ:
            import torch
            from accelerate import PartialState

            # without CUDA, processes started by `accelerate launch --multi_gpu` / torchrun use gloo on CPU
            self._state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world, self.device = self._state.process_index, self._state.num_processes, self._state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None and self.world > 1:
            self._state.wait_for_everyone()


def _data_dir_for(data: str | None, task: Task) -> str | None:
    """``--data`` is the task's folder, or a parent with one sub-folder per task name."""
    if data is None:
        return None
    sub = Path(data) / task.name
    return str(sub) if sub.is_dir() else data


RUN_RECORD_VERSION = 2
RUN_GLOBALS = ("model", "data", "max_new_tokens", "seed", "batch_size")


def _model_id(model: str | None) -> str:
    if model is None:
        return "<default>"
    if not model.startswith("py:") and Path(model).exists():
        return str(Path(model).resolve())
    return model


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def apply_params(method: str, budget: float, seed: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What ``vlmdrop.apply`` receives at one sweep point, as it is recorded ({} for the full model)."""
    return {} if method == FULL else _jsonable(method_params(method, budget, seed, extra))


def run_record(cfg: EvalConfig, configs: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """Everything that changes results: the run-wide values and each configuration's method parameters."""
    return {"version": RUN_RECORD_VERSION, "model": _model_id(cfg.model),
            "data": str(Path(cfg.data).resolve()) if cfg.data else None,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "configs": {config_key(m, b): apply_params(m, b, cfg.seed, cfg.method_args.get(m)) for m, b in configs}}


def read_run_record(out: Path) -> dict[str, Any] | None:
    """``OUT/run.json``, or None when there is none; raises ValueError when it is not a run record."""
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a vlmdrop run record ({e}); choose another --out") from e
    if not isinstance(old, dict):
        raise ValueError(f"{path} is not a vlmdrop run record (a JSON {type(old).__name__}); choose another --out")
    version = old.get("version")
    if version is None:
        raise ValueError(f"{path} was written by an older vlmdrop eval that did not record --seed, --batch-size and "
                         "the parameters of each configuration; its results cannot be matched to this run: choose "
                         "another --out")
    if version != RUN_RECORD_VERSION or not isinstance(old.get("configs"), dict):
        raise ValueError(f"{path} has run record version {version!r} (this vlmdrop writes {RUN_RECORD_VERSION}); "
                         "choose another --out")
    return old


def merge_run_record(out: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The record to write: ``old`` plus the new configurations. Raises ValueError (before anything
    runs) when ``out`` holds results of another run: any run-wide value differs, or a configuration
    present in both ran with other method parameters."""
    if old is None:
        parts = sorted(out.glob("*/*.part*.jsonl"))
        if parts:
            raise ValueError(f"{out} holds results ({len(parts)} result files, e.g. {parts[0]}) but no run.json "
                             "recording what produced them; choose another --out")
        return new
    diff = [f"{k} was {old.get(k)!r}, now {new[k]!r}" for k in RUN_GLOBALS if old.get(k) != new[k]]
    diff += [f"{key} was run with {old['configs'][key]} there, now {params}"
             for key, params in new["configs"].items() if key in old["configs"] and old["configs"][key] != params]
    if diff:
        raise ValueError(f"{out} holds results of a different run: {'; '.join(diff)}. Choose another --out, or rerun "
                         f"with the values recorded in {out / 'run.json'}")
    return {**old, "configs": {**old["configs"], **new["configs"]}}


def write_run_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``OUT/run.json`` atomically (other processes may be reading it)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".run.json.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, out / "run.json")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_out_dir(out: Path, task_names: Sequence[str]) -> None:
    """``--out`` must be a folder this process can write (it is created when missing), and each task's
    result folder in it a folder; raises ValueError naming the path otherwise."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be created: {e.strerror or e}") from e
    record = out / "run.json"
    if record.exists() and not record.is_file():
        raise ValueError(f"--out {out}: {record} is not a file")
    dirs = [out]
    for name in task_names:
        sub = out / name
        if sub.exists() and not sub.is_dir():
            raise ValueError(f"--out {out}: {sub} is a file, but the results of task {name!r} go into a folder "
                             "of that name")
        if sub.is_dir():
            dirs.append(sub)
    for d in dirs:
        try:
            fd, probe = tempfile.mkstemp(dir=d, prefix=".vlmdrop-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"--out {out}: {d} is not writable ({e.strerror or e})") from e


def load_image(image: Any) -> Any:
    """A sample's image as an RGB PIL image; raises FileNotFoundError / OSError when unusable."""
    from PIL import Image

    if image is None:
        raise ValueError("sample has no image")
    if isinstance(image, dict):  # a `datasets` Image feature kept encoded: {"bytes", "path"}
        if image.get("bytes"):
            import io

            with Image.open(io.BytesIO(image["bytes"])) as im:
                return im.convert("RGB")
        image = image.get("path")
        if not image:
            raise ValueError("sample has no image")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"missing image {image}")
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def _base_row(item: Sample | BadRecord, method: str, budget: float) -> dict:
    return {"id": item.id, "method": method, "budget": budget}


def run_task_config(task: Task, items: Sequence[Sample | BadRecord], gen: Generator, method: str, budget: float,
                    out: Path, *, rank: int = 0, world: int = 1, batch_size: int = 1,
                    max_new_tokens: int | None = None, seed: int = 0, progress: bool = True,
                    before_first: Callable[[Sequence[Sample | BadRecord]], None] | None = None,
                    params: dict[str, Any] | None = None) -> int:
    """Run one (method, budget) on this process's shard of ``items``; returns the samples done now.

    Samples are assigned to process ``k % world``; those finished in any part file are
    skipped, so a restarted run neither loses nor redoes a finished sample. Samples whose
    row is an error (a missing image, a malformed record) run again: the data may have been
    fixed since. Each row records the parameters ``vlmdrop.apply`` received (``params``) and
    the generation length used (``max_new_tokens``).
    """
    from tqdm.auto import tqdm

    _check_count("max_new_tokens", max_new_tokens, optional=True)
    task_dir = out / task.name
    results, corrupt = scan_results(task_dir, method, budget)
    if corrupt:
        log.warning("%s %s: %d line(s) of the result files are not results of this configuration and are "
                    "ignored (first: %s)", task.name, config_key(method, budget), len(corrupt), corrupt[0])
    done = {r["id"] for r in results if not r.get("error")}
    todo = [s for k, s in enumerate(items) if k % world == rank and s.id not in done]
    if not todo:
        return 0
    if before_first is not None and any(isinstance(s, Sample) for s in todo):
        before_first(items)
    writer = ResultWriter(task_dir / f"{config_key(method, budget)}.part{rank}.jsonl")
    if method == FULL:
        gen.configure(method, budget, seed)
    else:
        gen.configure(method, budget, seed, params or None)
    mnt = max_new_tokens if max_new_tokens is not None else task.max_new_tokens
    recorded = apply_params(method, budget, seed, params)
    scores: list[float] = []
    bar = tqdm(total=len(todo), desc=f"{task.name} {config_key(method, budget)}", disable=not progress, leave=False)
    n_done = 0
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ok: list[Sample] = []
            images = []
            for s in batch:
                if isinstance(s, BadRecord):
                    writer.write({**_base_row(s, method, budget), "error": s.error})
                    continue
                try:
                    images.append(load_image(s.image))
                    ok.append(s)
                except Exception as e:
                    writer.write({**_base_row(s, method, budget), "error": f"image: {type(e).__name__}: {e}"})
            if ok:
                outs = gen.generate([s.prompt for s in ok], images, mnt)
                for s, o in zip(ok, outs):
                    score = task.score(s.target, s.meta, o.text)
                    if score is not None:
                        scores.append(score)
                    row = {**_base_row(s, method, budget), "answer": o.text, "score": score, "target": s.target,
                           "meta": s.meta, "n_before": o.n_before, "n_kept": o.n_kept, "ttft_s": o.ttft_s,
                           "decode_tps": o.decode_tps, "peak_mem_mb": o.peak_mem_mb,
                           "n_new_tokens": o.n_new_tokens, "batch_size": len(ok), "params": recorded,
                           "max_new_tokens": mnt, "error": None}
                    writer.write(row)
            n_done += len(batch)
            bar.update(len(batch))
            if scores:
                bar.set_postfix(score=f"{100 * sum(scores) / len(scores):.1f}")
    finally:
        bar.close()
        writer.close()
    return n_done


def _warmup(gen: Generator, items: Sequence[Sample | BadRecord]) -> None:
    for s in items:
        if isinstance(s, Sample):
            try:
                img = load_image(s.image)
            except Exception:
                continue
            gen.configure(FULL, 1.0, 0)
            gen.generate([s.prompt], [img], 2)
            return


def _library_methods() -> list[str]:
    import vlmdrop

    return list(vlmdrop.methods())


def _check_methods(requested: Sequence[str], available: Sequence[str],
                   method_args: dict[str, dict[str, Any]] | None = None) -> None:
    valid = [FULL] + list(available)
    bad = [m for m in requested if m not in valid]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; valid methods: {', '.join(valid)}")
    for name in method_args or {}:
        if name not in valid:
            raise ValueError(f"unknown method {name!r} in --method-args; valid methods: {', '.join(valid)}")
        if name not in requested:
            raise ValueError(f"--method-args has parameters for {name!r}, which is not in --method "
                             f"({', '.join(requested)}); add it to --method or drop its parameters")


def check_configs_on_model(gen: Generator, configs: Sequence[tuple[str, float]], seed: int,
                           method_args: dict[str, dict[str, Any]]) -> None:
    """Apply every configuration to the loaded model and remove it again, so that a parameter the
    model cannot take (e.g. PyramidDrop's default layers on a 3-layer LM) stops the run before the
    first sample instead of after the full model's pass. The model is left unmodified."""
    try:
        for method, budget in configs:
            if method == FULL:
                continue
            try:
                gen.configure(method, budget, seed, method_args.get(method) or None)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{config_key(method, budget)} cannot be applied to this model: {e}") from e
    finally:
        gen.configure(FULL, 1.0, seed)
    log.info("checked %d configuration(s) against the model", sum(m != FULL for m, _ in configs))


def run_eval(cfg: EvalConfig, generator: Generator | None = None) -> dict[str, Path]:
    """Run the whole sweep and (on the main process) write the reports.

    Returns ``{task: report.md path}`` on the main process (empty on others).
    """
    from . import report

    cfg.validate()
    dist = _Dist()
    tasks = [get_task(t) for t in cfg.tasks]
    configs = configurations(cfg.methods, cfg.budgets)
    if generator is None and not (cfg.model or "").startswith("py:"):
        _check_methods(cfg.methods, _library_methods(), cfg.method_args)  # before a possibly long model load
    out = Path(cfg.out)
    check_out_dir(out, [t.name for t in tasks])
    # every process checks (read only); the main one writes the record once the run can start
    record = merge_run_record(out, read_run_record(out), run_record(cfg, configs))
    loaded = {t.name: t.load(_data_dir_for(cfg.data, t), cfg.limit) for t in tasks}  # data errors first
    gen = generator if generator is not None else load_generator(cfg.model, dist.device)
    _check_methods(cfg.methods, gen.method_names(), cfg.method_args)
    check_configs_on_model(gen, configs, cfg.seed, cfg.method_args)
    if dist.main:
        write_run_record(out, record)
    dist.barrier()
    warm = [False]

    def warmup(items: Sequence[Sample | BadRecord]) -> None:
        if not warm[0]:
            _warmup(gen, items)
            warm[0] = True

    for t in tasks:
        items = loaded[t.name]
        for method, budget in configs:
            run_task_config(t, items, gen, method, budget, out, rank=dist.rank, world=dist.world,
                            batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                            progress=cfg.progress and dist.main, before_first=warmup,
                            params=cfg.method_args.get(method))
    if hasattr(gen, "close"):
        gen.close()
    dist.barrier()
    paths: dict[str, Path] = {}
    if dist.main and cfg.report:
        for t in tasks:
            paths[t.name] = report.write_report(t, out, configs, expected=[s.id for s in loaded[t.name]],
                                                params=record["configs"])
    return paths
