"""Built-in methods; importing this package registers them."""

from . import globalcom2, hired, random  # noqa: F401
