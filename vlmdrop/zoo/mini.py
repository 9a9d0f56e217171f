"""The miniature LLaVA-NeXT that `vlmdrop.zoo.train` trains on task "easyvqa-hr".

A real `LlavaNextForConditionalGeneration` (CLIP tower with a CLS token, MLP projector, Llama LM)
built from configs, and a real `LlavaNextProcessor` whose word-level tokenizer is built locally
from the vocabulary of easy-VQA's questions and answers (lower-cased, punctuation split off).

Sizes: tiles of :data:`CROP` = 112 px cut into :data:`PATCH` = 16 px patches, i.e. 7 x 7 = 49
visual tokens per tile.  The canvases of easyvqa-hr are 336-1008 px and AnyRes resizes them to
at most 2 x 2 / 3 x 1 tiles of 112 px (a factor of 1/3 for 672 px canvases); the smallest shape
(1 % of the canvas, ~67 px on a 672 x 672 canvas) is then ~22 px, between one and two patches,
and only ~11 px on the 112 px base image (its colour is visible there, its shape hardly).  A
tower with 16 px patches learned to name shapes within ~1000 steps of `vlmdrop.zoo.train`'s
stage A; one with 168 px tiles of 24 px patches (same token count, shapes at half the canvas
size) had not after 1750 (``vlmdrop/zoo/TRAINING.md``).  The pinpoints add the 1 x 1 grid
``[112, 112]`` so that a 112 px image (the curriculum's zoomed views) becomes base + one tile;
real canvases never select it (a larger grid always keeps more resolution).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

from .easyvqa_hr import ANSWER_COLORS, SHAPES

__all__ = [
    "CROP", "PATCH", "SUFFIX", "MiniConfig", "build_mini", "build_mini_processor", "build_mini_tokenizer", "pinpoints",
    "prompt",
]

CROP: int = 112
PATCH: int = 16

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
_QUESTION_WORDS = [
    "what", "is", "the", "shape", "color", "colour", "in", "this", "image", "does", "not", "contain", "there",
    "a", "an", "of", "present", "no", "yes", "picture",
]
_PROMPT_WORDS = ["user", "assistant", "answer", "question", "using", "single", "word", "or", "phrase"]
WORDS = sorted(set(_QUESTION_WORDS + _PROMPT_WORDS + list(SHAPES) + list(ANSWER_COLORS))) + list(string.punctuation)

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\nASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class MiniConfig:
    """Sizes of the miniature model."""

    crop: int = CROP
    patch: int = PATCH
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    feature_layer: int = -2  # hidden_states index the LLM receives (LLaVA: -2); 1 = after the first ViT layer

    def __post_init__(self) -> None:
        if self.crop % self.patch:
            raise ValueError(f"crop {self.crop} is not a multiple of patch {self.patch}")
        for name in ("vision_hidden", "text_hidden"):
            heads = self.vision_heads if name == "vision_hidden" else self.text_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by {heads} heads")


#: LLaVA-1.5's short-answer instruction; every training and evaluation question ends with it.
SUFFIX = "\nAnswer the question using a single word or phrase."


def prompt(processor: LlavaNextProcessor, question: str) -> str:
    """The chat-template prompt (one image, ``question`` + :data:`SUFFIX`) the miniature model is trained on."""
    from ..eval.loading import build_prompt

    return build_prompt(processor, question + SUFFIX)


def pinpoints(crop: int) -> list[list[int]]:
    """AnyRes grids (height, width) in pixels: 1 x 1, 1 x 2, 2 x 1, 2 x 2, 3 x 1, 1 x 3 tiles."""
    s = crop
    return [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def build_mini_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-casing tokenizer over `SPECIALS + WORDS`; `<image>` is a special token."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_mini_processor(cfg: MiniConfig = MiniConfig()) -> LlavaNextProcessor:
    """The real `LlavaNextProcessor` with the local tokenizer and the model's AnyRes settings."""
    tokenizer = build_mini_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.crop}, crop_size={"height": cfg.crop, "width": cfg.crop},
        image_grid_pinpoints=pinpoints(cfg.crop),
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_mini(
    cfg: MiniConfig = MiniConfig(), *, seed: int = 0
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A freshly initialised miniature LLaVA-NeXT (fixed seed) and its processor."""
    processor = build_mini_processor(cfg)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.crop, patch_size=cfg.patch,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints(cfg.crop), vision_feature_layer=cfg.feature_layer,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_(std=0.02 * cfg.text_hidden**0.5)
    model.set_attn_implementation("sdpa")
    return model, processor
