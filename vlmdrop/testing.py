"""Test utilities (as transformers' ``testing_utils``): tiny random-weight LLaVA, LLaVA-NeXT, LLaVA-OneVision
and InternVL models and their processors, built from local parts.

Nothing here downloads anything: the tokenizer is a word-level `tokenizers` model wrapped in
`PreTrainedTokenizerFast`, the image processors are the real transformers classes constructed with
small settings, and the models are the real `LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration` / `InternVLForConditionalGeneration` built from configs with a
fixed seed.  They serve as the test fixtures (``tests/conftest.py``) and for users' own tests.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
_PROMPT_WORDS = [
    "USER:", "ASSISTANT:", "what", "is", "the", "shape", "color", "colour", "in", "this", "image", "?", "a",
    "an", "yes", "no", "does", "contain", "circle", "rectangle", "triangle", "red", "green", "blue", "black",
    "gray", "yellow", "teal", "brown", "describe", "there", "picture", "how", "many", "of", "and", ".", ",",
]
#: Every word once: the single letters and digits not already listed ("a" is a prompt word).  A word
#: listed twice would leave a hole in the ids, so the largest id would reach past the embedding.
WORDS = _PROMPT_WORDS + [w for w in list(string.ascii_lowercase) + [str(d) for d in range(10)]
                         if w not in _PROMPT_WORDS]


def _chat_template(image_token: str) -> str:
    """USER/ASSISTANT chat template that writes `image_token` for each image."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image_token + "\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}\nASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = _chat_template("<image>")


def _word_tokenizer(specials: list[str], extra_special_tokens: dict[str, str], chat_template: str,
                    *, isolate: tuple[str, ...] = ("?",)) -> PreTrainedTokenizerFast:
    """A left-padding word-level tokenizer over `specials + WORDS`, splitting off `isolate` strings.

    Ids are ``0 .. len(specials + WORDS) - 1``, so ``len(tokenizer)`` is the embedding size every id fits.
    """
    words = specials + WORDS
    repeated = sorted({w for w in words if words.count(w) > 1})
    if repeated:
        raise ValueError(f"tokenizer vocabulary lists {repeated} more than once; ids would skip a number and the "
                         f"largest ({len(words) - 1}) would not fit an embedding of len(tokenizer) rows")
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit()] + [pre_tokenizers.Split(t, "isolated") for t in isolate])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=extra_special_tokens, padding_side="left",
    )
    fast.chat_template = chat_template
    return fast


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is `SPECIALS + WORDS`; `<image>` is a special token."""
    return _word_tokenizer(SPECIALS, {"image_token": "<image>"}, CHAT_TEMPLATE, isolate=("?", "<image>"))


def _vision_config(image_size: int, patch_size: int, layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


def _text_config(vocab_size: int, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def tiny_llava(*, seed: int = 0, image_size: int = 56, patch_size: int = 14, vision_layers: int = 3,
               text_layers: int = 2, attn_implementation: str = "sdpa"):
    """A random-weight `LlavaForConditionalGeneration` and its `LlavaProcessor` (LLaVA-1.5 layout)."""
    tokenizer = build_tokenizer()
    config = LlavaConfig(
        vision_config=_vision_config(image_size, patch_size, vision_layers),
        text_config=_text_config(len(tokenizer), text_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def tiny_llava_next(*, seed: int = 0, image_size: int = 56, patch_size: int = 14, vision_layers: int = 3,
                    text_layers: int = 2, attn_implementation: str = "sdpa"):
    """A random-weight `LlavaNextForConditionalGeneration` (AnyRes, unpad, newline) and its processor."""
    tokenizer = build_tokenizer()
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    config = LlavaNextConfig(
        vision_config=_vision_config(image_size, patch_size, vision_layers),
        text_config=_text_config(len(tokenizer), text_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF leaves image_newline at zero-ish init; give it a distinct random value
        model.model.image_newline.normal_(std=1.0)
    model.set_attn_implementation(attn_implementation)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


INTERNVL_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<IMG_CONTEXT>", "<img>", "</img>", "<video>"]
INTERNVL_CHAT_TEMPLATE = _chat_template("<IMG_CONTEXT>")


def build_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with InternVL's `<IMG_CONTEXT>`, `<img>`, `</img>`, `<video>` special tokens."""
    return _word_tokenizer(INTERNVL_SPECIALS, {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                               "end_image_token": "</img>", "video_token": "<video>"},
                           INTERNVL_CHAT_TEMPLATE)


