"""The `vlmdrop` command: `vlmdrop run` (full vs reduced answer), `vlmdrop demo` (the Gradio page, `vlmdrop.demo`),
`vlmdrop bench` and, when installed, `vlmdrop eval`.

`vlmdrop run` checks every argument and the image before it loads the model, and the parameters that
depend on the model (decoder layers) right after loading, before anything generates; a user error
prints one line, ``vlmdrop run: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlmdrop.eval.loading import DTYPES, build_prompt, load_model
from vlmdrop.eval.params import depth_defaults, num_text_layers

#: LLaVA-1.5's short-answer VQA format, which the embedded model was trained on.
DEFAULT_QUESTION = "what shape does the image contain?\nAnswer the question using a single word or phrase."

#: Exit status of a user error (as argparse and `vlmdrop eval`).
USAGE_ERROR = 2

# huggingface_hub's repo-id rule: optional "owner/" then a name of word characters, "-" and "."
_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")

LAYER_RULE = ("PyramidDrop without `layers`: the paper's stages 8/16/24 of 32 layers scaled to the LM's depth L, "
              "round(L/4), round(L/2), round(3L/4) (halves round up), kept within 1..L-1, duplicates dropped "
              "(3 layers: [1, 2]); FastV without `layer`: 2, but no later than the LM's first third, "
              "i.e. 1 on an LM of fewer than 6 layers (the rule of vlmdrop.eval.params, shared by vlmdrop eval)")


class UsageError(ValueError):
    """A bad argument, image or parameter of `vlmdrop run`; printed as one line, exit status 2."""


# ======================================================================================
# checks that run before the model loads
# ======================================================================================
def parse_methods(text: str) -> list[str]:
    """``--method``: one registered name, or two comma-separated (a vision-stage and an LLM-stage method)."""
    import vlmdrop

    names = [m.strip() for m in text.split(",") if m.strip()]
    valid = vlmdrop.methods()
    for m in names:
        if m not in valid:
            raise UsageError(f"--method {m!r} is not a method; valid methods: {', '.join(valid)}")
    if not 1 <= len(names) <= 2 or len(set(names)) != len(names):
        raise UsageError(f"--method {text!r}: give one method, or one vision-stage and one LLM-stage method "
                         "separated by a comma (e.g. hired,fastv)")
    return names


def parse_budget(text: str | None) -> float | None:
    """``--budget``: a fraction in (0, 1] or a whole token count >= 1 (returned as a float, as `vlmdrop eval`)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--budget {text!r} is not a number; give a fraction in (0, 1] (e.g. 0.2) "
                         "or a token count (e.g. 64)") from None
    if not math.isfinite(value) or not (0.0 < value <= 1.0 or (value > 1.0 and value == int(value))):
        raise UsageError(f"--budget {text!r} is neither a fraction in (0, 1] (e.g. 0.2) nor a whole token count "
                         ">= 1 (e.g. 64)")
    return value


