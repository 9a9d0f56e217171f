import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib.util
import json
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdrop.testing import (
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen3_5,
    tiny_qwen3_vl,
)

# The test models are tiny: one thread is faster than two (no oversubscription on shared CI cores).
torch.set_num_threads(1)

# (H, W) image sizes giving LLaVA-NeXT grids 1x3, 2x1, 2x2, 1x3, 3x1, 1x2 (tiny model: crops of 56 px, 4x4 patches)
IMAGE_SIZES = [(60, 130), (90, 50), (120, 110), (40, 170), (160, 45), (56, 56)]


def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))


MIXED_SIZES = [(60, 130), (90, 50), (56, 56)]

PROMPTS = ["USER: <image>\nwhat is the shape ? ASSISTANT:", "USER: <image>\nwhat color is this ? ASSISTANT:",
           "USER: <image>\nis there a red circle in the picture ? ASSISTANT:"]

HAS_OPEN_CLIP = (importlib.util.find_spec("open_clip") is not None
                 and importlib.util.find_spec("torchvision") is not None)

TEXT_LAYERS = 4  # decoder layers of the tiny LLMs: room for LLM-stage drops at layers 1..3
OPEN_CLIP_LAYERS = 4  # blocks of the tiny open_clip towers (32 px images, 8 px patches -> 16 patches)
_OPEN_CLIP_VISION = {"image_size": 32, "layers": OPEN_CLIP_LAYERS, "width": 32, "patch_size": 8, "head_width": 8}
OPEN_CLIP_CONFIGS = {  # family -> open_clip vision_cfg
    "open_clip": _OPEN_CLIP_VISION,
    "open_clip_qknorm": {**_OPEN_CLIP_VISION, "qk_norm": True, "pool_type": "avg"},
    "open_clip_rn": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
}
_OPEN_CLIP_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}

_CACHE: dict = {}


def _build_open_clip(family: str):
    import open_clip

    name = f"vlmdrop-tiny-{family.replace('_', '-')}"
    if name not in open_clip.list_models():
        folder = tempfile.mkdtemp(prefix="vlmdrop_open_clip_")
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w") as f:
            json.dump({"embed_dim": 16, "vision_cfg": OPEN_CLIP_CONFIGS[family], "text_cfg": _OPEN_CLIP_TEXT}, f)
        open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval(), None


def get_model(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **config):
    """The one model cache of the suite: (model, processor) of a tiny random-weight model, built once per
    (family, attention backend, dtype, config).  Same seed for every backend and dtype, so the eager and the
    sdpa model hold the same weights; a bf16 model is its own copy (a round trip would change the fp32 weights).
    `config`: other arguments of the `vlmdrop.testing` builder (seed, vision_layers, text_layers, ...) for a
    model configured differently from the shared one.

    Families: "llava", "llava_next", "internvl", "internvl_qknorm" (qk-norm ViT), "llava_onevision" (SigLIP
    without CLS, Qwen2 LLM, grids down-sampled above anyres_max_4), "qwen2_5_vl", "qwen3_vl" (M-RoPE; windowed
    ViT / DeepStack), "qwen3_5" (Qwen3-VL's ViT, hybrid linear-attention LLM), with `TEXT_LAYERS` decoder
    layers; open_clip towers "open_clip", "open_clip_qknorm" (qk-norm, avg pool), "open_clip_rn" (ResNet:
    unsupported) with processor None (their attention is their own: pass attn="native").
    """
    key = (family, attn, dtype, tuple(sorted(config.items())))
    if key not in _CACHE:
        if family in OPEN_CLIP_CONFIGS:
            if config:
                raise ValueError(f"config={config!r}: open_clip towers take no builder arguments")
            if attn != "native":
                raise ValueError(f"attn={attn!r}: open_clip towers have one attention implementation, 'native'")
            model, proc = _build_open_clip(family)
        else:
            builders = {"llava": tiny_llava, "llava_next": tiny_llava_next, "internvl": tiny_internvl,
                        "llava_onevision": tiny_llava_onevision,
                        "internvl_qknorm": lambda **kw: tiny_internvl(use_qk_norm=True, **kw),
                        "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl, "qwen3_5": tiny_qwen3_5}
            if family not in builders:
                raise ValueError(f"family={family!r}; valid: {sorted(builders) + sorted(OPEN_CLIP_CONFIGS)}")
            model, proc = builders[family](**{"text_layers": TEXT_LAYERS, **config}, attn_implementation=attn)
        if dtype != torch.float32:
            model = model.to(dtype)
        _CACHE[key] = (model, proc)
    return _CACHE[key]


@pytest.fixture(params=["llava", "llava_next"])
def kind(request):
    return request.param


def batch(processor, sizes, prompts=None, seed=0):
    images = [make_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(sizes))]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
