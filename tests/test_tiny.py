"""vlmdrop.testing: every id the tiny tokenizers can emit has a row in the embedding of every tiny model
built with them (a word listed twice once left a hole in the ids and pushed the last one past the table)."""

import pytest
import torch

from vlmdrop import testing as tiny


@pytest.mark.parametrize("specials", [tiny.SPECIALS, tiny.INTERNVL_SPECIALS], ids=["llava", "internvl"])
def test_word_lists_have_no_duplicates(specials):
    words = specials + tiny.WORDS
    assert len(set(words)) == len(words), sorted({w for w in words if words.count(w) > 1})


def test_a_repeated_word_is_refused():
    with pytest.raises(ValueError, match=r"\['a'\] more than once"):
        tiny._word_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "a"], {}, tiny.CHAT_TEMPLATE)


# non-default sizes (one layer each, other tiles), so the check does not lean on the fixtures' configs
BUILDERS = {
    "llava": lambda: tiny.tiny_llava(image_size=28, patch_size=14, vision_layers=1, text_layers=1),
    "llava_next": lambda: tiny.tiny_llava_next(image_size=28, patch_size=14, vision_layers=1, text_layers=1),
    "internvl": lambda: tiny.tiny_internvl(tile_size=32, patch_size=8, vision_layers=1, text_layers=1, max_patches=2),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_token_id_fits_the_embedding(name):
    model, processor = BUILDERS[name]()
    tok = processor.tokenizer
    vocab = tok.get_vocab()  # base vocabulary + added (special) tokens
    ids = sorted(set(vocab.values()))
    assert ids == list(range(len(ids))), "ids are not contiguous"
    emb = model.get_input_embeddings()
    assert max(ids) < emb.num_embeddings == model.config.text_config.vocab_size, (max(ids), emb.num_embeddings)
    assert model.get_output_embeddings().out_features > max(ids)
    # what the tokenizer really emits on text holding every word, each word mapped to its own id
    words = list(tiny.WORDS)
    enc = tok(" ".join(words), add_special_tokens=True)["input_ids"]
    assert tok.unk_token_id not in enc and max(enc) < emb.num_embeddings
    assert len(set(tok.convert_tokens_to_ids(words))) == len(words)
    # and the model embeds all of them (an id past the table raises IndexError here)
    with torch.no_grad():
        rows = emb(torch.tensor([ids]))
    assert rows.shape == (1, len(ids), model.config.text_config.hidden_size)


def test_the_shipped_checkpoint_tokenizer_fits_its_embedding():
    """The embedded model has its own tokenizer (vlmdrop.zoo.mini): the same property, read from the files."""
    import json

    from vlmdrop.zoo.default import default_model_path

    root = default_model_path()
    spec = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    ids = sorted(set(spec["model"]["vocab"].values()) | {t["id"] for t in spec["added_tokens"]})
    vocab_size = json.loads((root / "config.json").read_text(encoding="utf-8"))["text_config"]["vocab_size"]
    assert ids == list(range(vocab_size)), (len(ids), max(ids), vocab_size)