def tiny_internvl(*, seed: int = 0, tile_size: int = 64, patch_size: int = 8, vision_layers: int = 3,
                  text_layers: int = 2, max_patches: int = 6,
                  use_qk_norm: bool = False, attn_implementation: str = "sdpa"):
    """A random-weight `InternVLForConditionalGeneration` (InternVL 2.5/3 layout: dynamic tiling with a
    thumbnail last, CLS ViT, 0.5 pixel shuffle, MLP projector, Qwen2 LLM) and its `InternVLProcessor`.

    Tiles are `tile_size` px with `patch_size` px patches: (tile_size/patch_size)**2 / 4 tokens per tile
    (16 by default); an image becomes 1 tile, or up to `max_patches` tiles plus the thumbnail (pass
    `crop_to_patches=False` to the processor call for one tile per image).
    """
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from vlmdrop.eval.processors import internvl_processor

    tokenizer = build_internvl_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=tile_size, patch_size=patch_size, use_qk_norm=use_qk_norm,
        norm_type="rms_norm" if use_qk_norm else "layer_norm",
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    seq = (tile_size // patch_size) ** 2 // 4
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises the CLS token and position embeddings to zero; give them values
        emb = model.model.vision_tower.embeddings
        emb.cls_token.normal_(std=1.0)
        if emb.position_embeddings is not None:
            emb.position_embeddings.normal_(std=1.0)
    model.set_attn_implementation(attn_implementation)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1,
        max_patches=max_patches,
    )
    processor = internvl_processor(image_processor, tokenizer, image_seq_length=seq,
                                   chat_template=INTERNVL_CHAT_TEMPLATE)
    return model, processor


