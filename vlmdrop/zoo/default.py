"""The embedded default model: the miniature LLaVA-NeXT trained on easyvqa-hr, shipped with the package.

`vlmdrop.zoo.train` wrote it (the command and its results are in the README and
``vlmdrop/zoo/TRAINING.md``); it is loaded the way a user loads any checkpoint, through
``from_pretrained`` on its folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL", "default_model_path", "load_mini"]

#: Folder name of the shipped checkpoint inside ``vlmdrop/zoo/assets``.
DEFAULT_MODEL = "mini-llava-next"


def default_model_path() -> Path:
    """Folder of the shipped checkpoint (``config.json``, ``model.safetensors``, processor and tokenizer files)."""
    return Path(str(files("vlmdrop.zoo") / "assets" / DEFAULT_MODEL))


def load_mini(path: str | Path | None = None, *, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(model, processor)`` of a folder written by `vlmdrop.zoo.train` (default: the shipped one), in eval mode."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = Path(path) if path is not None else default_model_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {folder} (expected config.json and model.safetensors)")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor
