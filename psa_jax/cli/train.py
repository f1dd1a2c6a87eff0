"""``psa-jax train``: a config, its ``--config.KEY=VALUE`` overrides, multi-host set-up."""

from __future__ import annotations

import json
import logging
from typing import Any

import jax

from psa_jax.config import ConfigOverrideError, apply_overrides, load_config
from psa_jax.train.trainer import train


def config_overrides(extra: list[str]) -> list[str]:
    """``--config.a.b=V`` / ``--config.a.b V`` command-line items -> ``["a.b=V", ...]``."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--config."):
            raise ConfigOverrideError(
                f"unrecognized argument {item!r} (overrides are --config.KEY=VALUE)"
            )
        body = item[len("--config.") :]
        if "=" not in body:
            if i + 1 >= len(extra):
                raise ConfigOverrideError(f"{item} needs a value")
            body, i = f"{body}={extra[i + 1]}", i + 1
        out.append(body)
        i += 1
    return out


def multi_process(args: Any) -> bool:
    """Whether the command's flags (:func:`add_distributed_flags`) ask for many processes."""
    return bool(getattr(args, "coordinator_address", None) or getattr(args, "distributed", False))


def init_distributed(args: Any) -> None:
    """Multi-host: explicit coordinator flags, or ``--distributed`` for auto-detection
    (TPU pods, SLURM, ...). On CPU the collectives go through gloo."""
    if not multi_process(args):
        return
    # Must not touch the backend before initialize(); gloo only matters for CPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if args.coordinator_address:
        kwargs = dict(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    jax.distributed.initialize(**kwargs)


def _train_cmd(args: Any, extra: list[str]) -> int:
    config = apply_overrides(load_config(args.config), config_overrides(extra))
    for flag, key in (("steps", "steps"), ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            config.train[key] = getattr(args, flag)
    if args.seed is not None:
        config.seed = args.seed
    init_distributed(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = train(config, args.workdir, restore_step=args.restore_step,
                    fallback_on_corrupt=args.fallback_on_corrupt)  # fmt: skip
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a PSA adapter (dpo) or a base/LoRA (denoise); resumes from --workdir",
        description="Train from a config; --config.KEY=VALUE overrides any config field.",
    )
    p.add_argument("--config", default="configs/tiny.py", help="configs/*.py file (path[:arg])")
    p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, summary")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument(
        "--restore-step",
        type=int,
        metavar="N",
        help="resume from checkpoint step N instead of the newest; newer steps are moved aside "
        "(checkpoints/<step>.set-aside-<time>), not deleted",
    )
    p.add_argument(
        "--fallback-on-corrupt",
        action="store_true",
        help="when the newest step cannot be read, resume from the newest readable one (logged); "
        "unreadable steps are moved aside (checkpoints/<step>.damaged-<time>), not deleted. "
        "Default: stop with an error naming the step",
    )
    add_distributed_flags(p, "every process trains its share of each batch")
    p.set_defaults(func=_train_cmd, accepts_extra=True)


def add_distributed_flags(p: Any, what: str) -> None:
    """``--distributed`` / ``--coordinator-address`` ``--num-processes`` ``--process-id``: a
    multi-process run (see :func:`init_distributed`); ``what`` says what each process does."""
    p.add_argument(
        "--distributed",
        action="store_true",
        help=f"jax.distributed.initialize() with auto-detection (pods, SLURM); {what}",
    )
    p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
