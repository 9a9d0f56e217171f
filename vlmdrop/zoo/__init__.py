"""Embedded models and synthetic tasks that need no download."""

from __future__ import annotations

from .easyvqa_hr import easyvqa_hr, easyvqa_hr_records


def load_default():
    """The embedded default `(model, processor)`: a small LLaVA-NeXT that needs no download.

    For now a random-weight `LlavaNextForConditionalGeneration` built from a config with a fixed seed
    and a locally built tokenizer (see `vlmdrop.zoo.tiny`); its answers are meaningless, but every
    code path — AnyRes grid, unpadding, newlines, generate — is the real one.
    """
    from .tiny import tiny_llava_next

    return tiny_llava_next(seed=0)


__all__ = ["load_default", "easyvqa_hr", "easyvqa_hr_records"]
