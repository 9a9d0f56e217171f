"""An `InternVLProcessor` that works without torchvision (images only).

`InternVLProcessor` requires a video processor, and `InternVLVideoProcessor` needs torchvision (its
constructor raises ImportError without it; `ProcessorMixin` then cannot even resolve the video base
class).  `internvl_processor` returns the real `InternVLProcessor` when torchvision is installed;
otherwise `ImagesOnlyInternVLProcessor`, a subclass with the same image/text behaviour and no video
processor (passing `videos=` then raises).  It saves under the processor class name
`InternVLProcessor`, so a checkpoint written here loads as the real processor where torchvision is
installed; `load_internvl_processor` rebuilds the images-only one from a saved folder where it is not.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from transformers import InternVLProcessor
from transformers.processing_utils import ProcessorMixin


class ImagesOnlyInternVLProcessor(InternVLProcessor):
    """`InternVLProcessor` without a video processor (for environments without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs) -> None:
        # InternVLProcessor.__init__ would pass a video processor to ProcessorMixin; set the same fields here.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("this InternVL processor was built without torchvision and has no video processor; "
                             "install torchvision to process videos")
        return super().__call__(images=images, text=text, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "InternVLProcessor"
        return out


ImagesOnlyInternVLProcessor.__name__ = ImagesOnlyInternVLProcessor.__qualname__ = "InternVLProcessor"


def internvl_processor(image_processor: Any, tokenizer: Any, *, image_seq_length: int,
                       chat_template: str | None = None) -> InternVLProcessor:
    """The real `InternVLProcessor` (with `InternVLVideoProcessor()`) when torchvision is installed,
    else an images-only subclass."""
    try:
        from transformers import InternVLVideoProcessor

        video = InternVLVideoProcessor()
    except ImportError:
        return ImagesOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           image_seq_length=image_seq_length, chat_template=chat_template)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                             image_seq_length=image_seq_length, chat_template=chat_template)


def load_internvl_processor(path: str) -> InternVLProcessor:
    """An InternVL processor from a saved folder or hub id, without needing torchvision."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    cfg: dict[str, Any] = {}
    for name in ("processor_config.json",):
        try:
            resolved = cached_file(path, name) if not os.path.isdir(path) else os.path.join(path, name)
        except OSError:
            resolved = None
        if resolved and os.path.exists(resolved):
            with open(resolved) as f:
                cfg = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    return internvl_processor(image_processor, tokenizer, image_seq_length=int(cfg.get("image_seq_length", 256)),
                              chat_template=getattr(tokenizer, "chat_template", None) or cfg.get("chat_template"))
