"""The `vlmdrop` command: `vlmdrop run` (full vs reduced answer) and, when installed, `vlmdrop eval`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


#: LLaVA-1.5's short-answer VQA format, which the embedded model was trained on.
DEFAULT_QUESTION = "what shape does the image contain?\nAnswer the question using a single word or phrase."


def load_model(name_or_path: str | None, *, attn_implementation: str = "sdpa", dtype: str = "auto"):
    """`(model, processor)` from a checkpoint folder or hub id, or the embedded default when None."""
    if name_or_path is None:
        from vlmdrop.zoo import load_default

        return load_default()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, attn_implementation=attn_implementation,
                                                        dtype=torch_dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ImportError, ValueError):
        if getattr(model.config, "model_type", None) != "internvl":
            raise
        from vlmdrop.zoo.processors import load_internvl_processor  # InternVL's video processor needs torchvision

        processor = load_internvl_processor(name_or_path)
    return model.eval(), processor


def build_prompt(processor: Any, question: str) -> str:
    """The processor's chat template with one image and the question, else LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def _generate(model, processor, inputs, max_new_tokens: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    dt = time.perf_counter() - t0
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), dt


def cmd_run(args: argparse.Namespace) -> int:
    import vlmdrop
    from PIL import Image

    params = json.loads(args.params) if args.params else {}
    if args.budget is not None:
        params["budget"] = _parse_budget(args.budget)
    model, processor = load_model(args.model, attn_implementation=args.attn, dtype=args.dtype)
    image = Image.open(args.image or _sample_image()).convert("RGB")
    inputs = processor(images=image, text=build_prompt(processor, args.question), return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    full, t_full = _generate(model, processor, inputs, args.max_new_tokens)
    with vlmdrop.dropping(model, args.method, **params) as handle:
        reduced, t_red = _generate(model, processor, inputs, args.max_new_tokens)
    st = handle.stats.images[0]
    print(f"model:    {args.model or 'embedded default (miniature LLaVA-NeXT trained on easyvqa-hr)'}")
    print(f"question: {args.question}")
    print(f"full     ({st.n_before} visual tokens, {t_full:.3f} s): {full!r}")
    print(f"{args.method:<8} ({st.n_kept} visual tokens, {t_red:.3f} s): {reduced!r}")
    order = "tiles in order, thumbnail last" if getattr(model.config, "model_type", "") == "internvl" else "base image first"
    print(f"kept per crop ({order}): {st.crop_kept}  budgets: {st.crop_budgets}")
    print(f"tokens kept: {st.n_kept}/{st.n_before} = {st.n_kept / st.n_before:.1%}; "
          f"time ratio reduced/full: {t_red / t_full:.2f}")
    return 0


def _sample_image() -> str:
    from importlib.resources import files

    return str(files("vlmdrop.zoo") / "assets" / "sample.png")


def _parse_budget(text: str) -> float | int:
    return float(text) if any(c in text for c in ".eE") else int(text)


def build_parser() -> argparse.ArgumentParser:
    import vlmdrop

    p = argparse.ArgumentParser(prog="vlmdrop", description="Training-free visual-token dropping for HF VLMs")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer one question with the full and the reduced model")
    r.add_argument("--image", default=None,
                   help="path of an image file (default: a bundled held-out easyvqa-hr canvas, a green circle)")
    r.add_argument("--question", default=DEFAULT_QUESTION,
                   help="question about the image (default: a shape question in LLaVA's short-answer format)")
    r.add_argument("--method", default="hired", choices=vlmdrop.methods())
    r.add_argument("--budget", default=None, help="fraction in (0, 1] (e.g. 0.2) or token count (e.g. 64)")
    r.add_argument("--params", default=None, help='other method parameters as JSON, e.g. \'{"alpha": 0.3}\'')
    r.add_argument("--model", default=None, help="checkpoint folder or hub id (default: embedded model)")
    r.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    r.add_argument("--max-new-tokens", type=int, default=20)
    r.set_defaults(func=cmd_run)
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
