"""Profile embeddings: one vector per user, the input of the PSA adapter's user projection.

A profile is turned into text (PSAlign's ``get_embeds.txt`` prompt, :func:`embed_prompt`) and
encoded by an encoder of :mod:`psa_jax.data.encoders`; the folder it goes into has the format of
:mod:`psa_jax.data.embed_format`.

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
import json
import os
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from psa_jax.data import profiles as prof
from psa_jax.data.embed_format import (
    FORMAT,
    MANIFEST,
    EmbeddingError,
    MissingEmbeddingError,
    read_manifest,
    read_vector,
)
from psa_jax.data.encoders import CausalLMEncoder, NpyVectors, Source, get_encoder
from psa_jax.data.profiles import ProfileError, UserProfile

# A user embedded again into a folder that has them must get their vector up to rounding.
SAME_VECTOR_RTOL, SAME_VECTOR_ATOL = 1e-4, 1e-6


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
    if banned_from == "llm" and not isinstance(src, CausalLMEncoder):
        raise EmbeddingError(f"banned_from='llm' needs a causal-lm encoder, not {src.name}")
    if isinstance(src, NpyVectors):
        banned_from = None  # made elsewhere: provenance unknown
    # An existing folder is checked (and its every vector read) before any encoding.
    old, old_vecs = None, {}
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        old = read_manifest(out_dir)
        _check_same_source(old, src, banned_from, out_dir)
        old_vecs = load_embeddings(out_dir)
    vectors, extra = _vectors(src, profiles, banned_from, batch_size, max_new_tokens)
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
    manifest = _manifest(src, users_csv, banned_from, old, {**new, **old_vecs}, added, extra)
    _write_folder(out_dir, new, added, manifest)
    return manifest


def _vectors(
    src: Source, profiles: list[UserProfile], banned_from: str | None, batch_size: int, max_new: int
) -> tuple[np.ndarray, dict]:
    """``[N, dim]`` float32 for ``profiles``, checked, and the LLM's record for the manifest
    (empty unless ``banned_from="llm"``)."""
    n, extra = len(profiles), {}
    if isinstance(src, NpyVectors):
        vectors = src.vectors([p.user_id for p in profiles])
    else:
        if banned_from == "llm":
            profiles, extra = _ask_banned(src, profiles, batch_size, max_new)
        vectors = src.encode([prof.embed_prompt(p) for p in profiles], batch_size)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (n, src.dim) or not np.isfinite(vectors).all():
        raise EmbeddingError(f"{src.name} gave {vectors.shape} (or non-finite), want {src.dim}")
    return vectors, extra


def _with_banned(profile: UserProfile, banned: tuple[str, ...]) -> UserProfile:
    # The CSV stores both lists sorted; allowed is the complement, as in PSAlign's get_banned.py.
    allowed = tuple(sorted(c for c in prof.CATEGORIES if c not in banned))
    return dataclasses.replace(profile, banned=tuple(sorted(banned)), allowed=allowed)


def _ask_banned(
    src: CausalLMEncoder, profiles: list[UserProfile], batch_size: int, max_new: int
) -> tuple[list[UserProfile], dict]:
    """The profiles with the LLM's banned categories in place of the CSV's, and its answers."""
    answers = src.answer([prof.banned_prompt(p) for p in profiles], batch_size, max_new)
    parsed = []
    for p, text in zip(profiles, answers):
        try:
            parsed.append(_with_banned(p, prof.parse_banned_answer(text)))
        except ProfileError as err:
            raise ProfileError(f"user {p.user_id}: {err}") from None
    extra = {
        "llm_answers": dict(zip([p.user_id for p in profiles], answers)),
        "llm_system_turns_folded": int(getattr(src, "system_turns_folded", 0)),
        "banned": {p.user_id: list(p.banned) for p in parsed},
    }
    return parsed, extra


def _merged_llm_record(prev: dict, extra: dict, added: list[str]) -> dict:
    """The LLM's answers for the users this run adds; earlier users keep theirs."""
    new_answers = {u: extra["llm_answers"][u] for u in added}
    new_banned = {u: extra["banned"][u] for u in added}
    folded = int(prev.get("llm_system_turns_folded", 0)) + extra["llm_system_turns_folded"]
    return {
        "llm_answers": {**prev.get("llm_answers", {}), **new_answers},
        "llm_system_turns_folded": folded,
        "banned": {**prev.get("banned", {}), **new_banned},
    }


def _manifest(
    src: Source,
    users_csv: str,
    banned_from: str | None,
    old: dict | None,
    vecs: dict[str, np.ndarray],
    added: list[str],
    extra: dict,
) -> dict:
    """The folder's manifest after this run: ``old``'s users then ``added``, every run listed."""
    all_ids = [*(old["user_ids"] if old else ()), *added]
    stacked = np.stack([vecs[u] for u in all_ids])
    with open(users_csv, "rb") as f:
        csv_sha = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    run = {
        "users_csv": os.path.basename(users_csv),
        "users_csv_sha256": csv_sha,
        "banned_from": banned_from,
        "added": len(added),
    }
    if extra:
        extra = _merged_llm_record(old or {}, extra, added)
    from psa_jax.version import __version__

    return {
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


def _write_folder(out_dir: str, new: dict[str, np.ndarray], added: list[str], manifest: dict):
    """The added vectors, then the manifest that lists them, each renamed into place."""
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
    manifest = read_manifest(directory)
    dim = manifest["dim"]
    ids = manifest["user_ids"] if user_ids is None else [prof.format_user_id(u) for u in user_ids]
    files = {u: os.path.join(directory, f"{u}.npy") for u in ids}
    known = set(manifest["user_ids"])  # a stray file from another run is not this set's vector
    missing = [u for u, f in files.items() if u not in known or not os.path.isfile(f)]
    if missing:
        raise MissingEmbeddingError(missing, directory)
    return {u: read_vector(f, dim, f"the dim of {path}") for u, f in files.items()}
