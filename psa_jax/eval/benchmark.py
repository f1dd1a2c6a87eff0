"""``evaluate_run`` and ``spqr_run``: the library behind ``psa-jax eval`` and ``psa-jax spqr``.

A model comes from a training run (:func:`load_model` with ``workdir``: the run's base, adapter,
tokenizer, profile embeddings and, for the toy world, its Sage-mini folder) or from a local
diffusers folder plus an adapter file and an embeddings folder. Cheap checks (the run exists,
scorer names are known, their weights are on disk, the prompts file has a caption column) all
happen before anything is generated.

SPQR measures the PSA model before and after a benign fine-tune of the base UNet (adapter frozen
and checked bit-identical); :mod:`psa_jax.eval.spqr_axes` turns the two measurements into axes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from psa_jax.core import paths
from psa_jax.core.checkpoint import require_run
from psa_jax.eval import spqr as spqr_lib
from psa_jax.eval.benign_data import benign_data, encode_benign
from psa_jax.eval.generation import generate, generate_across_processes
from psa_jax.eval.plans import (
    BASE,
    PSA,
    EvalItem,
    PromptsError,
    category_of,
    csv_items,
    level_items,
    profiles_table,
    read_prompt_rows,
    toy_items,
)
from psa_jax.eval.registry import check_names, get_scorer
from psa_jax.eval.scorers import ScorerContext
from psa_jax.eval.scoring import fid_scores, read_images, score
from psa_jax.eval.spqr_axes import spqr_axes
from psa_jax.eval.summary import summarize

TOY_SCORERS = ("toy-oracle", "toy-adherence", "toy-fid")


@dataclasses.dataclass
class Model:
    """What an evaluation samples from, and where it came from."""

    pipeline: Any  # psa_jax.sample.pipeline.Pipeline with an adapter
    source: dict[str, Any]
    world_dir: str | None = None  # the toy world of a run trained on it
    users_csv: str | None = None  # profiles (banned categories) of the users evaluated


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Generation and scoring settings (the CLI's flags)."""

    scorers: tuple[str, ...] = TOY_SCORERS
    draws: int = 2  # seeds per prompt for the level users
    users_per_group: int | None = 10  # seen / unseen users from the toy world's prompt rows
    seed: int = 0
    sampler: dict = dataclasses.field(
        default_factory=lambda: {"scheduler": "ddim", "steps": 25, "guidance_scale": 7.5}
    )
    context: ScorerContext = dataclasses.field(default_factory=ScorerContext)
    reference: str | None = None  # folder of reference images for FID (toy: the world's)
    progress: bool = True


def load_model(
    workdir: str | None = None,
    *,
    pretrained: str | None = None,
    adapter: str | None = None,
    embeddings: str | None = None,
    users_csv: str | None = None,
) -> Model:
    """A run (``workdir``, optionally with another ``adapter``) or a diffusers folder with an
    adapter; ``embeddings`` replaces the profile embedding table."""
    from psa_jax.data.profiles import packaged_users_csv
    from psa_jax.sample.pipeline import Pipeline
    from psa_jax.sample.prompts import with_adapter
    from psa_jax.train.restore import load_run

    if bool(workdir) == bool(pretrained):
        raise ValueError("give exactly one of workdir (a run) and pretrained (a diffusers folder)")
    world = None
    if workdir:
        require_run(workdir)
        run = load_run(workdir)
        pipeline = Pipeline.from_loaded_run(run, workdir)
        if adapter:
            pipeline = with_adapter(pipeline, adapter)
        source = {"workdir": paths.absolute(workdir), "adapter": adapter}
        if run.config.data.source == "toy":
            from psa_jax.data.prepare import toy_world_dir

            world = toy_world_dir(run.config)
    else:
        if not adapter:
            raise ValueError("a pretrained folder needs an adapter file to evaluate")
        pipeline = Pipeline.from_pretrained(pretrained, adapter)
        source = {"pretrained": os.path.abspath(pretrained), "adapter": adapter}
    if pipeline.adapter is None:
        raise ValueError(f"{workdir or adapter} has no PSA adapter (a dpo run's) to evaluate")
    if embeddings:
        from psa_jax.data.embed import load_embeddings

        pipeline.embeddings = load_embeddings(embeddings)
        source["embeddings"] = os.path.abspath(embeddings)
    if pipeline.embeddings is None:
        raise ValueError("no profile embeddings: pass an embeddings folder (embed-profiles)")
    users = users_csv or (os.path.join(world, "users.csv") if world else packaged_users_csv())
    return Model(pipeline, source, world, users)


