"""Where a command's results go, and the cheap looks it makes before any expensive work.

A result (a folder of images, an exported file or folder) is written beside ``out`` under a
temporary name, ``<out>.partial-<pid>`` (a file keeps its extension:
``psa.partial-<pid>.safetensors``), and renamed into place only once complete. A failed or
interrupted command removes its temporary result; a killed one (SIGKILL, out of memory) leaves
it under that ``.partial-`` name, never a half-written ``out``.

An existing ``out`` folder is refused (:class:`OutputExistsError`) unless it is empty or holds
only what an earlier run of the same command writes (``replaceable``); nothing else is ever
deleted.

``out`` may be a ``gs://`` URI (see :mod:`psa_jax.core.paths`): the result is then written to
a local temporary file or folder and uploaded once complete. A file becomes one object, never
visible half-written; a folder's files are uploaded one by one (object stores cannot rename a
folder), so a killed upload can leave some of them in ``out``, and the names of an earlier
result that the new one does not write are removed only after the upload.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator

from psa_jax.core import paths
from psa_jax.core.errors import PsaJaxError

PARTIAL = ".partial-"


class OutputExistsError(PsaJaxError, FileExistsError):
    """``--out`` is in the way: a file where a folder goes (or the reverse), or a folder holding
    files this command did not write."""


def partial_path(out: str, *, file: bool = False) -> str:
    """The temporary name of ``out`` for this process (absolute)."""
    out = os.path.abspath(out)
    if file:
        root, ext = os.path.splitext(out)
        return f"{root}{PARTIAL}{os.getpid()}{ext}"
    return f"{out}{PARTIAL}{os.getpid()}"


def check_folder_out(out: str, replaceable: Collection[str] | None = None) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder holding anything not in
    ``replaceable`` (the names an earlier run of the command writes; None: nothing)."""
    if paths.exists(out) and not paths.isdir(out):
        raise OutputExistsError(f"--out {out!r} is a file, not a folder")
    if not paths.isdir(out):
        return
    entries = sorted(paths.listdir(out))
    foreign = [e for e in entries if replaceable is None or e not in replaceable]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        why = "is not empty" if replaceable is None else "holds files this command did not write"
        raise OutputExistsError(f"--out {out!r} {why} ({shown}): choose a new folder")


def check_file_out(out: str) -> None:
    """Refuse an ``out`` file name that is a folder (an existing file is replaced)."""
    if paths.isdir(out):
        raise OutputExistsError(f"--out {out!r} is a folder; give a file name")


@contextlib.contextmanager
def atomic_folder(out: str, replaceable: Collection[str] | None = None) -> Iterator[str]:
    """Yield an empty temporary folder beside ``out``; once the block completes it becomes
    ``out`` (replacing an empty one, or one holding only ``replaceable`` names). On an error or
    interrupt it is removed; a killed process leaves it as ``<out>.partial-<pid>``."""
    if paths.is_remote(out):
        with _uploaded_folder(out, replaceable) as tmp:
            yield tmp
        return
    check_folder_out(out, replaceable)
    final = os.path.abspath(out)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = partial_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        check_folder_out(out, replaceable)  # written by someone else meanwhile?
    except OutputExistsError as err:
        raise OutputExistsError(f"{err}; the complete result is in {tmp}") from None
    if os.path.isdir(final) and os.listdir(final):  # an earlier result: swap, then delete it
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)  # an empty folder is replaced in one step


@contextlib.contextmanager
def atomic_file(out: str) -> Iterator[str]:
    """Yield a temporary file name beside ``out`` (same extension); once the block completes
    it replaces ``out``. On an error or interrupt whatever was written there is removed."""
    if paths.is_remote(out):
        with _uploaded_file(out) as tmp:
            yield tmp
        return
    check_file_out(out)
    final = os.path.abspath(out)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = partial_path(final, file=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not os.path.isfile(tmp):
        raise RuntimeError(f"nothing was written to {tmp}")  # a bug of the caller
    os.replace(tmp, final)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def _uploaded_file(out: str) -> Iterator[str]:
    """:func:`atomic_file` for gs://: a local temporary file, uploaded as one object."""
    paths.check_remote(out)
    check_file_out(out)
    folder = tempfile.mkdtemp(prefix="psa_jax-out-")
    tmp = os.path.join(folder, out.rstrip("/").rsplit("/", 1)[-1])
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise RuntimeError(f"nothing was written to {tmp}")  # a bug of the caller
        paths.upload_file(tmp, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _uploaded_folder(out: str, replaceable: Collection[str] | None) -> Iterator[str]:
    """:func:`atomic_folder` for gs://: a local temporary folder, uploaded file by file once
    complete; then the entries of an earlier result that this one did not write go."""
    paths.check_remote(out)
    check_folder_out(out, replaceable)
    out = out.rstrip("/")
    tmp = tempfile.mkdtemp(prefix="psa_jax-out-")
    try:
        yield tmp
        check_folder_out(out, replaceable)  # written by someone else meanwhile?
        earlier = set(paths.listdir(out)) if paths.isdir(out) else set()
        paths.upload_tree(tmp, out)
        for name in sorted(earlier - set(os.listdir(tmp))):
            target = f"{out}/{name}"
            if paths.isdir(target):
                paths.remove_tree(target)
            else:
                paths.path(target).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
