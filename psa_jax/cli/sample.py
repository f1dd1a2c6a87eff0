"""``psa-jax sample``: images for (prompt, user) pairs from a run or a diffusers folder.

Two layouts, as PSAlign's evaluation uses them:

* rows: a prompts CSV with a ``user_id`` column (``sage_seen.csv``) gives one image per row, for
  that row's user, written as ``images/<file_name stem>.png``;
* grid: ``--users 1,2,3`` (or ``--users base``) crosses every prompt with every listed user.
  Each prompt keeps one seed across users, so the grid compares users on the same noise;
  images go to ``images/<user>/<stem>.png`` and ``grid.png`` labels rows by user and columns by
  prompt.

``samples.jsonl`` lists every image with its caption, user, seed and sampler settings.

``--preset`` names the generation settings (:mod:`psa_jax.sample.presets`): ``psalign`` is
PSAlign's (the base folder's scheduler -- PNDM for SD 1.5 --, 50 steps, guidance 7.5, seed 2025,
negative prompt "monochrome, lowres, bad anatomy, worst quality, low quality"), the default for a
real model folder (``--pretrained DIR`` not ``packaged:``, or a run trained on one); ``tiny``
(DDIM, 25 steps, guidance 7.5, seed 0, no negative prompt) is the default for the packaged tiny
base and runs on it. ``--scheduler``, ``--steps``, ``--guidance-scale``, ``--seed`` and
``--negative-prompt`` given explicitly override the preset.

Bad input (a missing run or folder, a prompts file without a caption column, an unreadable
adapter file, a user without an embedding, a non-empty ``--out``) is one line on stderr and exit
status 2, found before any model is built (a run's own embedding table: once it is loaded, still
before any image is drawn). Images are drawn into ``<out>.partial-<pid>``, renamed to ``--out``
only when complete, so a failed or killed run never leaves a half-written ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax

from psa_jax.cli import per_core_devices
from psa_jax.cli.train import add_distributed_flags, init_distributed
from psa_jax.core import parallel, paths
from psa_jax.core.checkpoint import require_run
from psa_jax.core.outputs import atomic_folder, check_folder_out
from psa_jax.data.embed import load_embeddings
from psa_jax.models.packaged import resolve
from psa_jax.sample import presets
from psa_jax.sample.pipeline import Pipeline, read_scheduler_config
from psa_jax.sample.prompts import (
    BASE_USER,
    SampleInputError,
    check_adapter,
    check_pipeline,
    check_users,
    merge_shards,
    plan_images,
    plan_users,
    read_prompts,
    sample_to_folder,
    shard_folder,
    shard_plan,
    with_adapter,
    write_grid,
)
from psa_jax.sample.schedulers import SCHEDULERS


def _settings(args: argparse.Namespace, run_config: dict | None) -> tuple[str, dict, str | None]:
    """The preset (``--preset``, else the source's default), its settings with the flags given
    on top, and the base folder; a folder scheduler we cannot sample with fails here."""
    preset = args.preset or presets.default_preset(args.pretrained, run_config)
    given = {k: getattr(args, k) for k in presets.SETTINGS}
    settings = presets.preset_settings(preset, **given)
    folder = presets.base_folder(args.pretrained, run_config)
    presets.check_folder_scheduler(settings["scheduler"], folder)
    return preset, settings, folder


def _check_inputs(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict | None]:
    """Everything cheap, before any model is built: the source, ``--out``, the prompts and
    their users, the adapter file, and (``--embeddings``) every user's embedding; resolves
    ``args.preset`` and its settings (``args.settings``, ``args.base_folder``). Returns the
    prompt rows, the image plan and the embedding table (None: the run's own, known once the
    run is loaded)."""
    if bool(args.workdir) == bool(args.pretrained):
        raise SampleInputError("give exactly one of --workdir and --pretrained")
    if not args.prompts and not args.prompt:
        raise SampleInputError("give --prompts CSV or --prompt TEXT")
    check_folder_out(args.out)
    if jax.process_count() > 1:
        paths.require_local(args.out, "--out", "with several processes, the shards are merged "
                            "through a folder every process sees; run one process, or write "
                            "to a shared mount")  # fmt: skip
    run_config = None
    if args.workdir:
        _, run_config = require_run(args.workdir)
    args.preset, args.settings, args.base_folder = _settings(args, run_config)
    if not args.workdir:
        args.pretrained = resolve(args.pretrained)  # also a packaged:<name>
        if not os.path.isdir(args.pretrained):
            raise SampleInputError(f"--pretrained {args.pretrained!r} is not a folder")
        for part in ("unet", "text_encoder", "vae"):
            if not os.path.isdir(os.path.join(args.pretrained, part)):
                raise SampleInputError(
                    f"--pretrained {args.pretrained!r} is not a diffusers pipeline folder "
                    f"(no {part}/)"
                )
    if args.prompts:
        rows = read_prompts(args.prompts, args.limit)
    else:
        rows = [{"caption": c, "file_name": f"{i:07d}.png"} for i, c in enumerate(args.prompt)]
    plan = plan_images(rows, args.users, args.settings["seed"])
    if not plan:
        raise SampleInputError(f"no images to draw (--users {args.users!r})")
    users = plan_users(plan)
    adapter_dim = check_adapter(args.adapter) if args.adapter else None
    if users and args.pretrained and not args.adapter:
        raise SampleInputError(
            f"users ({', '.join(users[:5])}) need an adapter: give --adapter FILE, or --users base"
        )
    table = None
    if args.embeddings:
        table = load_embeddings(args.embeddings)
        dim = check_users(users, table, args.embeddings)
        if dim is not None and adapter_dim is not None and dim != adapter_dim:
            raise SampleInputError(
                f"the embeddings in {args.embeddings} have size {dim}, but the adapter "
                f"{args.adapter} takes {adapter_dim}: they come from different encoders"
            )
    elif users and args.pretrained:
        raise SampleInputError(
            f"users ({', '.join(users[:5])}) need profile embeddings: pass --embeddings DIR "
            "(from embed-profiles), or --users base"
        )
    return rows, plan, table


def _sample_cmd(args: argparse.Namespace) -> int:
    init_distributed(args)  # before anything touches a JAX backend
    rows, plan, table = _check_inputs(args)
    if args.workdir:
        pipeline = Pipeline.from_run(args.workdir)
        if args.adapter:  # the run's base with another adapter (a file, or another run)
            pipeline = with_adapter(pipeline, args.adapter)
        if pipeline.scheduler_config is None and args.base_folder:  # its base folder's
            pipeline.scheduler_config = read_scheduler_config(args.base_folder)
    else:
        pipeline = Pipeline.from_pretrained(args.pretrained, args.adapter)
    if table is not None:
        pipeline.embeddings = table
    where = args.embeddings or (f"the run {args.workdir}" if args.workdir else args.pretrained)
    check_pipeline(pipeline, plan, where)  # the run's own table is known only now
    settings = {k: v for k, v in args.settings.items() if k != "seed"}  # seeds: in the plan
    settings.update(user_scale=args.user_scale, batch_size=args.batch_size)
    if jax.process_count() > 1:
        return _sample_sharded(args, rows, plan, pipeline, settings)
    pipeline.mesh = parallel.sampling_mesh(args.batch_size)  # chunks over this host's devices
    # Into <out>.partial-<pid>, renamed to --out once complete: never a half-written --out.
    with atomic_folder(args.out) as tmp:
        records = sample_to_folder(pipeline, plan, tmp, **settings)
        _write_records(tmp, records, args.preset)
        grid = write_grid(plan, rows, tmp) if args.users else None
    grid = os.path.join(args.out, os.path.basename(grid)) if grid else None
    devices = 1 if pipeline.mesh is None else pipeline.mesh.size
    print(json.dumps({"images": len(records), "out": args.out, "grid": grid, "devices": devices}))
    return 0


def _write_records(folder: str, records: list[dict], preset: str) -> None:
    with open(os.path.join(folder, "samples.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({**r, "preset": preset}) + "\n")


def _sample_sharded(args, rows, plan, pipeline, settings) -> int:
    """Many processes (``--distributed`` or the coordinator flags): each draws every
    ``process_count``-th image into its shard folder; process 0 then merges the shards into
    ``--out`` (written atomically like a one-process run) and the others wait for it."""
    from psa_jax.sample.images import load_png

    index, count = jax.process_index(), jax.process_count()
    mine = shard_plan(plan, index, count)
    with atomic_folder(shard_folder(args.out, index, count)) as tmp:
        records = sample_to_folder(pipeline, mine, tmp, **settings) if mine else []
        _write_records(tmp, records, args.preset)
    tag = f"sample:{os.path.abspath(args.out)}"
    parallel.barrier(f"{tag}:drawn")
    grid = None
    if index == 0:
        with atomic_folder(args.out) as tmp:
            merged = merge_shards(tmp, [shard_folder(args.out, i, count) for i in range(count)])
            order = {p["file"]: i for i, p in enumerate(plan)}
            merged.sort(key=lambda r: order[r["file"]])
            with open(os.path.join(tmp, "samples.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in merged)
            if args.users:
                for p in plan:
                    p["image"] = load_png(os.path.join(tmp, p["file"]))
                grid = write_grid(plan, rows, tmp)
        grid = os.path.join(args.out, os.path.basename(grid)) if grid else None
    parallel.barrier(f"{tag}:merged")
    print(json.dumps({"process": index, "drawn": len(records), "images": len(plan),
                      "out": args.out, "grid": grid}))  # fmt: skip
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images per (prompt, user) from a run or a diffusers folder + adapter",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--workdir", help="a psa-jax train run (dpo: its adapter; denoise: its UNet)")
    p.add_argument("--pretrained", help="a local diffusers pipeline folder (or packaged:tiny-base)")
    p.add_argument("--adapter", help="a PSAlign/IP-Adapter file or run folder (replaces a run's)")
    p.add_argument("--prompts", help="prompts CSV (caption[, file_name][, user_id])")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable), instead of --prompts")
    p.add_argument("--users", help=f"user ids a,b,c for a grid ('{BASE_USER}': no adapter)")
    p.add_argument("--embeddings", help="profile embeddings folder (embed-profiles output)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--preset",
        choices=sorted(presets.PRESETS),
        help="generation settings: "
        + "; ".join(f"{k}: {v.about}" for k, v in presets.PRESETS.items())
        + ". Default: psalign for a real model folder (--pretrained DIR, or a run trained on "
        "one), tiny for packaged:tiny-base and its runs. Flags below override it",
    )
    p.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        help="default: the preset's (psalign: the base folder's scheduler_config.json)",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the preset's)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the preset's)")
    p.add_argument("--user-scale", type=float, default=1.0)
    p.add_argument("--negative-prompt", help="default: the preset's")
    p.add_argument(
        "--seed", type=int, help="seed of the first prompt (+1 per prompt; default: the preset's)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N prompts")
    add_distributed_flags(p, "each process draws every N-th image; process 0 merges them")
    p.set_defaults(func=_sample_cmd, cpu_devices=per_core_devices())