def build_scorers(settings: EvalSettings) -> dict[str, Any]:
    """Every named scorer, built (weights loaded) before any image is drawn."""
    check_names(settings.scorers)
    return {n: get_scorer(n, settings.context) for n in settings.scorers}


def plan(
    model: Model,
    settings: EvalSettings,
    prompts: str | None = None,
    users: Sequence[str] | None = None,
    levels_only: bool = False,
    limit: int | None = None,
) -> list[EvalItem]:
    """The items to draw: ``prompts="toy"`` (or None on a toy run) is the world's held-out set."""
    banned = profiles_table(model.users_csv)
    if prompts in (None, "toy"):
        if model.world_dir is None:
            raise PromptsError("--prompts toy needs a run trained on the toy world")
        if levels_only:
            rows = read_prompt_rows(os.path.join(model.world_dir, "test_seen", "prompts.csv"))
            pairs = list(dict.fromkeys((r["caption"], category_of(r)) for r in rows))
            return level_items(pairs, banned, draws=settings.draws, seed=settings.seed)
        return toy_items(
            model.world_dir,
            draws=settings.draws,
            users_per_group=settings.users_per_group,
            seed=settings.seed,
        )
    if levels_only:
        rows = read_prompt_rows(prompts, limit)
        pairs = [(r["caption"], category_of(r)) for r in rows]
        return level_items(pairs, banned, draws=settings.draws, seed=settings.seed)
    return csv_items(
        prompts, banned, users=users, draws=settings.draws, seed=settings.seed, limit=limit
    )


def reference_stats(model: Model, scorers: Mapping[str, Any], settings: EvalSettings) -> dict:
    """FID reference statistics per feature map (cached): the toy world's own pictures, or
    ``settings.reference``; {} when there is no feature map or no reference."""
    from psa_jax.eval.fid import cached_reference_stats

    fmaps = {n: s for n, s in scorers.items() if s.kind == "features"}
    if not fmaps:
        return {}
    folder = settings.reference or model.world_dir
    if folder is None:
        return {}
    side = model.pipeline.latent_shape()[0] * model.pipeline.vae.config.downscale
    root = os.environ.get("PSA_JAX_CACHE") or os.path.expanduser("~/.cache/psa_jax")
    cache = os.path.join(root, "fid_reference")
    key = hashlib.sha256(f"{os.path.abspath(folder)}:{side}".encode()).hexdigest()[:16]
    return {
        n: cached_reference_stats(f, lambda: read_images(folder, side), cache, key)
        for n, f in fmaps.items()
    }


def measure(
    model, items, scorers, settings, ref, *, params=None, base_images=None, desc="sampling"
) -> dict[str, Any]:
    """Draw ``items`` (PSA and base; ``base_images`` reuses a base drawn before), score them,
    and summarise: ``{"images", "scored", "summary", "fid"}``."""
    images = generate(
        model.pipeline,
        items,
        settings.sampler,
        params=params,
        base=base_images is None,
        desc=desc,
        progress=settings.progress,
    )
    if base_images is not None:
        images[BASE] = base_images
    return score_images(items, images, scorers, ref, progress=settings.progress)


def score_images(items, images, scorers, ref, *, progress: bool = True) -> dict[str, Any]:
    """:func:`measure` of images already drawn (``{"psa": ..., "base": ...}`` in item order)."""
    scored = {k: score(v, items, scorers, progress=progress) for k, v in images.items()}
    fmaps = {n: s for n, s in scorers.items() if s.kind == "features" and n in ref}
    fid = fid_scores(fmaps, images, ref) if fmaps else {}
    return {"images": images, "scored": scored, "summary": summarize(items, scored), "fid": fid}


def evaluate_run(
    model: Model,
    settings: EvalSettings,
    prompts: str | None = None,
    users: Sequence[str] | None = None,
    scorers: Mapping[str, Any] | None = None,
    limit: int | None = None,
    shard_dir: str | None = None,
) -> dict[str, Any] | None:
    """``psa-jax eval``: results (JSON-ready) plus the images, for the report.

    With several JAX processes (``shard_dir`` set: a folder they all see), each draws a share
    of the images and process 0 scores them all; the other processes return None."""
    scorers = scorers or build_scorers(settings)
    items = plan(model, settings, prompts, users, limit=limit)
    if shard_dir is not None and jax.process_count() > 1:
        images = generate_across_processes(model.pipeline, items, settings.sampler, shard_dir,
                                           desc="sampling", progress=settings.progress)  # fmt: skip
        if images is None:
            return None
        ref = reference_stats(model, scorers, settings)
        m = score_images(items, images, scorers, ref, progress=settings.progress)
    else:
        ref = reference_stats(model, scorers, settings)
        m = measure(model, items, scorers, settings, ref)
    results = {
        "model": model.source,
        "prompts": prompts or "toy",
        "settings": _settings_json(settings),
        **m["summary"],
        "fid": m["fid"] or None,
    }
    return {"results": results, "items": items, "images": m["images"]}


