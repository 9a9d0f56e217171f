"""Sweep driver: methods x budgets over tasks, sharded over processes, resumable.

Files (``OUT`` is ``--out``)::

    OUT/run.json                                  what produced the results (checked on resume): model,
                                                  data, seed, batch size, max new tokens and the exact
                                                  method parameters of every configuration
    OUT/<task>/<method>@<budget>.part<R>.jsonl     results of process R (:mod:`vlmdrop.eval.results`)
    OUT/<task>/report.md|csv|png                   written by :mod:`vlmdrop.eval.report`

Generation, timing and memory: :mod:`vlmdrop.eval.backend`; one untimed warm-up generation runs
per process before the first timed batch. Method parameters: :mod:`vlmdrop.eval.params`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import report
from .backend import Generator, load_generator
from .params import budget_field, method_params
from .results import FULL, ResultWriter, _json_default, config_key, scan_results
from .tasks import BadRecord, Sample, Task, get_task

log = logging.getLogger(__name__)


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
        raise ValueError(f'method_args={method_args!r} must map method names to objects, '
                         f'e.g. {{"fastv": {{"layer": 3}}}}')
    for name, args in method_args.items():
        if name == FULL:
            raise ValueError(f"--method-args gives parameters {sorted(args)} to 'full', the unmodified reference "
                             "model, which takes none")
        try:
            axis = budget_field(name)
        except ValueError:  # not a vlmdrop method (a custom backend's, or unknown: run_eval lists the valid ones)
            axis = "budget"
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
            self.rank, self.world = self._state.process_index, self._state.num_processes
            self.device = self._state.device

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


def configure(gen: Generator, method: str, budget: float, seed: int,
              params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Switch ``gen`` to one sweep point; returns what ``vlmdrop.apply`` received, as it is recorded ({} for
    the full model). A backend whose ``configure`` returns None is recorded with the model-independent
    mapping (:func:`vlmdrop.eval.params.method_params` without the depth defaults)."""
    if method == FULL:
        gen.configure(method, budget, seed)
        return {}
    applied = gen.configure(method, budget, seed, params or None)
    if applied is None:
        try:
            applied = method_params(method, budget, seed=seed, extra=params)
        except ValueError:  # a custom backend's own method
            applied = {"budget": int(budget) if budget > 1 else budget, **(params or {})}
    return _jsonable(applied)


def run_record(cfg: EvalConfig, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything that changes results: the run-wide values and each configuration's method parameters
    (``params``: configuration key -> what ``vlmdrop.apply`` received, from :func:`check_configs_on_model`)."""
    return {"version": RUN_RECORD_VERSION, "model": _model_id(cfg.model),
            "data": str(Path(cfg.data).resolve()) if cfg.data else None,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "configs": dict(params)}


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
    recorded = configure(gen, method, budget, seed, params)
    mnt = max_new_tokens if max_new_tokens is not None else task.max_new_tokens
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
                           method_args: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Apply every configuration to the loaded model and remove it again, so that a parameter the
    model cannot take (e.g. a token count as PyramidDrop's budget, an unknown parameter) stops the run
    before the first sample instead of after the full model's pass. The model is left unmodified.
    Returns, per configuration key, what ``vlmdrop.apply`` received (the run record's ``configs``)."""
    applied: dict[str, dict[str, Any]] = {}
    try:
        for method, budget in configs:
            try:
                applied[config_key(method, budget)] = configure(gen, method, budget, seed, method_args.get(method))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{config_key(method, budget)} cannot be applied to this model: {e}") from e
    finally:
        gen.configure(FULL, 1.0, seed)
    log.info("checked %d configuration(s) against the model", sum(m != FULL for m, _ in configs))
    return applied


def run_eval(cfg: EvalConfig, generator: Generator | None = None) -> dict[str, Path]:
    """Run the whole sweep and (on the main process) write the reports.

    Returns ``{task: report.md path}`` on the main process (empty on others).
    """
    cfg.validate()
    dist = _Dist()
    tasks = [get_task(t) for t in cfg.tasks]
    configs = configurations(cfg.methods, cfg.budgets)
    if generator is None and not (cfg.model or "").startswith("py:"):
        _check_methods(cfg.methods, _library_methods(), cfg.method_args)  # before a possibly long model load
    out = Path(cfg.out)
    check_out_dir(out, [t.name for t in tasks])
    # every process checks (read only): the run-wide values before the model loads, the method parameters
    # (some follow the model's depth) once it is loaded; the main process writes the record once the run can start
    old = read_run_record(out)
    merge_run_record(out, old, run_record(cfg, {}))
    loaded = {t.name: t.load(_data_dir_for(cfg.data, t), cfg.limit) for t in tasks}  # data errors first
    gen = generator if generator is not None else load_generator(cfg.model, dist.device)
    _check_methods(cfg.methods, gen.method_names(), cfg.method_args)
    record = merge_run_record(out, old, run_record(cfg, check_configs_on_model(gen, configs, cfg.seed,
                                                                                 cfg.method_args)))
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
