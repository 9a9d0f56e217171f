"""Deprecated: the tiny random-weight test models moved to :mod:`vlmdrop.testing` (this re-export goes
in the next release)."""

import warnings

from ..testing import build_internvl_tokenizer, build_tokenizer, tiny_internvl, tiny_llava, tiny_llava_next

warnings.warn("vlmdrop.zoo.tiny is deprecated: import the tiny test models from vlmdrop.testing",
              DeprecationWarning, stacklevel=2)

__all__ = ["build_internvl_tokenizer", "build_tokenizer", "tiny_internvl", "tiny_llava", "tiny_llava_next"]