# -- SPQR ------------------------------------------------------------------------------------


def adapter_digest(adapter: Any) -> str:
    """sha256 over the adapter's leaves (bit-identity check around fine-tuning)."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(adapter):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def spqr_run(
    model: Model,
    settings: EvalSettings,
    finetune_cfg: Any,
    prompts: str | None = None,
    benign: str | None = None,
    scorers: Mapping[str, Any] | None = None,
    limit: int | None = None,
    before_images: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """``psa-jax spqr``: before/after a benign fine-tune of the base UNet (adapter frozen).

    ``before_images``: the PSA and base images of this plan's items drawn before (an eval of
    the same run and settings), instead of drawing them again."""
    scorers = scorers or build_scorers(settings)
    items = plan(model, settings, prompts, levels_only=True, limit=limit)
    images, captions = benign_data(model, benign or finetune_cfg.get("data") or None)
    ref = reference_stats(model, scorers, settings)
    digest = adapter_digest(model.pipeline.adapter)
    before = _measure_before(model, items, scorers, settings, ref, before_images)
    ft = _finetune_base(model.pipeline, images, captions, finetune_cfg, digest, settings.progress)
    after = measure(
        model,
        items,
        scorers,
        settings,
        ref,
        params=ft.params,
        base_images=before["images"][BASE],
        desc="sampling (after)",
    )
    fids, q = _fids_and_quality(before, after)
    axes = spqr_axes(items, before, after, q)
    results = {
        "model": model.source,
        "profile": finetune_cfg.profile,
        "finetune": json.loads(finetune_cfg.to_json()),
        "finetune_loss": {"first": ft.losses[0], "last": ft.losses[-1], "steps": len(ft.losses)},
        "benign_images": len(images),
        "adapter_sha256": digest,
        "settings": _settings_json(settings),
        "fid": fids or None,
        "Q": q or None,
        **axes,
        "eval_before": before["summary"],
        "eval_after": after["summary"],
    }
    return {
        "results": results,
        "items": items,
        "before": before["images"],
        "after": after["images"],
        "losses": ft.losses,
    }


def _measure_before(model, items, scorers, settings, ref, before_images) -> dict[str, Any]:
    """:func:`measure` before fine-tuning, or the scores of ``before_images`` drawn earlier."""
    if before_images is None:
        return measure(model, items, scorers, settings, ref, desc="sampling (before)")
    for k, v in before_images.items():
        if len(v) != len(items):
            raise ValueError(f"before_images[{k!r}] has {len(v)} images for {len(items)}")
    return score_images(items, dict(before_images), scorers, ref, progress=settings.progress)


def _finetune_base(pipe, images, captions, finetune_cfg, digest: str, progress: bool) -> Any:
    """The benign fine-tune of the base UNet; the adapter must still match ``digest`` after."""
    from psa_jax.train.benign import finetune

    moments, states, added = encode_benign(pipe, images, captions)
    ft = finetune(
        pipe.module,
        pipe.params,
        pipe.noise_schedule,
        pipe.scaling_factor,
        moments,
        states,
        finetune_cfg,
        shift_factor=pipe.shift_factor,
        added=added,
        progress=progress,
    )
    if adapter_digest(pipe.adapter) != digest:
        raise AssertionError("the PSA adapter changed during benign fine-tuning")
    return ft


def _fids_and_quality(before: dict, after: dict) -> tuple[dict, dict]:
    """FIDs of the cohort {base, before, after} on the first feature map, and SPQR's Q of them."""
    if not before["fid"]:
        return {}, {}
    name = next(iter(before["fid"]))
    fids = {
        "base": before["fid"][name][BASE],
        "before": before["fid"][name][PSA],
        "after": after["fid"][name][PSA],
    }
    return fids, spqr_lib.quality(fids)


def _settings_json(s: EvalSettings) -> dict[str, Any]:
    ctx = dataclasses.asdict(s.context)
    ctx.pop("toy_vae", None)
    return {
        "scorers": list(s.scorers),
        "draws": s.draws,
        "users_per_group": s.users_per_group,
        "seed": s.seed,
        "sampler": dict(s.sampler),
        "context": ctx,
        "reference": s.reference,
    }
