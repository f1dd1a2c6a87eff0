"""Ablation sweeps: a sweep file's runs (grid and list), checked before anything runs; local runs
one process each, a failed run recorded without stopping the others; the report's table."""

from __future__ import annotations

import csv
import json
import os
import textwrap

import pytest

from psa_jax.cli import main
from psa_jax.sweep.plan import SweepError, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = '"grid": {"train.beta": [1000.0, 5000.0], "optim.learning_rate": [1e-3, 2e-3]}'


def _sweep_file(tmp_path, body: str) -> str:
    folder = tmp_path / "configs" / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "s.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_grid_and_list_runs_are_distinct_named_and_checked(tmp_path):
    cfg = os.path.join(REPO, "configs", "tiny.py")
    path = _sweep_file(
        tmp_path,
        f"""
        def get_sweep():
            return {{"config": {cfg!r}, "overrides": {{"train.steps": 7}},
                     {GRID}, "runs": [{{"model.adapter.num_user_tokens": 1}}]}}
    """,
    )
    runs = plan(path)
    assert len(runs) == 5 and len({r.name for r in runs}) == 5
    assert runs[0].overrides == {"train.steps": 7, "train.beta": 1000.0,
                                 "optim.learning_rate": 1e-3}  # fmt: skip
    assert runs[3].swept == {"train.beta": 5000.0, "optim.learning_rate": 2e-3}
    assert runs[4].name.startswith("004-num_user_tokens=1")
    assert "--config.optim.learning_rate=0.002" in " ".join(
        f"--config.{a}" for a in runs[3].override_args()
    )
    bad = _sweep_file(
        tmp_path,
        f"""
        def get_sweep():
            return {{"config": {cfg!r}, "grid": {{"train.betta": [1.0]}}}}
    """,
    )
    with pytest.raises(SweepError, match="betta"):  # a typo fails before any run starts
        plan(bad)
    neg = _sweep_file(
        tmp_path,
        f"""
        def get_sweep():
            return {{"config": {cfg!r}, "grid": {{"optim.learning_rate": [-1.0]}}}}
    """,
    )
    with pytest.raises(SweepError, match="learning_rate"):  # values checked as train does
        plan(neg)


def test_dry_runs_print_every_command_and_write_nothing(tmp_path, capsys):
    path = os.path.join(REPO, "configs", "sweeps", "tiny_beta_lr.py")
    out = tmp_path / "sw"
    assert main(["sweep", path, "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("psa-jax train --config ") for line in lines)
    assert "--config.train.beta=5000.0" in lines[3]
    assert main(["sweep", path, "--out", str(out), "--mode", "slurm", "--dry-run",
                 "--sbatch-arg=--gpus=1"]) == 0  # fmt: skip
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in script and "#SBATCH --gpus=1" in script
    assert script.count("exec psa-jax train") == 4
    assert main(["sweep", path, "--out", str(out), "--mode", "tpu", "--tpu", "v4",
                 "--zone", "us-central2-b", "--dry-run"]) == 0  # fmt: skip
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 4 and all("launch/tpu_pod.sh --tpu v4" in c for c in cmds)
    assert not out.exists()


@pytest.mark.slow
def test_a_tiny_2x2_sweep_runs_reports_and_survives_a_failed_run(tmp_path, capsys):
    """Four tiny DPO runs, then a list sweep whose first run fails at run time (a data folder
    that is not there): it is reported failed and the second still runs."""
    cfg = os.path.join(REPO, "configs", "tiny.py")
    cache = str(tmp_path / "cache")
    shared = {
        "train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2,
        "train.eval_batches": 1, "train.eval_draws": 1, "optim.total_steps": 2,
        "optim.warmup_steps": 1, "train.progress": False, "data.cache_dir": cache,
    }  # fmt: skip
    path = _sweep_file(
        tmp_path,
        f"""
        def get_sweep():
            return {{"config": {cfg!r}, "overrides": {shared!r},
                     {GRID}}}
    """,
    )
    out = tmp_path / "grid"
    assert main(["sweep", path, "--out", str(out)]) == 0
    assert "4/4 runs done" in capsys.readouterr().out
    assert main(["sweep-report", "--sweep", str(out)]) == 0
    table = capsys.readouterr().out
    with open(out / "sweep.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and len({(r["train.beta"], r["optim.learning_rate"]) for r in rows}) == 4
    for r in rows:
        assert r["status"] == "done" and r["step"] == "2"
        assert 0.0 < float(r["train_loss"]) < 10 and 0.0 <= float(r["eval/pair_acc"]) <= 1.0
    assert table.count("| done |") == 4
    assert (out / "loss.png").is_file() and (out / "eval_pair_acc.png").is_file()
    resolved = json.loads((out / rows[3]["run"] / "sweep_run.json").read_text())
    assert resolved["resolved_config"]["train"]["beta"] == 5000.0
    # A rerun finds every run done and starts none.
    assert main(["sweep", path, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done before") == 4

    missing = str(tmp_path / "no_such_sage")
    listed = _sweep_file(
        tmp_path,
        f"""
        def get_sweep():
            return {{"config": {cfg!r}, "overrides": {shared!r},
                     "runs": [{{"data.source": {missing!r}}},
                              {{"train.beta": 2000.0}}]}}
    """,
    )
    out2 = tmp_path / "list"
    assert main(["sweep", listed, "--out", str(out2)]) == 1
    said = capsys.readouterr().out
    assert "FAILED" in said and "1/2 runs done" in said
    main(["sweep-report", "--sweep", str(out2)])
    with open(out2 / "sweep.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert "no_such_sage" in (out2 / rows[0]["run"] / "train.log").read_text()
