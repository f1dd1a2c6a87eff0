"""Running a planned sweep: one after another on this machine, or as a SLURM job array, or as
TPU-pod commands (printed, or submitted).

Layout of a sweep folder ``OUT``: ``sweep.json`` (the sweep file and its runs in order) and one
folder per run, ``OUT/<name>/``, which is that run's ``--workdir`` (checkpoints, metrics.jsonl)
plus ``sweep_run.json`` (overrides, resolved config, status, exit code, seconds) and
``train.log``. Each local run is its own ``psa-jax train`` process, so a run that fails
(non-zero exit, a crash, a killed process) is recorded as failed and the next one starts;
rerunning the sweep skips the runs already done and resumes the others from their checkpoints.
``OUT`` may be ``gs://`` in the local and TPU modes (SLURM writes its logs to a local folder);
``train.log`` is then written here and uploaded when its run ends.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from psa_jax.core import paths
from psa_jax.core.outputs import atomic_file
from psa_jax.sweep.plan import SweepError, SweepRun, run_record

SWEEP_FILE = "sweep.json"
RUN_FILE = "sweep_run.json"
LOG_FILE = "train.log"
MODES = ("local", "slurm", "tpu")


def train_argv(run: SweepRun, workdir: str) -> list[str]:
    """``psa-jax train`` for one run (its config, workdir and every override)."""
    return ["psa-jax", "train", "--config", run.config, "--workdir", workdir,
            *(f"--config.{a}" for a in run.override_args())]  # fmt: skip


def _write_json(path: str, obj: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def read_json(path: str) -> dict[str, Any] | None:
    if not paths.isfile(path):
        return None
    with paths.open_file(path, encoding="utf-8") as f:
        return json.load(f)


def prepare(out: str, spec_path: str, runs: Sequence[SweepRun]) -> None:
    """``sweep.json`` and every run's folder with its ``sweep_run.json`` (status ``pending``
    unless an earlier invocation left one). A folder holding another sweep is an error."""
    paths.makedirs(out)
    sweep = {"sweep_file": os.path.abspath(spec_path), "runs": [r.name for r in runs]}
    prev = read_json(os.path.join(out, SWEEP_FILE))
    if prev is not None and prev["runs"] != sweep["runs"]:
        raise SweepError(f"{out} holds another sweep (runs {prev['runs'][:3]}...): use a new --out")
    _write_json(os.path.join(out, SWEEP_FILE), sweep)
    for run in runs:
        folder = os.path.join(out, run.name)
        paths.makedirs(folder)
        if read_json(os.path.join(folder, RUN_FILE)) is None:
            _write_json(os.path.join(folder, RUN_FILE), {**run_record(run), "status": "pending"})


def _update(folder: str, **fields: Any) -> dict[str, Any]:
    path = os.path.join(folder, RUN_FILE)
    record = {**(read_json(path) or {}), **fields}
    _write_json(path, record)
    return record


def run_local(
    out: str,
    runs: Sequence[SweepRun],
    *,
    python: str = sys.executable,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Each run not yet done, one after another, as ``python -m psa_jax.cli train ...``; its
    output goes to ``train.log``. Returns every run's record (status ``done`` or ``failed``)."""
    records = []
    for i, run in enumerate(runs):
        folder = os.path.join(out, run.name)
        record = read_json(os.path.join(folder, RUN_FILE)) or {}
        if record.get("status") == "done":
            log(f"[{i + 1}/{len(runs)}] {run.name}: done before")
            records.append(record)
            continue
        argv = [python, "-m", "psa_jax.cli", *train_argv(run, folder)[1:]]
        log(f"[{i + 1}/{len(runs)}] {run.name}: {shlex.join(train_argv(run, folder))}")
        _update(folder, status="running", command=argv)
        t0 = time.time()
        with paths.appending(os.path.join(folder, LOG_FILE)) as f:
            code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
        status = "done" if code == 0 else "failed"
        record = _update(folder, status=status, returncode=code,
                         seconds=round(time.time() - t0, 1))  # fmt: skip
        if code:
            log(f"[{i + 1}/{len(runs)}] {run.name}: FAILED (exit {code}); see "
                f"{os.path.join(folder, LOG_FILE)}")  # fmt: skip
        records.append(record)
    return records


def slurm_array_script(out: str, runs: Sequence[SweepRun], sbatch_args: Sequence[str] = ()) -> str:
    """An sbatch script running the sweep as a job array: task ``i`` runs ``runs[i]`` as one
    single-process ``psa-jax train`` on the GPUs ``sbatch_args`` give it (e.g. ``--gpus=1``;
    a multi-node run per sweep point goes through ``launch/slurm_gpu.sbatch`` instead)."""
    lines = ["#!/usr/bin/env bash", f"#SBATCH --array=0-{len(runs) - 1}",
             f"#SBATCH --output={os.path.join(out, '%x-%A_%a.log')}",
             *(f"#SBATCH {a}" for a in sbatch_args), "set -euo pipefail",
             'case "$SLURM_ARRAY_TASK_ID" in']  # fmt: skip
    for i, run in enumerate(runs):
        folder = os.path.join(out, run.name)
        lines.append(f"  {i}) exec {shlex.join(train_argv(run, folder))} ;;")
    lines += ['  *) echo "no run for task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def tpu_commands(out: str, runs: Sequence[SweepRun], tpu: str, zone: str) -> list[str]:
    """One ``launch/tpu_pod.sh`` command per run (they run one after another on the slice)."""
    cmds = []
    for run in runs:
        folder = os.path.join(out, run.name)
        train = train_argv(run, folder)[2:]  # after "psa-jax train"
        cmds.append(shlex.join(["bash", "launch/tpu_pod.sh", "--tpu", tpu, "--zone", zone,
                                "--", *train]))  # fmt: skip
    return cmds
