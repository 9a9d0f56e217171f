"""Model adapters (packaged as `vlmdrop.adapters`); importing registers them.  The contract: `base.py`."""

from . import internvl, llava, llava_onevision, open_clip, qwen_vl  # noqa: F401  (open_clip itself is imported only for open_clip models)
from .base import Adapter, HFVlmAdapter, ImageInput, Installation, adapter_for, register_adapter, supported_classes

__all__ = ["Adapter", "HFVlmAdapter", "ImageInput", "Installation", "adapter_for", "register_adapter",
           "supported_classes"]
