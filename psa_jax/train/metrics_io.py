"""Training metrics to ``metrics.jsonl`` and TensorBoard event files, without TensorFlow.

JSONL is the record that tests, notebooks and resumed runs read back (``read_metrics``);
TensorBoard is for watching. Only process 0 should write: the others pass ``enabled=False``.

A ``gs://`` workdir cannot be appended to: the writer keeps its files in a local staging
folder (starting from the run's ``metrics.jsonl`` and ``text.jsonl`` when it resumes) and
uploads them whole every ``sync_secs``, at :meth:`MetricWriter.sync` (the trainer calls it
at each checkpoint) and on close. A crash loses what was logged since the last upload.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from psa_jax.core import paths

METRICS_FILE = "metrics.jsonl"
TEXT_FILE = "text.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Non-finite floats as strings: json.dumps would write bare NaN/Infinity, which is not JSON.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    """Keep ``import tensorboardX`` from importing torch into a JAX process.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors. That costs
    seconds at start-up and loads torch's own CUDA libraries next to JAX's. If torch is already
    imported (tests), nothing changes.
    """
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # import torch -> ImportError
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _summary_writer(logdir: str):
    try:
        with _torch_hidden():
            import tensorboardX
    except ImportError as e:
        raise ImportError(
            "MetricWriter(tensorboard=True) needs tensorboardX (pip install tensorboardX); "
            "pass tensorboard=False to write metrics.jsonl only"
        ) from e
    return tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)


def _to_python(name: str, value: Any) -> int | float:
    """A Python int or float from a number, numpy scalar or one-element (jax) array."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar: shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    return float(item)


def _encode(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricWriter:
    """Appends ``{"step": step, **scalars}`` lines to ``<workdir>/metrics.jsonl`` and TensorBoard.

    The JSONL file is opened in append mode and flushed every ``write``, so a crashed or resumed
    run keeps all it logged (``last_per_step`` resolves replayed steps). ``enabled=False``
    creates nothing, so every process can hold a writer and call it unconditionally.
    A ``gs://`` workdir is written through a local staging folder (module docstring).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        sync_secs: float = 60.0,
    ):
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self.sync_secs = sync_secs
        self._jsonl = None
        self._text = None
        self._tb = None
        self._remote: str | None = None  # gs:// workdir: _folder is its local staging copy
        self._folder = self.workdir
        self._synced = time.monotonic()
        self._uploaded: dict[str, tuple] = {}  # gs://: what sync() uploaded, unchanged since
        if not enabled:
            return
        if paths.is_remote(self.workdir):
            self._remote = self.workdir.rstrip("/")
            self._folder = tempfile.mkdtemp(prefix="psa_jax-metrics-")
            for name in (METRICS_FILE, TEXT_FILE):  # a resumed run appends to its records
                if paths.isfile(f"{self._remote}/{name}"):
                    paths.download_file(f"{self._remote}/{name}", os.path.join(self._folder, name))
        else:
            os.makedirs(self.workdir, exist_ok=True)
        self._jsonl = open(os.path.join(self._folder, METRICS_FILE), "a", encoding="utf-8")
        if tensorboard:
            self._tb = _summary_writer(os.path.join(self._folder, TENSORBOARD_DIR))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log scalars (numbers, numpy scalars or one-element arrays) at ``step``."""
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is reserved for the step number; rename the metric")
        values = {name: _to_python(name, v) for name, v in scalars.items()}
        record = {"step": int(step), **{k: _encode(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, float(v), global_step=int(step))
        if self._remote is not None and time.monotonic() - self._synced >= self.sync_secs:
            self.sync()

    def write_text(self, step: int, name: str, text: str) -> None:
        """Log a string (prompts, a config dump) to ``text.jsonl`` and TensorBoard's text tab."""
        if not self.enabled:
            return
        if self._text is None:
            self._text = open(os.path.join(self._folder, TEXT_FILE), "a", encoding="utf-8")
        self._text.write(json.dumps({"step": int(step), "name": name, "text": text}) + "\n")
        self._text.flush()
        if self._tb is not None:
            self._tb.add_text(name, text, global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record hyperparameters: ``hparams.json`` always, TensorBoard's HParams tab if enabled.

        Values that are not bool/int/float/str are stored as their ``str()``; nested mappings
        should be flattened by the caller (e.g. ``"optim.learning_rate"``).
        """
        if not self.enabled:
            return
        flat = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()
        }
        with open(os.path.join(self._folder, "hparams.json"), "w", encoding="utf-8") as f:
            json.dump(flat, f, indent=2, sort_keys=True)
        if self._tb is not None:
            from tensorboardX.summary import hparams as hparams_summary

            # Into the main event file: SummaryWriter.add_hparams would open a new subdirectory.
            for summary in hparams_summary(flat, {}):
                self._tb.file_writer.add_summary(summary)

    def flush(self) -> None:
        for f in (self._jsonl, self._text):
            if f is not None:
                f.flush()
        if self._tb is not None:
            self._tb.flush()

    def sync(self) -> None:
        """gs://: upload the staged files whole, as far as written; local: nothing."""
        if self._remote is None or not self.enabled:
            return
        self.flush()
        paths.upload_tree(self._folder, self._remote, self._uploaded)
        self._synced = time.monotonic()

    def close(self) -> None:
        for f in (self._jsonl, self._text):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._remote is not None and self.enabled:
            paths.upload_tree(self._folder, self._remote, self._uploaded)
            shutil.rmtree(self._folder, ignore_errors=True)
        self._jsonl = self._text = self._tb = None
        self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return value


def read_metrics(path_or_workdir: str | os.PathLike) -> list[dict]:
    """Records of ``metrics.jsonl`` in file order, with ``"nan"``/``"inf"`` back as floats.

    A final line cut short by a crash mid-write is skipped; a bad line elsewhere raises, since
    it means the file is not what this module wrote.
    """
    path = os.fspath(path_or_workdir)
    if paths.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with paths.open_file(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        records.append({k: _decode(v) for k, v in record.items()})
    return records


def last_per_step(records: Iterable[Mapping]) -> dict[int, dict]:
    """One record per step, in step order; later records override earlier ones key by key.

    A resumed run re-logs the steps it replays after its last checkpoint: their values win.
    Separate writes at one step (train and eval metrics) still combine.
    """
    merged: dict[int, dict] = {}
    for record in records:
        step = int(record["step"])
        merged.setdefault(step, {}).update(record)
    return dict(sorted(merged.items()))
