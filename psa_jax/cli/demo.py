"""``psa-jax demo --out DIR [--fresh] [--pretrain]``: the README's main command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from psa_jax.cli import per_core_devices
from psa_jax.demo.logs import quiet_library_noise
from psa_jax.demo.run import DemoError, DemoSettings, run_demo
from psa_jax.models.packaged import PackagedModelError

EXIT_BAD_INPUT = 2


def _demo(args: argparse.Namespace) -> int:
    defaults = DemoSettings(out=args.out)
    sampler = {**defaults.sampler}
    for flag, key in (("guidance_scale", "guidance_scale"), ("sample_steps", "steps")):
        if getattr(args, flag) is not None:
            sampler[key] = getattr(args, flag)
    settings = DemoSettings(
        out=args.out,
        pretrain=args.pretrain,
        dpo_steps=args.dpo_steps,
        draws=args.draws if args.draws is not None else defaults.draws,
        users_per_group=(
            args.users_per_group if args.users_per_group is not None else defaults.users_per_group
        ),
        sampler=sampler,
        ablation_tokens=args.ablation_tokens,
        finetune_steps=(
            args.finetune_steps if args.finetune_steps is not None else defaults.finetune_steps
        ),
        progress=not args.no_progress,
    )
    quiet_library_noise()
    try:
        metrics = run_demo(settings, fresh=args.fresh)
    except (DemoError, PackagedModelError) as e:
        print(f"psa-jax demo: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    keys = ("level_marker_rates", "suppression_ratio", "allowed_retention", "seen_pass_rate",
            "unseen_pass_rate", "spqr", "wall_seconds")  # fmt: skip
    print(json.dumps({k: metrics[k] for k in keys}, indent=1))
    met = sum(t["ok"] for t in metrics["targets"].values())
    print(f"targets met: {met}/{len(metrics['targets'])}; report: {args.out}/report.html")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the embedded default end to end: world, base, PSA (DPO), eval, SPQR, export",
        description="Runs on a CPU with no downloads; every stage is cached under --out and "
        "resumes; writes --out/report.html and --out/metrics.json.",
    )
    p.add_argument("--out", required=True, help="output folder (stages, report, metrics)")
    p.add_argument("--fresh", action="store_true", help="delete --out's demo output first")
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="retrain the tiny base (VAE, UNet) with launch/tiny.sh's recipe instead of "
        "using the shipped one",
    )
    p.add_argument("--dpo-steps", type=int, help="DPO steps (default: configs/tiny.py's)")
    p.add_argument("--draws", type=int, help="seeds per held-out caption per level user")
    p.add_argument("--users-per-group", type=int, help="seen / unseen users evaluated")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance")
    p.add_argument("--sample-steps", type=int, help="DDIM steps")
    p.add_argument("--finetune-steps", type=int, help="benign (lite) fine-tune steps")
    p.add_argument(
        "--ablation-tokens",
        type=int,
        help="also train the DPO stage with this many user tokens (e.g. 1, PSAlign's) and "
        "show it as the report's ablation row (default: the recorded row)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # One CPU device per core, up to the DPO batch of 8 (a divisor of every demo batch): the
    # psa-jax program splits the host before JAX starts ($PSA_JAX_CPU_DEVICES overrides).
    p.set_defaults(func=_demo, cpu_devices=per_core_devices())
