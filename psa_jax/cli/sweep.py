"""``psa-jax sweep`` and ``psa-jax sweep-report``: an ablation sweep as one file, one report.

    psa-jax sweep configs/sweeps/tiny_beta_lr.py --out runs/sweep            # here, in turn
    psa-jax sweep configs/sweeps/tiny_beta_lr.py --out DIR --mode slurm [--submit] [--sbatch-arg A]
    psa-jax sweep configs/sweeps/tiny_beta_lr.py --out DIR --mode tpu --tpu NAME --zone ZONE
    psa-jax sweep-report --sweep runs/sweep [--out DIR]

``--dry-run`` prints what would run (local commands, the sbatch script, the TPU commands) and
writes nothing. See :mod:`psa_jax.sweep`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Any


def _sweep_cmd(args: argparse.Namespace) -> int:
    from psa_jax.core import paths
    from psa_jax.sweep import plan as plan_lib
    from psa_jax.sweep import run as run_lib

    runs = plan_lib.plan(args.sweep_file)
    out = paths.absolute(args.out)  # a local folder or gs://bucket/...
    if args.mode == "local":
        if args.dry_run:
            for r in runs:
                print(shlex.join(run_lib.train_argv(r, os.path.join(out, r.name))))
            return 0
        run_lib.prepare(out, args.sweep_file, runs)
        records = run_lib.run_local(out, runs)
        failed = [r["name"] for r in records if r.get("status") != "done"]
        print(f"{len(records) - len(failed)}/{len(records)} runs done"
              + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
        return 1 if failed else 0
    if args.mode == "slurm":
        paths.require_local(out, "--out", "SLURM writes the job array's logs there")
        script = run_lib.slurm_array_script(out, runs, args.sbatch_arg or [])
        if args.dry_run or not args.submit:
            print(script, end="")
            return 0
        run_lib.prepare(out, args.sweep_file, runs)
        path = os.path.join(out, "sweep.sbatch")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        return subprocess.call(["sbatch", path])
    if not (args.tpu and args.zone):
        from psa_jax.core.errors import UsageError

        raise UsageError("--mode tpu needs --tpu NAME and --zone ZONE")
    cmds = run_lib.tpu_commands(out, runs, args.tpu, args.zone)
    if args.dry_run or not args.submit:
        print("\n".join(cmds))
        return 0
    run_lib.prepare(out, args.sweep_file, runs)
    for cmd in cmds:
        code = subprocess.call(shlex.split(cmd))
        if code:
            print(f"failed (exit {code}): {cmd}", file=sys.stderr)
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    from psa_jax.sweep.report import markdown_table, sweep_report

    rows = sweep_report(args.sweep, args.out)
    print(markdown_table(rows))
    return 0


def register(subparsers: Any) -> None:
    from psa_jax.sweep.run import MODES

    p = subparsers.add_parser("sweep", help="run an ablation sweep file (locally, SLURM, TPU)",
                              description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("sweep_file", help="configs/sweeps/*.py (defines get_sweep())")
    p.add_argument("--out", required=True, help="sweep folder: one workdir per run")
    p.add_argument("--mode", choices=MODES, default="local")
    p.add_argument("--dry-run", action="store_true", help="print what would run, write nothing")
    p.add_argument("--submit", action="store_true", help="slurm/tpu: submit (default: print)")
    p.add_argument("--sbatch-arg", action="append", help="an #SBATCH line (repeatable)")
    p.add_argument("--tpu", help="TPU VM name (--mode tpu)")
    p.add_argument("--zone", help="TPU zone (--mode tpu)")
    p.set_defaults(func=_sweep_cmd)
    r = subparsers.add_parser("sweep-report", help="a sweep's runs in one table, CSV and plots")
    r.add_argument("--sweep", required=True, help="a psa-jax sweep --out folder")
    r.add_argument("--out", help="where sweep.csv and the PNGs go (default: the sweep folder)")
    r.set_defaults(func=_report_cmd)
