"""Local paths and ``gs://`` URIs behind one API: ``etils.epath``, which orbax and TFDS use.

A run's folder (checkpoints, ``metrics.jsonl``, ``summary.json``; also as ``--adapter`` or
``model.base_workdir``), exports, single-process sample and eval outputs and sweep folders may
be ``gs://bucket/...``. A local path keeps its exact old meaning (made absolute, read and
written with the same calls as before). What stays local raises :class:`RemotePathError` for
a ``gs://`` value, naming the key: the data cache and data inputs (memory-mapped caches,
images, tokenizers; each host prepares its own), diffusers model folders (``model.pretrained``,
``model.vae_path``: read as local files), and the shard folders of many-process sample/eval.

Object stores differ from a disk in what the rest of psa_jax relies on, so ``gs://`` is
served like this:

* a file is uploaded whole (:func:`upload_file`); an object becomes visible only once
  complete, so a reader never sees half of one -- the atomicity a local temporary name +
  ``os.replace`` gives;
* there is no folder rename: a folder result is written to a local temporary folder and its
  files uploaded one by one once complete (:func:`upload_tree`); a killed upload can leave
  some of them (never a half-written file);
* nothing can be appended to: what grows (``metrics.jsonl``) is kept in a local staging
  folder and uploaded whole from time to time (:class:`psa_jax.train.metrics_io.MetricWriter`).

epath reaches ``gs://`` through TensorFlow's gfile when TensorFlow is installed, else through
fsspec's ``gcs`` filesystem (the gcsfs package); orbax's checkpoint listing also asks
google-cloud-storage about the bucket. Both are the ``gcs`` extra (``pip install
'psa_jax[gcs]'``); :func:`check_remote` and :func:`psa_jax.core.checkpoint.check_workdir`
name what is missing before any work starts.
Other URI schemes (``s3://``, ...) are refused: orbax would write them as local folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from etils import epath

from psa_jax.core.errors import PsaJaxError

REMOTE_PREFIX = "gs://"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemotePathError(PsaJaxError, ValueError):
    """A path that cannot be used where it was given: a ``gs://`` URI for something that
    needs a local file, a URI scheme other than ``gs://``, or ``gs://`` without its client
    libraries installed."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a ``gs://`` URI (any other ``scheme://`` raises :class:`RemotePathError`)."""
    p = os.fspath(path)
    if p.startswith(REMOTE_PREFIX):
        return True
    if _SCHEME.match(p):
        raise RemotePathError(f"{p!r}: only local paths and gs:// URIs are supported")
    return False


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (``os.path.abspath``, as before), a ``gs://`` URI as given
    (without a trailing slash); never ``./gs:/...``."""
    p = os.fspath(path)
    return p.rstrip("/") if is_remote(p) else os.path.abspath(p)


def require_local(path: str | os.PathLike, what: str, why: str) -> str:
    """``path`` when local; a ``gs://`` URI raises :class:`RemotePathError` naming ``what``
    and ``why`` it must be local."""
    p = os.fspath(path)
    if is_remote(p):
        raise RemotePathError(f"{what} {p!r} must be a local path: {why}")
    return p


def check_remote(path: str | os.PathLike) -> None:
    """For a ``gs://`` path, raise :class:`RemotePathError` unless epath can reach it (TensorFlow
    or gcsfs installed, or another fsspec ``gcs`` filesystem registered); local: nothing."""
    if not is_remote(path):
        return
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class("gcs")
    except ImportError as e:
        raise RemotePathError(
            f"{os.fspath(path)!r}: gs:// paths need gcsfs and google-cloud-storage "
            "(pip install 'psa_jax[gcs]')"
        ) from e


def path(p: str | os.PathLike) -> epath.Path:
    """An ``epath.Path`` (os calls underneath for a local path, gcsfs/gfile for gs://)."""
    return epath.Path(os.fspath(p))


def exists(p: str | os.PathLike) -> bool:
    return os.path.exists(p) if not is_remote(p) else path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return os.path.isdir(p) if not is_remote(p) else path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
    return os.path.isfile(p) if not is_remote(p) else path(p).is_file()


def listdir(p: str | os.PathLike) -> list[str]:
    return os.listdir(p) if not is_remote(p) else [c.name for c in path(p).iterdir()]


def makedirs(p: str | os.PathLike) -> None:
    """``os.makedirs(exist_ok=True)``; on gs:// nothing to make (folders are implicit)."""
    if is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(p, exist_ok=True)


def open_file(p: str | os.PathLike, mode: str = "r", **kwargs: Any) -> Any:
    """``open`` for a local path; epath's ``open`` for gs:// (no append: objects are whole)."""
    if not is_remote(p):
        return open(p, mode, **kwargs)
    if "a" in mode or "+" in mode:
        raise RemotePathError(f"{os.fspath(p)!r}: objects on gs:// cannot be appended to")
    return path(p).open(mode, **kwargs)  # epath: encoding= (UTF-8 only), nothing else


def upload_file(local: str, remote: str) -> None:
    """Copy a finished local file to ``remote`` as one object (replacing an earlier one)."""
    path(local).copy(remote, overwrite=True)


def upload_tree(local: str, remote: str, seen: dict[str, tuple] | None = None) -> list[str]:
    """Upload every file under folder ``local`` to the same names under ``remote`` (files
    replaced, nothing else removed); returns the names uploaded (relative, ``/``-separated).
    ``seen`` (name -> size and mtime at its last upload, updated here): files unchanged since
    are skipped (a writer that uploads its folder again and again)."""
    names = []
    for folder, _, files in os.walk(local):
        rel = os.path.relpath(folder, local)
        for name in sorted(files):
            key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
            st = os.stat(os.path.join(folder, name))
            if seen is not None and seen.get(key) == (st.st_size, st.st_mtime_ns):
                continue
            upload_file(os.path.join(folder, name), f"{remote}/{key}")
            names.append(key)
            if seen is not None:
                seen[key] = (st.st_size, st.st_mtime_ns)
    return names


def download_file(remote: str, local: str) -> None:
    """Copy object ``remote`` to the local file ``local`` (replacing it)."""
    with path(remote).open("rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)


def remove_tree(p: str | os.PathLike) -> None:
    """Remove a folder and everything under it (gs://: every object under the prefix)."""
    if is_remote(p):
        path(p).rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged(folder: str | os.PathLike) -> Iterator[str]:
    """A local folder to write files for ``folder`` into: ``folder`` itself when local (made
    if absent); for gs:// a temporary folder whose files are uploaded to ``folder`` once the
    block completes (replacing same-named objects, removing nothing)."""
    if not is_remote(folder):
        os.makedirs(folder, exist_ok=True)
        yield os.fspath(folder)
        return
    check_remote(folder)
    with tempfile.TemporaryDirectory(prefix="psa_jax-staged-") as tmp:
        yield tmp
        upload_tree(tmp, os.fspath(folder).rstrip("/"))


@contextlib.contextmanager
def appending(p: str | os.PathLike) -> Iterator[Any]:
    """A binary file opened to append to ``p``; for gs:// a local copy of the object (if any),
    uploaded whole once the block ends, also on an error."""
    if not is_remote(p):
        with open(p, "ab") as f:
            yield f
        return
    check_remote(p)
    with tempfile.TemporaryDirectory(prefix="psa_jax-append-") as tmp:
        local = os.path.join(tmp, "file")
        if isfile(p):
            download_file(os.fspath(p), local)
        try:
            with open(local, "ab") as f:
                yield f
        finally:
            upload_file(local, os.fspath(p))
