"""Embedded models and synthetic tasks that need no download."""

from __future__ import annotations

from .default import default_model_path, load_mini
from .easyvqa_hr import easyvqa_hr, easyvqa_hr_records


def load_default():
    """The embedded default `(model, processor)`: the miniature LLaVA-NeXT trained on task "easyvqa-hr".

    A real `LlavaNextForConditionalGeneration` (CLIP tower, AnyRes grid, unpadding, newline tokens,
    Llama LM; ~1.9 M parameters) and its real `LlavaNextProcessor`, loaded with `from_pretrained` from
    the checkpoint folder shipped in the package (`default_model_path()`); no download.  It answers
    easyvqa-hr's questions (shape, colour, yes/no about a small shape on a large cluttered canvas).
    """
    return load_mini()


__all__ = ["default_model_path", "load_default", "load_mini", "easyvqa_hr", "easyvqa_hr_records"]
