"""Built-in methods; importing this package registers them."""

from . import hired, random  # noqa: F401
