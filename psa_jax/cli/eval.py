"""``psa-jax eval`` and ``psa-jax spqr``: parse, check cheaply, call :mod:`benchmark`, report.

Bad input (a missing run, an unknown scorer, a prompts file without a caption column, scorer
weights not on disk, an ``--out`` full of other files) is one line on stderr and exit status 2,
before anything is generated; results are written to a temporary folder and renamed into
``--out`` only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax

from psa_jax.cli import per_core_devices
from psa_jax.cli.train import add_distributed_flags, init_distributed
from psa_jax.core import parallel, paths
from psa_jax.core.checkpoint import RunNotFoundError, require_run
from psa_jax.core.errors import UsageError
from psa_jax.core.outputs import OutputExistsError
from psa_jax.data.embed_format import MissingEmbeddingError
from psa_jax.eval import benchmark, report
from psa_jax.eval.plans import PromptsError, read_prompt_rows
from psa_jax.eval.scorers import ScorerContext, ScorerError

EXIT_BAD_INPUT = 2


def _settings(args: argparse.Namespace, default_scorers: tuple[str, ...]) -> Any:
    sampler = {
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "user_scale": args.user_scale,
        "batch_size": args.batch_size,
    }
    ctx = ScorerContext(
        clip_path=args.clip,
        fid_weights=args.fid_weights,
        nudenet_threshold=args.nudenet_threshold,
        q16_threshold=args.q16_threshold,
        q16_prompts=args.q16_prompts,
    )
    scorers = (
        tuple(s.strip() for s in args.scorers.split(",") if s.strip())
        if args.scorers
        else default_scorers
    )
    return benchmark.EvalSettings(
        scorers=scorers,
        draws=args.draws,
        users_per_group=args.users_per_group or None,
        seed=args.seed,
        sampler=sampler,
        context=ctx,
        reference=args.reference,
        progress=not args.no_progress,
    )


def _preflight(args: argparse.Namespace, settings: Any, marker: str) -> dict[str, Any]:
    """Every check that needs no model: out folder, run folder, prompts file, scorers."""
    report.check_out(args.out, marker)
    if jax.process_count() > 1:
        paths.require_local(args.out, "--out", "with several processes, the shards are merged "
                            "through a folder every process sees; run one process, or write "
                            "to a shared mount")  # fmt: skip
    if getattr(args, "workdir", None):
        require_run(args.workdir)
    if args.prompts not in (None, "toy"):
        read_prompt_rows(args.prompts, 1)
    return benchmark.build_scorers(settings)


def _model(args: argparse.Namespace) -> Any:
    model = benchmark.load_model(
        args.workdir,
        pretrained=getattr(args, "pretrained", None),
        adapter=args.adapter,
        embeddings=args.embeddings,
        users_csv=args.users_csv,
    )
    model.pipeline.mesh = parallel.sampling_mesh(args.batch_size)  # chunks over this host's devices
    return model


def _guard(name: str, fn, args: argparse.Namespace) -> int:
    """Named input errors -> one line and exit 2 (tracebacks for everything else)."""
    try:
        return fn(args)
    except (
        ScorerError,
        PromptsError,
        RunNotFoundError,
        OutputExistsError,
        MissingEmbeddingError,
        FileNotFoundError,
    ) as e:
        print(f"psa-jax {name}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _eval(args: argparse.Namespace) -> int:
    if bool(args.workdir) == bool(args.pretrained):
        raise UsageError("give exactly one of --workdir and --pretrained")
    init_distributed(args)  # before anything touches a JAX backend
    settings = _settings(args, benchmark.TOY_SCORERS)
    scorers = _preflight(args, settings, "results.json")
    model = _model(args)
    users = [u.strip() for u in args.users.split(",")] if args.users else None
    prompts = None if args.prompts == "toy" else args.prompts
    shards = f"{os.path.abspath(args.out)}.shards" if jax.process_count() > 1 else None
    bundle = benchmark.evaluate_run(
        model, settings, prompts, users, scorers=scorers, limit=args.limit, shard_dir=shards
    )
    if bundle is None:  # another process than 0: its share is drawn, process 0 reports
        parallel.barrier(f"eval:{os.path.abspath(args.out)}")
        print(json.dumps({"out": args.out, "process": jax.process_index()}))
        return 0
    with report.atomic_output(args.out, "results.json") as tmp:
        report.write_eval_report(tmp, bundle)
    parallel.barrier(f"eval:{os.path.abspath(args.out)}")
    res = bundle["results"]
    print(
        json.dumps(
            {"out": args.out, "groups": len(res["groups"]), "level_curves": res.get("level_curves")}
        )
    )
    return 0


def _spqr(args: argparse.Namespace) -> int:
    from psa_jax.train.benign import finetune_config

    settings = _settings(args, benchmark.TOY_SCORERS)
    overrides = {"steps": args.finetune_steps, "seed": args.finetune_seed}
    ft = finetune_config(args.profile, **{k: v for k, v in overrides.items() if v is not None})
    if args.benign and not os.path.isfile(os.path.join(args.benign, "metadata.jsonl")):
        raise FileNotFoundError(f"--benign {args.benign!r} has no metadata.jsonl")
    scorers = _preflight(args, settings, "spqr.json")
    model = _model(args)
    prompts = None if args.prompts == "toy" else args.prompts
    bundle = benchmark.spqr_run(
        model, settings, ft, prompts, args.benign, scorers=scorers, limit=args.limit
    )
    with report.atomic_output(args.out, "spqr.json") as tmp:
        report.write_spqr_report(tmp, bundle)
    res = bundle["results"]
    print(json.dumps({"out": args.out, "before": res["before"], "after": res["after"]}))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from psa_jax.sample.schedulers import SCHEDULERS

    p.add_argument("--workdir", help="a psa-jax train (dpo) run")
    p.add_argument("--adapter", help="an adapter file (PSAlign / IP-Adapter) or run folder")
    p.add_argument("--embeddings", help="profile embeddings folder (embed-profiles output)")
    p.add_argument(
        "--users-csv",
        help="users file giving banned categories (default: the "
        "run's toy world, else PSAlign's users.csv)",
    )
    p.add_argument("--prompts", default="toy", help="prompts CSV, or 'toy' (the world's)")
    p.add_argument("--scorers", help="comma-separated scorer names (default: the toy scorers)")
    p.add_argument("--out", required=True, help="output folder (replaced when complete)")
    p.add_argument("--limit", type=int, help="only the first N rows of --prompts")
    p.add_argument("--draws", type=int, default=2, help="seeds per prompt for the level users")
    p.add_argument("--users-per-group", type=int, default=10, help="toy seen/unseen users (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--user-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip", help="local transformers CLIPModel folder (q16, clipscore)")
    p.add_argument("--fid-weights", help="Inception TorchScript file (fid)")
    p.add_argument("--reference", help="folder of reference images for FID (toy: the world's)")
    p.add_argument("--nudenet-threshold", type=float, default=0.5)
    p.add_argument("--q16-threshold", type=float, default=0.5)
    p.add_argument(
        "--q16-prompts", help=".npy Q16 prompt embeddings for another CLIP than ViT-L/14"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    from psa_jax.train.benign import PROFILES

    ev = subparsers.add_parser(
        "eval", help="PSA metrics of a run or adapter (IP, levels, pass rates, win rates, FID)"
    )
    _common(ev)
    ev.add_argument("--pretrained", help="a local diffusers pipeline folder (with --adapter)")
    ev.add_argument("--users", help="user ids crossed with every prompt (else levels / rows)")
    add_distributed_flags(ev, "each process draws a share of the images, process 0 scores")
    ev.set_defaults(func=lambda a: _guard("eval", _eval, a), cpu_devices=per_core_devices())
    sp = subparsers.add_parser("spqr", help="SPQR before/after a benign fine-tune, per level")
    _common(sp)
    sp.add_argument("--profile", required=True, choices=sorted(PROFILES))
    sp.add_argument(
        "--benign",
        help="benign data folder (metadata.jsonl); default: the toy world's benign split",
    )
    sp.add_argument("--finetune-steps", type=int, help="fine-tune steps (default 200)")
    sp.add_argument("--finetune-seed", type=int, help="fine-tune seed (default 42, SPQR's)")
    sp.set_defaults(func=lambda a: _guard("spqr", _spqr, a), pretrained=None, users=None,
                    cpu_devices=per_core_devices())  # fmt: skip
