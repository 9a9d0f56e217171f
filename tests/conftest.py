import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdrop.zoo.tiny import tiny_internvl, tiny_llava, tiny_llava_next

torch.set_num_threads(2)

# (H, W) image sizes giving LLaVA-NeXT grids 1x3, 2x1, 2x2, 1x3, 3x1, 1x2 (tiny model: crops of 56 px, 4x4 patches)
IMAGE_SIZES = [(60, 130), (90, 50), (120, 110), (40, 170), (160, 45), (56, 56)]


def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))


MIXED_SIZES = [(60, 130), (90, 50), (56, 56)]

PROMPTS = ["USER: <image>\nwhat is the shape ? ASSISTANT:", "USER: <image>\nwhat color is this ? ASSISTANT:",
           "USER: <image>\nis there a red circle in the picture ? ASSISTANT:"]

_CACHE: dict = {}


def get_model(kind: str, attn: str = "sdpa"):
    key = (kind, attn)
    if key not in _CACHE:
        build = {"llava": tiny_llava, "llava_next": tiny_llava_next, "internvl": tiny_internvl}[kind]
        _CACHE[key] = build(attn_implementation=attn)
    return _CACHE[key]


@pytest.fixture(params=["llava", "llava_next"])
def kind(request):
    return request.param


def batch(processor, sizes, prompts=None, seed=0):
    images = [make_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(sizes))]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
