"""``make-toy-data``, ``build-data``, ``embed-profiles``: the data stage's commands (local
folders only: see :mod:`psa_jax.data.prepare`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from psa_jax.core import paths
from psa_jax.data.embed import embed_profiles
from psa_jax.data.encoders import get_encoder
from psa_jax.data.profiles import read_users
from psa_jax.data.sage import build_data
from psa_jax.data.toy_scenes import ToyWorldConfig
from psa_jax.data.toy_world import USERS_ENV, default_users_csv, make_toy_world


def _local(args: argparse.Namespace, *flags: str) -> None:
    """Refuse a gs:// value of these flags by name (rather than a local folder ``gs:``)."""
    for flag in flags:
        value = getattr(args, flag) or ""
        paths.require_local(value, f"--{flag}", "the data stage reads and writes local files")


def _make_toy_data(args: argparse.Namespace) -> int:
    _local(args, "out", "users")
    users = args.users or default_users_csv()
    config = ToyWorldConfig(
        seed=args.seed, num_users=args.num_users, num_unseen_users=args.num_unseen_users
    )
    summary = make_toy_world(args.out, users, config, ids_from_row_order=args.ids_from_row_order)
    counts = {name: {k: v for k, v in split.items() if k != "per_category"}
              for name, split in summary["splits"].items()}  # fmt: skip
    print(json.dumps({"out": os.fspath(args.out), "users": users, "splits": counts}, indent=2))
    return 0


def _add_ids_from_row_order(p: argparse.ArgumentParser) -> None:
    help_ = ("the users file has no User_ID column: user N is its row N (1 = first row). "
             "Not needed for PSAlign's own users.csv")  # fmt: skip
    p.add_argument("--ids-from-row-order", action="store_true", help=help_)


def register_toy(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``make-toy-data --out DIR [--seed N] [--num-users N] [--users CSV]`` to a CLI."""
    defaults = ToyWorldConfig()
    p = subparsers.add_parser("make-toy-data", help="write the synthetic Sage-mini world")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=defaults.seed)
    seen_help = "seen users: the first N rows of the users file + the level users"
    users_help = f"PSAlign users.csv (default: ${USERS_ENV}, else the copy shipped with psa_jax)"
    p.add_argument("--num-users", type=int, default=defaults.num_users, help=seen_help)
    p.add_argument("--num-unseen-users", type=int, default=defaults.num_unseen_users)
    p.add_argument("--users", default=None, help=users_help)
    _add_ids_from_row_order(p)
    p.set_defaults(func=_make_toy_data)
    return p


def _build_data_cmd(args: argparse.Namespace) -> int:
    _local(args, "source", "out")
    report = build_data(
        args.source,
        args.out,
        resolution=args.resolution,
        skip_bad=args.skip_bad,
        name=args.name,
        split=args.split,
    )
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


def register_build(subparsers: argparse._SubParsersAction) -> None:
    """Add ``build-data`` to ``psa-jax``'s sub-commands."""
    p = subparsers.add_parser("build-data", help="Sage-format folder -> TFDS array_record dataset")
    p.add_argument("--source", required=True, help="Sage split folder (metadata.jsonl) or root")
    p.add_argument("--out", required=True, help="data_dir to write <name>/1.0.0 into")
    p.add_argument("--resolution", type=int, default=None, help="resize + center-crop to N x N")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    p.add_argument("--name", default="sage", help="TFDS dataset name (snake_case)")
    p.add_argument("--split", default="train", help="split name when --source is one split")
    p.set_defaults(func=_build_data_cmd)


def _embed_profiles(args: argparse.Namespace) -> int:
    _local(args, "users", "out")
    read_users(args.users, ids_from_row_order=args.ids_from_row_order)  # fail before loading
    src = get_encoder(args.encoder, device=args.device, dtype=args.dtype)
    kw = dict(banned_from=args.banned_from, max_new_tokens=args.max_new_tokens)
    kw["ids_from_row_order"] = args.ids_from_row_order
    manifest = embed_profiles(args.users, src, args.out, batch_size=args.batch_size, **kw)
    keys = ("encoder", "dim", "checksum", "num_users", "banned_from")
    print(json.dumps({"out": args.out, **{k: manifest[k] for k in keys}}, indent=2))
    return 0


def register_embed(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``embed-profiles`` to the ``psa-jax`` command line."""
    p = subparsers.add_parser("embed-profiles", help="one embedding .npy per user of a users CSV")
    p.add_argument("--users", required=True, help="users.csv (PSAlign layout)")
    _add_ids_from_row_order(p)
    p.add_argument("--encoder", default="minilm", help="minilm | causal-lm:PATH | npy:DIR")
    out_help = "output folder: <user_id>.npy + manifest.json (an existing one gets new users added)"
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--banned-from", choices=("csv", "llm"), default="csv")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256, help="for --banned-from llm")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.set_defaults(func=_embed_profiles)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    register_toy(subparsers)
    register_build(subparsers)
    register_embed(subparsers)