def parse_params(text: str | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--params``: one JSON object of parameters, or with a stack one object per method name."""
    if not text:
        return {m: {} for m in methods}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--params {text!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--params {text!r} must be a JSON object, e.g. '{{\"alpha\": 0.3}}'")
    if len(methods) == 1:
        return {methods[0]: value}
    bad = sorted(k for k, v in value.items() if k not in methods or not isinstance(v, dict))
    if bad:
        raise UsageError(f"--params {text!r}: with a stack give one object per method, e.g. "
                         f"'{{\"{methods[1]}\": {{...}}}}'; not a method of the stack or not an object: {bad}")
    return {m: dict(value.get(m, {})) for m in methods}


def method_kwargs(methods: list[str], budget: float | None, params: dict[str, dict[str, Any]], *,
                  num_layers: int | None = None) -> dict[str, dict[str, Any]]:
    """Per method, its keyword arguments from `vlmdrop.eval.params.method_params`, the mapping `vlmdrop eval`
    uses: ``--budget`` to FastV's ``keep``, PyramidDrop's ``ratio`` (``budget ** (1 / stages)``), the others'
    ``budget`` (``random`` seed 0), ``--params``, and with ``num_layers`` the parameters that follow the LM's
    depth where ``--params`` gives none. ``--params`` setting what ``--budget`` sets is a UsageError."""
    from vlmdrop.eval.params import method_params

    try:
        return {m: method_params(m, budget, seed=0, num_layers=num_layers, extra=params[m]) for m in methods}
    except ValueError as e:
        raise UsageError(f"--method {','.join(methods)} with --budget {budget!r} and --params: {e}") from None


def check_params(methods: list[str], kwargs: dict[str, dict[str, Any]]) -> None:
    """Validate every method's parameters (and the stack) without a model; UsageError naming the value."""
    from vlmdrop.api import _resolve

    for m in methods:
        kw = dict(kwargs[m])
        if m == "pdrop" and "layers" not in kw and isinstance(kw.get("ratio"), list):
            kw["layers"] = list(range(1, len(kw["ratio"]) + 1))  # the real layers come from the model
        try:
            _resolve(m, kw)
        except ValueError as e:
            raise UsageError(f"--method {m} with parameters {kwargs[m]}: {e}") from None
    if len(methods) == 2:
        try:
            _resolve(methods, {m: {} for m in methods})
        except ValueError as e:
            raise UsageError(f"--method {','.join(methods)}: {e}") from None


def read_image(path: str | None) -> tuple[Any, str]:
    """``(RGB image, path)``, fully decoded; UsageError for a missing, unreadable, truncated or huge image
    (more pixels than PIL's ``Image.MAX_IMAGE_PIXELS``, its decompression-bomb guard)."""
    from PIL import Image

    path = path or _sample_image()
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--image {path!r}: no such file")
    if not p.is_file():
        raise UsageError(f"--image {path!r} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                return im.convert("RGB"), path
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f"--image {path!r} is too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise UsageError(f"--image {path!r} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise UsageError(f"--image {path!r} cannot be decoded (truncated or corrupt?): {e}") from None


def check_model_arg(name: str | None) -> None:
    """``--model``: an existing checkpoint folder (with config.json) or a hub id; offline, a cached one."""
    if name is None:
        return
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"--model {name!r} is a file; give a checkpoint folder or a hub id")
        if not (p / "config.json").is_file():
            raise UsageError(f"--model {name!r}: the folder has no config.json, it is not a checkpoint")
        return
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise UsageError(f"--model {name!r}: no such folder, and not a Hugging Face hub id (owner/name)")
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        raise UsageError(f"--model {name!r}: no such folder, and not in the local Hugging Face cache "
                         "(HF_HUB_OFFLINE is set)")


# ======================================================================================
# timed generation (the model loader and the prompt builder are vlmdrop.eval.loading's)
# ======================================================================================
@dataclass
class Timed:
    """One timed `generate`: the answer, time to first token, total time (seconds), new tokens."""

    text: str
    ttft: float
    total: float
    new_tokens: int


class _FirstStepClock:
    """LogitsProcessor stamping the time (after a device synchronise) when the first step's logits arrive."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.sync()
            self.first = time.perf_counter()
        return scores


def _generate(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> Timed:
    from transformers import LogitsProcessorList

    dev = inputs["input_ids"].device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    clock = _FirstStepClock(sync)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]))
    sync()
    total = time.perf_counter() - t0
    new = out[:, inputs["input_ids"].shape[1]:]  # (1, T_new)
    text = processor.batch_decode(new, skip_special_tokens=True)[0]
    return Timed(text.strip(), (clock.first or time.perf_counter()) - t0, total, int(new.shape[1]))


def _apply(model: Any, methods: list[str], kwargs: dict[str, dict[str, Any]]):
    import vlmdrop

    if len(methods) == 1:
        return vlmdrop.apply(model, methods[0], **kwargs[methods[0]])
    return vlmdrop.apply(model, methods, **kwargs)


# ======================================================================================
# the command
# ======================================================================================
def cmd_run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        print(f"vlmdrop run: error: {' '.join(str(e).split())}", file=sys.stderr)
        return USAGE_ERROR


def _run(args: argparse.Namespace) -> int:
    # 1. everything that needs no model
    methods = parse_methods(args.method)
    budget = parse_budget(args.budget)
    kwargs = method_kwargs(methods, budget, parse_params(args.params, methods))
    check_params(methods, kwargs)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat} must be >= 1")
    image, image_path = read_image(args.image)
    check_model_arg(args.model)

    # 2. the model, then what depends on it (applied and removed once: nothing has generated yet)
    try:
        model, processor = load_model(args.model, attn_implementation=args.attn, dtype=args.dtype)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {args.model!r} cannot be loaded: {e}") from None
    depth = num_text_layers(model)
    given = parse_params(args.params, methods)
    kwargs = method_kwargs(methods, budget, given, num_layers=depth)
    auto = {m: [k for k in depth_defaults(m, depth) if k not in given[m]] if depth else [] for m in methods}
    try:
        _apply(model, methods, kwargs).remove()
    except ValueError as e:
        raise UsageError(f"--method {','.join(methods)} with parameters "
                         f"{kwargs if len(methods) > 1 else kwargs[methods[0]]}: {e}") from None

    inputs = processor(images=image, text=build_prompt(processor, args.question), return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    # 3. one untimed warm-up of each, then --repeat timed rounds, full and reduced interleaved
    #    (the order alternates per round so that a slow drift of the machine hits both alike)
    def reduced() -> tuple[Timed, Any]:
        handle = _apply(model, methods, kwargs)
        try:
            return _generate(model, processor, inputs, args.max_new_tokens), handle
        finally:
            handle.remove()

    _generate(model, processor, inputs, args.max_new_tokens)
    reduced()
    runs_full: list[Timed] = []
    runs_red: list[Timed] = []
    handle = None
    for i in range(args.repeat):
        if i % 2 == 0:
            runs_full.append(_generate(model, processor, inputs, args.max_new_tokens))
        t, handle = reduced()
        runs_red.append(t)
        if i % 2 == 1:
            runs_full.append(_generate(model, processor, inputs, args.max_new_tokens))

    # 4. report
    st = handle.stats.images[0]
    label = handle.method
    width = max(8, len(label))
    configs = handle.config if isinstance(handle.config, tuple) else (handle.config,)
    setting = "; ".join(repr(c) for c in configs)
    if budget is not None:
        setting += f"  (--budget {args.budget} mapped as vlmdrop eval maps it)"
    if any(auto.values()):
        setting += f"  ({', '.join(k for m in methods for k in auto[m])} from the {depth}-layer LM)"
    print(f"model:    {args.model or 'embedded default (miniature LLaVA-NeXT trained on easyvqa-hr)'}")
    print(f"image:    {image_path} ({image.width}x{image.height})")
    print(f"question: {args.question}")
    print(f"method:   {setting}")
    print(f"{'full':<{width}} ({st.n_before} visual tokens): {runs_full[-1].text!r}")
    print(f"{label:<{width}} ({st.n_kept} visual tokens): {runs_red[-1].text!r}")
    if st.crop_kept:
        order = ("tiles in order, thumbnail last" if getattr(model.config, "model_type", "") == "internvl"
                 else "base image first")
        print(f"kept per crop ({order}): {st.crop_kept}  budgets: {st.crop_budgets}")
    if st.layer_tokens:
        print(f"image tokens per LLM layer: {st.layer_tokens}")
    print(f"tokens kept: {st.n_kept}/{st.n_before} = {st.n_kept / st.n_before:.1%}")
    ttft_f, ttft_r = (statistics.median(r.ttft for r in runs) for runs in (runs_full, runs_red))
    tot_f, tot_r = (statistics.median(r.total for r in runs) for runs in (runs_full, runs_red))
    device = "cuda" if inputs["input_ids"].is_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"time, median of {args.repeat} interleaved runs after one warm-up each ({device}):")
    print(f"  {'':<{width}}  time to first token   generate")
    for name, ttft, tot, runs in (("full", ttft_f, tot_f, runs_full), (label, ttft_r, tot_r, runs_red)):
        print(f"  {name:<{width}}  {ttft:>12.4f} s        {tot:.4f} s ({runs[-1].new_tokens} new tokens)")
    print(f"  ratio {label}/full: time to first token {ttft_r / ttft_f:.2f}, generate {tot_r / tot_f:.2f}")
    print("  (time to first token: start of generate until the first step's logits, i.e. vision tower, dropping "
          "and LLM prefill, stamped by a LogitsProcessor after a device synchronise, as vlmdrop eval does)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`vlmdrop demo`: check the arguments, then hand over to `vlmdrop.demo.launch` (blocks until stopped)."""
    try:
        if args.port is not None and not 0 <= args.port <= 65535:
            raise UsageError(f"--port {args.port} is not a port number (0..65535)")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
        check_model_arg(args.model)
        from vlmdrop.demo import launch

        try:
            launch(model=args.model, host=args.host, port=args.port, share=args.share, dtype=args.dtype,
                   device=args.device, attn_implementation=args.attn, max_new_tokens=args.max_new_tokens)
        except ImportError as e:
            if e.name != "gradio":
                raise
            raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"vlmdrop demo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _sample_image() -> str:
    from importlib.resources import files

    return str(files("vlmdrop.zoo") / "assets" / "sample.png")


def build_parser() -> argparse.ArgumentParser:
    import vlmdrop

    p = argparse.ArgumentParser(prog="vlmdrop", description="Training-free visual-token dropping for HF VLMs")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer one question with the full and the reduced model",
                       description="Answer one question with the full and the reduced model; print both answers, "
                                   "the visual tokens kept and the median times. Arguments and the image are "
                                   "checked before the model loads; a user error prints one line and exits 2.")
    r.add_argument("--image", default=None,
                   help="path of an image file (default: a bundled held-out easyvqa-hr canvas, a green circle)")
    r.add_argument("--question", default=DEFAULT_QUESTION,
                   help="question about the image (default: a shape question in LLaVA's short-answer format)")
    r.add_argument("--method", default="hired",
                   help=f"one of {', '.join(vlmdrop.methods())}, or a vision-stage and an LLM-stage method "
                        "separated by a comma (e.g. hired,fastv); default hired")
    r.add_argument("--budget", default=None,
                   help="fraction in (0, 1] (e.g. 0.2) or token count (e.g. 64), mapped as in vlmdrop eval: FastV's "
                        "keep, PyramidDrop's ratio (budget ** (1 / stages), so that the budget is what is left "
                        "after the last stage), the others' budget; with a stack, each method's (default: the "
                        "method's own defaults)")
    r.add_argument("--params", default=None,
                   help='other method parameters as JSON, e.g. \'{"alpha": 0.3}\'; with a stack one object per '
                        'method, e.g. \'{"fastv": {"layer": 1}}\'. ' + LAYER_RULE)
    r.add_argument("--model", default=None, help="checkpoint folder or hub id (default: embedded model)")
    r.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    r.add_argument("--dtype", default="auto", choices=list(DTYPES))
    r.add_argument("--max-new-tokens", type=int, default=20)
    r.add_argument("--repeat", type=int, default=3,
                   help="timed runs of each model after one warm-up each, full and reduced interleaved; "
                        "the medians are printed (default 3)")
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="serve the Gradio side-by-side demo (needs the demo extra)",
                       description="Serve the Gradio page comparing the full and the reduced model side by side "
                                   "(pip install 'vlmdrop[demo]'). Binds to 127.0.0.1 unless --host says otherwise.")
    d.add_argument("--model", default=None, help="checkpoint folder or hub id (default: embedded model)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    d.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    d.add_argument("--dtype", default="auto", choices=list(DTYPES))
    d.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: CUDA when available)")
    d.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    d.add_argument("--max-new-tokens", type=int, default=24, help="initial value of the page's slider")
    d.set_defaults(func=cmd_demo)
    from vlmdrop.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    try:
        from vlmdrop.eval import cli as eval_cli
    except ImportError:
        eval_cli = None
    if eval_cli is not None and hasattr(eval_cli, "add_parser"):
        eval_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
