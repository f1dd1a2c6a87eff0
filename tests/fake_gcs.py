"""A fake ``gs://`` for tests: Google Cloud Storage's semantics over a local folder.

What stands in for GCS, and where (nothing else is patched):

* fsspec's ``gs``/``gcs`` protocols -> :class:`FakeGCSFileSystem`. ``etils.epath`` reaches
  ``gs://`` through ``fsspec.filesystem("gcs")`` when TensorFlow is absent (gcsfs in real
  use), so every epath call of psa_jax, orbax and TFDS lands here.
* orbax's TensorStore kvstore for ``gs://`` (``gcs_utils.get_kvstore_for_gcs``, the seam
  orbax itself keeps for choosing a GCS driver) -> TensorStore's ``file`` driver on the
  same folder: the array bytes of a checkpoint land beside the files epath wrote.
* orbax's bucket lookup (``gcs_utils.get_bucket``, google-cloud-storage in real use, asked
  only whether the bucket has a hierarchical namespace) -> a flat-namespace bucket.

``gs://BUCKET/KEY`` is ``<root>/BUCKET/KEY``. Like GCS (and gcsfs) and unlike a disk: a
bucket must exist; folders are implicit (one exists while an object lies under it;
``makedirs`` makes nothing); an object is written whole, visible only once its writer closes;
objects cannot be appended to or opened for update; ``mv`` is copy-then-delete.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
from fsspec.spec import AbstractFileSystem

PROTOCOLS = ("gs", "gcs")


class _ObjectWriter(io.FileIO):
    """Bytes go to a staging file outside the bucket; ``close`` makes them the object."""

    def __init__(self, staging: str, final: str) -> None:
        super().__init__(staging, "wb")
        self._staging, self._final, self._done = staging, final, False

    def close(self) -> None:
        if self.closed or self._done:
            return super().close()
        super().close()
        self._done = True
        if os.path.isdir(self._final):
            os.remove(self._staging)
            raise IsADirectoryError(f"fake gcs: a folder holds objects under {self._final}")
        os.makedirs(os.path.dirname(self._final), exist_ok=True)
        os.replace(self._staging, self._final)


class FakeGCSFileSystem(AbstractFileSystem):
    """fsspec filesystem for ``gs://``/``gcs://`` over ``root`` (set by :func:`installed`)."""

    protocol = PROTOCOLS
    root_marker = ""
    cachable = False
    root: ClassVar[str] = ""
    _count = itertools.count()

    def __init__(self, *args: Any, **storage_options: Any) -> None:
        super().__init__()  # finalize_on_close= and other gcsfs options are accepted, ignored

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = os.fspath(path) if not isinstance(path, str) else path
        for p in PROTOCOLS:
            path = path.removeprefix(f"{p}://")
        return path.strip("/")

    def _local(self, path: Any) -> str:
        key = self._strip_protocol(path)
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"fake gcs: not an object path: {path!r}")
        if not os.path.isdir(os.path.join(self.root, parts[0])):
            raise FileNotFoundError(f"fake gcs: no bucket {parts[0]!r} ({path})")
        return os.path.join(self.root, *parts)

    @staticmethod
    def _has_objects(folder: str) -> bool:
        return any(files for _, _, files in os.walk(folder))

    def _entry(self, local: str, name: str) -> dict | None:
        if os.path.isfile(local):
            st = os.stat(local)
            return {"name": name, "size": st.st_size, "type": "file", "mtime": st.st_mtime}
        bucket = "/" not in name
        if os.path.isdir(local) and (bucket or self._has_objects(local)):
            return {"name": name, "size": 0, "type": "directory"}
        return None

    def info(self, path: Any, **kwargs: Any) -> dict:
        entry = self._entry(self._local(path), self._strip_protocol(path))
        if entry is None:
            raise FileNotFoundError(path)
        return entry

    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list:
        entry = self.info(path)
        if entry["type"] == "file":
            return [entry] if detail else [entry["name"]]
        local, name = self._local(path), entry["name"]
        out = [self._entry(os.path.join(local, e), f"{name}/{e}") for e in os.listdir(local)]
        out = sorted((e for e in out if e is not None), key=lambda e: e["name"])
        return out if detail else [e["name"] for e in out]

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        self._local(path)  # the bucket must exist; folders are implicit

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        self._local(path)

    def rmdir(self, path: Any) -> None:
        pass  # as gcsfs: a folder is gone once its last object is

    def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
        local = self._local(path)
        if mode == "rb":
            if not os.path.isfile(local):
                raise FileNotFoundError(path)
            return open(local, "rb")
        if mode in ("wb", "xb"):
            if mode == "xb" and os.path.isfile(local):
                raise FileExistsError(path)
            staging = f"{self.root}.uploads"
            os.makedirs(staging, exist_ok=True)
            return _ObjectWriter(os.path.join(staging, f"{next(self._count)}"), local)
        raise NotImplementedError(f"fake gcs: mode {mode!r}: objects are written whole")

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        src = self._local(path1)
        if os.path.isdir(src):
            return  # folders are implicit
        with open(src, "rb") as f, self._open(path2, "wb") as g:
            shutil.copyfileobj(f, g)

    def rm_file(self, path: Any) -> None:
        local = self._local(path)
        if not os.path.isfile(local):
            return  # a folder (implicit), or one pruned with its last object
        os.remove(local)
        bucket = os.path.join(self.root, self._strip_protocol(path).split("/")[0])
        parent = os.path.dirname(local)
        while parent != bucket and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)

    def _rm(self, path: Any) -> None:
        self.rm_file(path)

    def created(self, path: Any) -> float:
        return self.info(path).get("mtime", 0.0)

    def modified(self, path: Any) -> float:
        return self.info(path).get("mtime", 0.0)


class _FlatBucket:
    hierarchical_namespace_enabled = False


@contextlib.contextmanager
def installed(root: str, buckets: tuple[str, ...] = ("bucket",)) -> Iterator[str]:
    """Route ``gs://`` to ``root`` (each of ``buckets`` created) for the block; everything
    is put back afterwards, and epath's cached filesystems are dropped on both sides."""
    from etils import epath
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.abspath(root)
    for b in buckets:
        os.makedirs(os.path.join(root, b), exist_ok=True)

    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, key)}

    registry = sys.modules["fsspec.registry"]._registry  # as before: gcsfs, if imported
    saved = {p: registry.get(p) for p in PROTOCOLS}
    saved_orbax = gcs_utils.get_kvstore_for_gcs, gcs_utils.get_bucket
    FakeGCSFileSystem.root = root
    for p in PROTOCOLS:
        fsspec.register_implementation(p, FakeGCSFileSystem, clobber=True)
    gcs_utils.get_kvstore_for_gcs = kvstore
    gcs_utils.get_bucket = lambda name: _FlatBucket()
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        # epath must really reach gs:// through this fake (with TensorFlow installed it would
        # use tf.io.gfile, i.e. the real GCS, unless EPATH_USE_TF=false).
        probe = epath.Path("gs://bucket/probe")
        if probe._backend is not backend.fsspec_backend:
            raise RuntimeError("epath reaches gs:// through TensorFlow here; EPATH_USE_TF=false")
        assert isinstance(backend.fsspec_backend.fs(os.fspath(probe)), FakeGCSFileSystem)
        yield root
    finally:
        gcs_utils.get_kvstore_for_gcs, gcs_utils.get_bucket = saved_orbax
        for p, cls in saved.items():
            if cls is None:
                registry.pop(p, None)
            else:
                registry[p] = cls
        backend.fsspec_backend._get_filesystem.cache_clear()
        FakeGCSFileSystem.root = ""
