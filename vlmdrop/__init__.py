"""vlmdrop: training-free visual-token dropping for Hugging Face vision-language models.

    handle = vlmdrop.apply(model, "hired", budget=0.2)
    model.generate(**inputs)
    handle.stats.images[0].n_kept
    handle.remove()
"""

from .api import DropHandle, apply, dropping, methods
from .stats import DropStats, ImageStats

__version__ = "0.1.0"
__all__ = ["apply", "dropping", "methods", "DropHandle", "DropStats", "ImageStats", "__version__"]
