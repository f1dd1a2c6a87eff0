"""``psa-jax sweep-report``: every run of a sweep folder in one table (markdown on stdout,
``sweep.csv``), with the train loss curves (``loss.png``) and each held-out metric's final value
(``eval_<metric>.png``). A run's row: its swept values, status, last step, the mean train loss
over its last 10% of steps, its last ``eval/*`` values, and, where ``<run>/eval/results.json``
exists (``psa-jax eval --out <run>/eval``), that file's top-level numbers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psa_jax.core import paths
from psa_jax.eval.report import bar_plot, write_csv
from psa_jax.sweep.plan import SweepError
from psa_jax.sweep.run import RUN_FILE, SWEEP_FILE, read_json
from psa_jax.train.metrics_io import METRICS_FILE, last_per_step, read_metrics

PLOTTED_EVAL = 4  # at most this many eval metrics get a bar plot, these first:
PREFERRED_EVAL = ("eval/pair_acc", "eval/loss", "eval/implicit_acc", "eval/mse")


def run_row(folder: str) -> tuple[dict[str, Any], dict[int, dict]]:
    """One run's table row and its per-step metrics (empty where it never logged)."""
    record = read_json(os.path.join(folder, RUN_FILE)) or {}
    row: dict[str, Any] = {"run": os.path.basename(folder)}
    row.update({k: v for k, v in (record.get("swept") or {}).items()})
    row["status"] = record.get("status", "unknown")
    steps: dict[int, dict] = {}
    if paths.isfile(os.path.join(folder, METRICS_FILE)):
        steps = last_per_step(read_metrics(folder))
    train = [(s, m["loss"]) for s, m in steps.items() if "loss" in m]
    row["step"] = max(steps) if steps else None
    if train:
        tail = train[-max(1, len(train) // 10) :]
        row["train_loss"] = float(np.mean([v for _, v in tail]))
    for m in steps.values():  # in step order: the last value of each eval metric wins
        row.update({k: v for k, v in m.items() if k.startswith("eval/")})
    results = read_json(os.path.join(folder, "eval", "results.json"))
    for k, v in (results or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[f"results/{k}"] = v
    return row, steps


def sweep_report(sweep_dir: str, out: str | None = None) -> list[dict[str, Any]]:
    """Rows of every run in ``sweep.json``'s order; writes ``sweep.csv`` and the PNGs to
    ``out`` (default: the sweep folder)."""
    sweep = read_json(os.path.join(sweep_dir, SWEEP_FILE))
    if sweep is None:
        raise SweepError(f"{sweep_dir} has no {SWEEP_FILE}: not a sweep folder")
    rows, curves = [], {}
    for name in sweep["runs"]:
        row, steps = run_row(os.path.join(sweep_dir, name))
        rows.append(row)
        curves[name] = [(s, m["loss"]) for s, m in steps.items() if "loss" in m]
    with paths.staged(out or sweep_dir) as folder:  # gs://: written here, then uploaded
        _write_report(folder, rows, curves)
    return rows


def _write_report(out: str, rows: list[dict[str, Any]], curves: dict[str, list]) -> None:
    write_csv(os.path.join(out, "sweep.csv"), rows)
    _loss_plot(os.path.join(out, "loss.png"), curves)
    evals = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("eval/")]
    rank = {k: i for i, k in enumerate(PREFERRED_EVAL)}
    evals.sort(key=lambda k: rank.get(k, len(rank)))  # (sort() empties evals while it runs)
    for key in evals[:PLOTTED_EVAL]:
        values = [r.get(key) for r in rows]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        top = max(finite, default=1.0)
        bar_plot(os.path.join(out, f"eval_{key.split('/', 1)[1]}.png"),
                 [r["run"].split("-", 1)[0] for r in rows], {key: values},
                 f"{key} at each run's last evaluation", key,
                 ylim=(0, 1) if 0 <= min(finite, default=0) and top <= 1 else None)  # fmt: skip


def _loss_plot(path: str, curves: Mapping[str, Sequence[tuple[int, float]]]) -> None:
    from psa_jax.eval.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for name, pts in curves.items():
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("Train loss per run")
    if any(curves.values()):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (numbers to 4 significant digits)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
