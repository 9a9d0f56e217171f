"""Model adapters (packaged as `vlmdrop.adapters`); importing registers them."""

from .base import Adapter, adapter_for, register_adapter, supported_classes
from . import internvl, llava  # noqa: F401

__all__ = ["Adapter", "adapter_for", "register_adapter", "supported_classes"]