QWEN_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                 "<|video_pad|>"]
#: what a Qwen chat template writes for one image; the processor expands `<|image_pad|>` to the image's tokens
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_CHAT_TEMPLATE = _chat_template(QWEN_IMAGE)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen-VL's `<|image_pad|>`, `<|vision_start|>`, `<|vision_end|>`,
    `<|video_pad|>` special tokens."""
    return _word_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                           "vision_start_token": "<|vision_start|>",
                                           "vision_end_token": "<|vision_end|>"},
                           QWEN_CHAT_TEMPLATE, isolate=("?", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))


def _qwen_processor(cls: type, tokenizer: PreTrainedTokenizerFast, *, patch_size: int, max_tokens: int):
    """The real Qwen image (and video) processor at the tiny model's patch size: images are resized to
    multiples of 2·`patch_size` px, between 4 and `max_tokens` LLM tokens."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    unit = (2 * patch_size) ** 2  # pixels of one LLM token (2x2 patches)
    size = {"shortest_edge": 4 * unit, "longest_edge": max_tokens * unit}
    image_processor = Qwen2VLImageProcessorPil(size=size, patch_size=patch_size, temporal_patch_size=2,
                                               merge_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
               chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen2_5_vl(*, seed: int = 0, patch_size: int = 8, vision_layers: int = 4,
                    fullatt_block_indexes: tuple[int, ...] = (1, 3), window_size: int = 32, text_layers: int = 2,
                    max_tokens: int = 48, attn_implementation: str = "sdpa"):
    """A random-weight `Qwen2_5_VLForConditionalGeneration` (windowed ViT with full-attention blocks
    `fullatt_block_indexes`, 2x2 merger, M-RoPE Qwen2 LLM) and its `Qwen2_5_VLProcessor`.

    One LLM token covers 2x2 patches of `patch_size` px; a window spans `window_size` px (2x2 LLM tokens by
    default), so images larger than 32 px on a side hold several windows.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tokenizer = build_qwen_tokenizer()
    vision = {"depth": vision_layers, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
              "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "window_size": window_size, "out_hidden_size": 64, "fullatt_block_indexes": list(fullatt_block_indexes)}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, _qwen_processor(Qwen2_5_VLProcessor, tokenizer, patch_size=patch_size, max_tokens=max_tokens)


def tiny_qwen3_vl(*, seed: int = 0, patch_size: int = 8, vision_layers: int = 3,
                  deepstack_visual_indexes: tuple[int, ...] = (0, 1), text_layers: int = 2, max_tokens: int = 48,
                  attn_implementation: str = "sdpa"):
    """A random-weight `Qwen3VLForConditionalGeneration` (full-attention ViT with learned, interpolated
    position embeddings, 2x2 merger, DeepStack features from ViT layers `deepstack_visual_indexes` added to
    the first LLM layers, interleaved M-RoPE Qwen3 LLM with q/k norms) and its `Qwen3VLProcessor`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tokenizer = build_qwen_tokenizer()
    vision = {"depth": vision_layers, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
              "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
              "num_position_embeddings": 16, "deepstack_visual_indexes": list(deepstack_visual_indexes)}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, _qwen_processor(Qwen3VLProcessor, tokenizer, patch_size=patch_size, max_tokens=max_tokens)


def tiny_qwen3_5(*, seed: int = 0, patch_size: int = 8, vision_layers: int = 3, text_layers: int = 4,
                 max_tokens: int = 48, attn_implementation: str = "sdpa"):
    """A random-weight `Qwen3_5ForConditionalGeneration` (Qwen3-VL's vision path without DeepStack; a hybrid LLM
    whose layers alternate Gated DeltaNet linear attention and full attention, partial interleaved M-RoPE) and
    its `Qwen3VLProcessor`."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

    tokenizer = build_qwen_tokenizer()
    vision = {"depth": vision_layers, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
              "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
              "num_position_embeddings": 16}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "layer_types": ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)],
            "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True, "partial_rotary_factor": 0.5},
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3_5Config(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, _qwen_processor(Qwen3VLProcessor, tokenizer, patch_size=patch_size, max_tokens=max_tokens)


ONEVISION_SPECIALS = SPECIALS + ["<video>"]


def build_onevision_tokenizer() -> PreTrainedTokenizerFast:
    """`build_tokenizer` plus LLaVA-OneVision's `<video>` special token."""
    return _word_tokenizer(ONEVISION_SPECIALS, {"image_token": "<image>", "video_token": "<video>"}, CHAT_TEMPLATE,
                           isolate=("?", "<image>"))


def tiny_llava_onevision(*, seed: int = 0, image_size: int = 56, patch_size: int = 14, vision_layers: int = 3,
                         text_layers: int = 2, max_grid: int = 3, vision_aspect_ratio: str = "anyres_max_4",
                         attn_implementation: str = "sdpa"):
    """A random-weight `LlavaOnevisionForConditionalGeneration` (SigLIP tower without CLS, AnyRes grids up to
    `max_grid` x `max_grid` crops, unpadding, bilinear down-sampling of grids over N base grids with
    `vision_aspect_ratio="anyres_max_N"`, newline rows, Qwen2 LLM) and its `LlavaOnevisionProcessor`.

    Crops of `image_size` px with `patch_size` px patches (4x4 by default); with the default anyres_max_4 a
    grid whose unpadded patch count exceeds 4 * 1.1**2 base grids is down-sampled (e.g. 2x3 and 3x3 grids).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_onevision_tokenizer()
    s = image_size
    pinpoints = [[s * i, s * j] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                num_attention_heads=4, image_size=s, patch_size=patch_size, vision_use_head=False)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # a distinct random newline row
        model.model.image_newline.normal_(std=1.0)
    model.set_attn_implementation(attn_implementation)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=(s // patch_size) ** 2, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    return model, processor
