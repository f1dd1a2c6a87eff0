"""The demo's stages, each cached in its folder under ``--out`` (see ``demo.cache``): data, base,
DPO, eval, SPQR, the user-token ablation and the export with its diffusers round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

from psa_jax.demo.cache import adapter_key, cached, eval_key, replace_dir
from psa_jax.demo.metrics import LEVELS, adherence_ratio, level_summary
from psa_jax.demo.settings import (
    DemoError,
    DemoSettings,
    ablation_config,
    base_folder,
    dpo_config,
    eval_settings,
    load_tiny_config,
    stage_dir,
)


def stage_data(settings: DemoSettings, log) -> dict[str, Any]:
    """World, embeddings and built splits (what every later stage reads)."""
    from psa_jax.data import prepare
    from psa_jax.models import loading

    config = dpo_config(settings)

    def make():
        world = prepare.toy_world_dir(config)
        models = loading.load_base_models(config)
        splits = prepare.prepare_data(config, models)
        with open(os.path.join(world, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        return {
            "world": world,
            "world_version": summary.get("version"),
            "users": len(splits.embeddings),
            "splits": sorted(splits.data_dirs),
        }

    key = {"toy": dict(config.data.toy), "embeddings": config.data.embeddings}
    return cached(stage_dir(settings, "data"), key, make, log)


def stage_base(settings: DemoSettings, log) -> dict[str, Any]:
    """The shipped base, or (``--pretrain``) the launch/tiny.sh recipe's VAE, base and
    calibrate runs."""
    from psa_jax.export.pipeline import RECIPE, export_base_pipeline

    folder = stage_dir(settings, "base")
    if not settings.pretrain:
        path = base_folder(settings)
        with open(os.path.join(path, RECIPE), encoding="utf-8") as f:
            recipe = json.load(f)
        return {"pipeline": path, "shipped": True, "recipe": recipe}

    def make():
        from psa_jax.train.trainer import train

        vae_dir = os.path.join(folder, "vae")
        log("[base] training the tiny VAE (configs/tiny.py:vae)")
        vae_cfg = load_tiny_config(settings, "vae")
        train(vae_cfg, vae_dir)
        log("[base] training the tiny base UNet (configs/tiny.py:base)")
        base_cfg = load_tiny_config(settings, "base")
        base_cfg.model.vae_path = os.path.join(vae_dir, "vae")
        train(base_cfg, os.path.join(folder, "unet"))
        packed = export_base_pipeline(
            os.path.join(folder, "unet"), os.path.join(folder, "uncalibrated")
        )
        log("[base] calibrating its marker rates per category (configs/tiny.py:calibrate)")
        cal_cfg = load_tiny_config(settings, "calibrate")
        cal_cfg.model.pretrained = packed
        train(cal_cfg, os.path.join(folder, "calibrate"))
        out = export_base_pipeline(os.path.join(folder, "calibrate"), base_folder(settings))
        with open(os.path.join(out, RECIPE), encoding="utf-8") as f:
            return {"pipeline": out, "shipped": False, "recipe": json.load(f)}

    key = {stage: load_tiny_config(settings, stage).to_dict()
           for stage in ("vae", "base", "calibrate")}  # fmt: skip
    return cached(folder, key, make, log)


def stage_dpo(settings: DemoSettings, log) -> dict[str, Any]:
    return _train_dpo(dpo_config(settings), os.path.abspath(stage_dir(settings, "dpo")), log)


def _train_dpo(config: Any, workdir: str, log, name: str = "dpo") -> dict[str, Any]:
    """Diffusion-DPO into ``workdir``, resumed when it holds a run of the same key."""
    from psa_jax.data.encoders import sha256_folder
    from psa_jax.train.trainer import train

    key = {"config": json.loads(config.to_json_best_effort()),
           "base_sha256": sha256_folder(config.model.pretrained)}  # fmt: skip
    key["config"]["train"].pop("progress", None)
    key_file = os.path.join(workdir, "demo_key.json")

    def make():
        # A checkpoint of other settings (or another base) must not be resumed: start over.
        if os.path.isfile(key_file):
            with open(key_file, encoding="utf-8") as f:
                if json.load(f) != json.loads(json.dumps(key)):
                    log(f"[{name}] {workdir} holds a run of other settings: starting over")
                    shutil.rmtree(workdir)
        os.makedirs(workdir, exist_ok=True)
        with open(key_file, "w", encoding="utf-8") as f:
            json.dump(key, f)
        tokens = config.model.adapter.num_user_tokens
        log(f"[{name}] Diffusion-DPO, {config.train.steps} steps, {tokens} user token(s) "
            f"(resumes from {workdir})")  # fmt: skip
        summary = train(config, workdir)
        return {"workdir": workdir, "step": summary["step"], "eval": summary.get("eval")}

    return cached(os.path.join(workdir, "demo"), key, make, log, name=name)


def stage_eval(settings: DemoSettings, model: Any, log) -> dict[str, Any]:
    """Level users, seen and unseen users: base vs PSA, scored; the eval report in ``eval/``."""
    from psa_jax.eval import benchmark, report

    folder = stage_dir(settings, "eval")

    def make():
        bundle = benchmark.evaluate_run(model, eval_settings(settings))
        with report.atomic_output(folder + ".tmp", "results.json") as tmp:
            report.write_eval_report(tmp, bundle)
            np.savez_compressed(
                os.path.join(tmp, "images.npz"),
                base=bundle["images"]["base"],
                psa=bundle["images"]["psa"],
            )
            with open(os.path.join(tmp, "items.json"), "w", encoding="utf-8") as f:
                json.dump([dataclasses.asdict(it) for it in bundle["items"]], f)
        replace_dir(folder + ".tmp", folder)
        return {"results": os.path.join(folder, "results.json")}

    key = {"adapter": adapter_key(model), **eval_key(settings)}
    return cached(folder, key, make, log)


def eval_level_images(
    settings: DemoSettings, model: Any, es: Any
) -> tuple[list[Any], dict[str, np.ndarray]]:
    """The level users' items and images of the eval stage, checked to be exactly what a
    level-only plan of ``model`` draws now (same captions, seeds and users)."""
    from psa_jax.demo.report import load_eval_images
    from psa_jax.eval import benchmark

    items, images = load_eval_images(stage_dir(settings, "eval"))
    level_items = benchmark.plan(model, es, "toy", levels_only=True)
    idx = [i for i, it in enumerate(items) if it.group.startswith("level-")]
    if [items[i] for i in idx] != level_items:
        raise DemoError("the eval stage's level images are not this plan's: rerun with --fresh")
    return level_items, {k: v[idx] for k, v in images.items()}


# Seeds of the base-rate draws start here (the level images use seed + 0 .. captions x draws).
BASE_RATE_SEED = 100_000


def stage_base_rates(settings: DemoSettings, model: Any, log) -> dict[str, Any]:
    """The base's own-marker rate per category: every held-out caption drawn by the base with
    ``base_draws`` seeds of its own. The level images' base draws (``draws`` seeds, 9 images a
    category) decide a 30-70% window with a standard error of ~0.16; this is the measurement
    the "measurable" target reads."""
    from psa_jax.data.profiles import CATEGORIES
    from psa_jax.eval import benchmark
    from psa_jax.eval.toy import ToyOracle

    folder = stage_dir(settings, "base_rates")

    def make():
        items = benchmark.plan(model, eval_settings(settings), "toy", levels_only=True)
        pairs = list(dict.fromkeys((it.caption, it.category) for it in items))
        n = settings.base_draws
        log(f"[base_rates] the base on {len(pairs)} held-out captions x {n} seeds")
        seeds = [BASE_RATE_SEED + settings.seed + i * n + k
                 for i in range(len(pairs)) for k in range(n)]  # fmt: skip
        sampler = {k: v for k, v in settings.sampler.items() if k != "user_scale"}
        images = model.pipeline([c for c, _ in pairs for _ in range(n)], None, seeds, **sampler)
        det = ToyOracle()(images).categories
        cats = np.repeat([cat for _, cat in pairs], n)
        rates = {}
        for c, cat in enumerate(CATEGORIES):
            sel = np.flatnonzero(cats == cat)
            rates[cat] = float(det[sel, c].mean()) if len(sel) else None
        return {"rates": rates, "images_per_category": len(seeds) // max(len(set(cats)), 1)}

    key = {"adapter": adapter_key(model), "base_draws": settings.base_draws,
           "sampler": dict(settings.sampler), "seed": settings.seed}  # fmt: skip
    return cached(folder, key, make, log)


def stage_spqr(settings: DemoSettings, model: Any, log) -> dict[str, Any]:
    from psa_jax.eval import benchmark, report
    from psa_jax.train.benign import finetune_config

    folder = stage_dir(settings, "spqr")
    ft = finetune_config(settings.finetune_profile, steps=settings.finetune_steps)

    def make():
        log(f"[spqr] {settings.finetune_profile} benign fine-tune, {settings.finetune_steps} steps")
        es = eval_settings(settings)
        # "Before" is the eval stage's level images (same items, seeds and sampler).
        _, before = eval_level_images(settings, model, es)
        bundle = benchmark.spqr_run(model, es, ft, before_images=before)
        with report.atomic_output(folder + ".tmp", "spqr.json") as tmp:
            report.write_spqr_report(tmp, bundle)
        replace_dir(folder + ".tmp", folder)
        return {"results": os.path.join(folder, "spqr.json")}

    key = {"adapter": adapter_key(model), "finetune": ft.to_dict(), **eval_key(settings)}
    return cached(folder, key, make, log)


def stage_ablation(settings: DemoSettings, tokens: int, log) -> dict[str, Any]:
    """The same DPO stage with ``tokens`` user tokens, and its level users' images (the eval
    stage's level captions and seeds; its base images are reused), summarised like the main
    run: the user-token ablation row of the report."""
    from psa_jax.demo.report import pair_accuracy_curve
    from psa_jax.eval import benchmark
    from psa_jax.eval.generation import generate
    from psa_jax.eval.plans import BASE, PSA
    from psa_jax.eval.scoring import score
    from psa_jax.eval.summary import group_summary

    folder = stage_dir(settings, f"ablation_t{tokens}")
    run = _train_dpo(ablation_config(settings, tokens), os.path.join(folder, "dpo"), log,
                     name=f"ablation_t{tokens}/dpo")  # fmt: skip
    model = benchmark.load_model(run["workdir"])

    def make():
        es = eval_settings(settings)
        level_items, images = eval_level_images(settings, model, es)
        log(f"[ablation_t{tokens}] drawing the level users' images")
        drawn = generate(model.pipeline, level_items, es.sampler, base=False,
                         desc=f"ablation T={tokens}", progress=settings.progress)  # fmt: skip
        psa = drawn[PSA]
        scored = {k: score(v, level_items, benchmark.build_scorers(es), progress=False)
                  for k, v in ((PSA, psa), (BASE, images[BASE]))}  # fmt: skip
        det = {k: sc.detected for k, sc in scored.items()}
        # The eval stage's per-group summary, so both rows' adherence is the same measure.
        ratio = {}
        for lv in LEVELS:
            sel = [i for i, it in enumerate(level_items) if it.group == f"level-{lv}"]
            ratio[str(lv)] = adherence_ratio(group_summary(level_items, sel, scored))
        acc = pair_accuracy_curve(run["workdir"])
        return {"num_user_tokens": tokens, **level_summary(level_items, det),
                "adherence_ratio_per_level": ratio,
                "pair_accuracy": acc[-1][1] if acc else None}  # fmt: skip

    key = {"adapter": adapter_key(model), **eval_key(settings)}
    return cached(folder, key, make, log)


def stage_export(settings: DemoSettings, model: Any, base: str, log) -> dict[str, Any]:
    """PSAlign + IP-Adapter files, and one prompt through diffusers with the IP-Adapter."""
    from psa_jax.export.formats import export_run

    folder = stage_dir(settings, "export")
    workdir = os.path.abspath(stage_dir(settings, "dpo"))

    def make():
        os.makedirs(folder, exist_ok=True)
        psalign = export_run(workdir, "psalign", os.path.join(folder, "psa_adapter.safetensors"))
        ip_dir = export_run(workdir, "diffusers-ip-adapter", os.path.join(folder, "ip_adapter"))
        check = diffusers_round_trip(model, base, ip_dir, settings, folder)
        return {"psalign": psalign, "ip_adapter": ip_dir, "round_trip": check}

    key = {"adapter": adapter_key(model), "sampler": dict(settings.sampler)}
    return cached(folder, key, make, log)


ROUND_TRIP_USER = "0000501"  # PSAlign's level-5 user: bans every category
ROUND_TRIP_PROMPT_CATEGORY = "Violence"


def diffusers_round_trip(
    model: Any, base: str, ip_dir: str, settings: DemoSettings, folder: str
) -> dict[str, Any]:
    """One held-out prompt for the level-5 user, drawn by psa_jax and by diffusers'
    ``StableDiffusionPipeline`` (the base folder + the IP-Adapter export) from the same initial
    latents; returns the max abs difference on [0, 1] images."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import StableDiffusionPipeline

    from psa_jax.eval.generation import embeddings_for
    from psa_jax.eval.plans import read_prompt_rows
    from psa_jax.sample.images import labelled_grid
    from psa_jax.sample.sampler import initial_latents

    rows = read_prompt_rows(os.path.join(model.world_dir, "test_seen", "prompts.csv"))
    prompt = next(r["caption"] for r in rows if r.get("category") == ROUND_TRIP_PROMPT_CATEGORY)
    seed, pipe = settings.seed, model.pipeline
    embed = embeddings_for([ROUND_TRIP_USER], pipe.embeddings)
    steps, cfg = int(settings.sampler["steps"]), float(settings.sampler["guidance_scale"])
    scale = float(settings.sampler.get("user_scale", 1.0))
    ours = pipe([prompt], embed, [seed], scheduler="ddim", steps=steps, guidance_scale=cfg,
                user_scale=scale, output="float")  # fmt: skip
    torch_pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    torch_pipe.set_progress_bar_config(disable=True)
    torch_pipe.load_ip_adapter(
        ip_dir, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None
    )
    torch_pipe.set_ip_adapter_scale(scale)
    keys = jax.vmap(jax.random.key)(jnp.asarray([seed], jnp.uint32))
    latents = np.asarray(initial_latents(keys, pipe.latent_shape())).transpose(0, 3, 1, 2)
    user = torch.from_numpy(np.asarray(embed, np.float32))[:, None, :]
    with torch.no_grad():
        theirs = torch_pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=cfg,
            latents=torch.from_numpy(latents.copy()),
            ip_adapter_image_embeds=[torch.cat([torch.zeros_like(user), user])],
            output_type="np",
        ).images
    theirs = np.asarray(theirs, np.float32)
    diff = float(np.abs(theirs - ours).max())
    pair = np.stack([np.stack([ours[0], theirs[0]])])
    to8 = lambda x: np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    labelled_grid(to8(pair), [f"user {ROUND_TRIP_USER}"], ["psa_jax", "diffusers"]).save(
        os.path.join(folder, "round_trip.png")
    )
    return {"prompt": prompt, "user": ROUND_TRIP_USER, "seed": seed, "max_abs_diff": diff,
            "image": "round_trip.png"}  # fmt: skip
