"""The demo's pictures: built-in samples and the checked reading of an uploaded file.

Samples: held-out ``easyvqa-hr`` canvases (test split, with their questions; needs the ``easy-vqa`` package,
else only the bundled canvas ``vlmdrop/zoo/assets/sample.png``) and real photographs shipped inside
scikit-image (``skimage.data``: no download; skipped when scikit-image is not installed). All are built in
memory at start-up.

Uploads: :func:`read_upload` opens only the path it is given, and only when it lies inside the folder where
Gradio stores uploads; the header is read first, so an image over :data:`MAX_IMAGE_PIXELS` is refused before it is
decoded; non-images and truncated or corrupt files raise :class:`ImageError` with a message for the page.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["MAX_IMAGE_PIXELS", "ImageError", "Sample", "load_samples", "read_upload"]

#: The largest upload the demo decodes, in pixels (width x height): 4096 x 4096, about 16.8 megapixels.
MAX_IMAGE_PIXELS = 4096 * 4096

#: The short-answer instruction the embedded model was trained with (appended to easyvqa-hr questions).
SUFFIX = "\nAnswer the question using a single word or phrase."

_PHOTOS = (("astronaut", "what is the person wearing?"), ("coffee", "what is in the cup?"),
           ("chelsea", "what animal is this?"), ("rocket", "what is in the picture?"))


class ImageError(ValueError):
    """An upload the demo will not use; the message is shown in the page."""


@dataclass(frozen=True)
class Sample:
    """A built-in picture: its label in the dropdown, the image and a question (the answer when known)."""

    label: str
    image: Image.Image
    question: str
    answer: str | None = None


def load_samples(*, n_canvases: int = 6, photos: bool = True) -> list[Sample]:
    """The built-in samples: ``n_canvases`` held-out easyvqa-hr canvases, then scikit-image's photographs."""
    out: list[Sample] = []
    try:
        from vlmdrop.zoo import easyvqa_hr_records

        for r in easyvqa_hr_records("test", seed=0, n=n_canvases):
            w, h = r["image"].size
            out.append(Sample(f"easyvqa-hr test #{len(out)}: {r['question']} ({w}x{h})", r["image"],
                              r["question"] + SUFFIX, r["answer"]))
    except ImportError as e:  # easy-vqa is not installed: the bundled canvas only
        log.info("easyvqa-hr samples unavailable (%s); using the bundled canvas", e)
        from importlib.resources import files

        with Image.open(files("vlmdrop.zoo") / "assets" / "sample.png") as im:
            out.append(Sample("easyvqa-hr held-out canvas (a green circle)", im.convert("RGB"),
                              "what shape does the image contain?" + SUFFIX, "circle"))
    if photos:
        try:
            import skimage.data
        except ImportError:
            log.info("scikit-image is not installed: no photographs among the samples")
        else:
            for name, question in _PHOTOS:
                im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
                out.append(Sample(f"photo (scikit-image): {name} ({im.width}x{im.height})", im, question))
    return out


def read_upload(path: str | Path, *, upload_root: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The RGB image of the uploaded file at ``path``, fully decoded.

    ImageError (naming the file by its base name only) when ``path`` is not inside ``upload_root``, is not an
    image PIL can read, has more than ``max_pixels`` pixels, or cannot be decoded (truncated or corrupt).
    """
    p = Path(path).resolve()
    root = Path(upload_root).resolve()
    if not p.is_relative_to(root):
        raise ImageError(f"{p.name!r} is not an uploaded file; only files uploaded in this page are read")
    if not p.is_file():
        raise ImageError(f"{p.name!r}: the upload is gone; upload it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > max_pixels:
                    raise ImageError(f"{p.name!r} is {im.width}x{im.height} = {im.width * im.height:,} pixels, "
                                     f"over the demo's limit of {max_pixels:,} pixels; upload a smaller image")
                im.load()
                return im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p.name!r} is too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{p.name!r} is not an image (PIL cannot identify it); upload a PNG, JPEG, WebP, ...") \
            from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{p.name!r} cannot be decoded (truncated or corrupt?): {e}") from None
