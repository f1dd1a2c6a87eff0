"""Tokenizers: the toy world's word-level tokenizer and local CLIP BPE folders."""

import json

import numpy as np
import pytest

from psa_jax.data.tokenizer import BOS, EOS, build_word_tokenizer, load_tokenizer, tokenize

CAPTIONS = ["a violent fight near a house at night", "A red car, in rain.", "a calm lake"]


def test_word_tokenizer_is_deterministic_and_pads_with_eos(tmp_path):
    a = build_word_tokenizer(CAPTIONS, tmp_path / "a")
    b = build_word_tokenizer(reversed(CAPTIONS), tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()  # independent of caption order
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()
    ids = tokenize(a, ["A red car, in rain.", "an unseen zebra"])
    assert ids.shape == (2, 32) and ids.dtype == np.int32
    tokens = a.convert_ids_to_tokens(ids[0, :9].tolist())
    assert tokens == [BOS, "a", "red", "car", ",", "in", "rain", ".", EOS]
    assert (ids[0, 8:] == a.eos_token_id).all()  # padded with EOS, as SD's CLIP tokenizer
    assert ids[1, 1] == a.unk_token_id  # words outside the vocabulary are UNK, never dropped


def test_saved_word_tokenizer_reloads_identically(tmp_path):
    built = build_word_tokenizer(CAPTIONS, tmp_path)
    loaded = load_tokenizer(tmp_path)
    np.testing.assert_array_equal(tokenize(loaded, CAPTIONS), tokenize(built, CAPTIONS))


def test_clip_bpe_folder_and_pipeline_root(tmp_path):
    # A miniature CLIP BPE vocabulary, in the files a diffusers pipeline's tokenizer/ holds.
    vocab = [
        "l",
        "o",
        "w",
        "e",
        "r",
        "s",
        "t",
        "i",
        "d",
        "n",
        "lo",
        "l</w>",
        "w</w>",
        "r</w>",
        "t</w>",
        "low</w>",
        "er</w>",
        "lowest</w>",
        "newer</w>",
        "wider",
        "<unk>",
        BOS,
        EOS,
    ]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 8, "pad_token": EOS})
    )
    tok = load_tokenizer(tmp_path)  # the pipeline root finds tokenizer/
    ids = tokenize(tok, ["lower newer"])
    assert ids.shape == (1, 8)
    assert ids[0, 0] == vocab.index(BOS) and vocab.index(EOS) in ids[0]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "tokenizer" / "missing")
