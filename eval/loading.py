"""One model loader and one prompt builder, for ``vlmdrop run``, ``vlmdrop eval`` and the demo.

``load_model(None)`` is the embedded default (the miniature LLaVA-NeXT of ``vlmdrop.zoo``); a folder or
hub id loads with ``AutoModelForImageTextToText`` + ``AutoProcessor`` (InternVL falls back to an
images-only processor where its video processor cannot be built, i.e. without torchvision).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "build_prompt", "load_model"]

#: ``--dtype`` choices.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(name_or_path: str | Path | None, *, attn_implementation: str = "sdpa", dtype: str = "auto",
               device: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` in eval mode from a checkpoint folder or hub id, or the embedded default when None.

    ``dtype``: one of :data:`DTYPES` (``auto``: the checkpoint's); ``device``: where the model goes (default:
    CUDA when available, else where it loaded). The embedded default always loads in float32.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if name_or_path is None:
        from vlmdrop.zoo import load_mini

        model, processor = load_mini(None, attn_implementation=attn_implementation)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, attn_implementation=attn_implementation,
                                                            dtype=torch_dtype)
        try:
            processor = AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ImportError, ValueError):
            if getattr(model.config, "model_type", None) != "internvl":
                raise
            from .processors import load_internvl_processor  # InternVL's video processor needs torchvision

            log.info("%s: AutoProcessor failed; using an images-only InternVL processor", name_or_path)
            processor = load_internvl_processor(str(name_or_path))
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def build_prompt(processor: Any, question: str) -> str:
    """One image and ``question`` in the processor's chat template, else LLaVA-1.5's
    ``USER: <image>\\n{question} ASSISTANT:``."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"
