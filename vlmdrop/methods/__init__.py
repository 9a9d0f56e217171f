"""Built-in methods; importing this package registers them."""

from . import hired, pool, random, visionzip  # noqa: F401
