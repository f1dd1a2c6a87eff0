"""Prompt tokenization for the text encoder.

Two sources, one output (``[N, L]`` int32 ids, padded to the tokenizer's ``model_max_length``
as Stable Diffusion pipelines pad):

* a local tokenizer folder: a diffusers pipeline's ``tokenizer/`` (CLIP BPE) or any
  transformers tokenizer folder; never the hub;
* the toy world's word-level tokenizer, built deterministically from its captions: the toy
  vocabulary is closed (a few hundred words), so words need no BPE, and the file is made offline.

Both wrap ids as ``BOS words EOS`` and pad with EOS, so the text encoder's pooling rule (the first
EOS position) finds the real end of the prompt.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import numpy as np

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
# Lower-cased words and single punctuation marks; the toy captions are plain English.
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """How the word-level tokenizer splits a prompt (lower case, punctuation on its own)."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike | None = None, *, max_length: int = 32
):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts``.

    Ids: BOS=0, EOS=1, UNK=2, then the words in sorted order (deterministic whatever the order
    of ``texts``). Saved to ``out_dir`` (``tokenizer.json`` + config) when given.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for w in sorted({w for t in texts for w in words(t)}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD.pattern), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        model_max_length=max_length,
    )
    if out_dir is not None:
        fast.save_pretrained(os.fspath(out_dir))
    return fast


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a local folder: a tokenizer folder, or a pipeline holding ``tokenizer/``."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    nested = os.path.join(path, "tokenizer")
    if os.path.isdir(nested) and not _has_tokenizer_files(path):
        path = nested
    if not _has_tokenizer_files(path):
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected tokenizer.json, or vocab.json + merges.txt"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _has_tokenizer_files(path: str) -> bool:
    has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
    return has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))


def tokenize(tokenizer, texts: Iterable[str], max_length: int | None = None) -> np.ndarray:
    """``[N, L]`` int32 ids: BOS, the prompt (truncated), EOS, then EOS padding to ``L``."""
    length = max_length or tokenizer.model_max_length
    out = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="np"
    )
    return out["input_ids"].astype(np.int32)
