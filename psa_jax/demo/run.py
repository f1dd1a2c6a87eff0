"""``psa-jax demo``: the embedded default end to end, on a CPU, with no downloads.

Stages (each writes its folder under ``--out`` and is skipped when its result is there, so a
killed demo resumes; ``--fresh`` starts over):

1. ``data``: the Sage-mini world, its users' MiniLM profile embeddings, the built splits;
2. ``base``: the tiny base models (VAE, text encoder, UNet): the package's shipped folder, or
   with ``--pretrain`` retrained by the ``launch/tiny.sh`` recipe (``configs/tiny.py:vae`` and
   ``:base``) and packed as a diffusers pipeline folder;
3. ``dpo``: the PSA adapter, Diffusion-DPO on that base (``configs/tiny.py``);
4. ``eval``: base vs PSA images for the strictness-level users and for seen and unseen users
   over held-out captions of all 7 categories, scored by the toy scorers;
5. ``spqr``: SPQR before/after a ``lite`` benign fine-tune, with the per-level axes;
6. ``export``: PSAlign and diffusers IP-Adapter files, and one prompt re-run through diffusers'
   ``StableDiffusionPipeline`` with the IP-Adapter export (max abs difference recorded);
7. ``report``: ``report.html``, ``metrics.json`` (keys in ``../shared/API.md``) and the PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

from psa_jax.demo.metrics import ablation_rows, demo_metrics, targets
from psa_jax.demo.settings import DemoError, DemoSettings, stage_dir
from psa_jax.demo.stages import (
    stage_ablation,
    stage_base,
    stage_base_rates,
    stage_data,
    stage_dpo,
    stage_eval,
    stage_export,
    stage_spqr,
)


def run_demo(settings: DemoSettings, fresh: bool = False, log=print) -> dict[str, Any]:
    """Every stage in order (cached ones reused); returns ``metrics.json``'s content."""
    from psa_jax.core import parallel
    from psa_jax.demo import report as demo_report
    from psa_jax.eval import benchmark
    from psa_jax.eval.toy import ToyOracle

    t0 = time.time()
    if fresh and os.path.isdir(settings.out):
        _check_demo_folder(settings.out)
        shutil.rmtree(settings.out)
    os.makedirs(settings.out, exist_ok=True)
    devices = _jax_devices()
    log(f"demo: JAX on {devices['count']} {devices['platform']} device(s)")
    stages = {}
    stages["base"] = stage_base(settings, log)
    stages["data"] = stage_data(settings, log)
    stages["dpo"] = stage_dpo(settings, log)
    model = benchmark.load_model(stages["dpo"]["workdir"])
    model.pipeline.mesh = parallel.local_data_mesh()  # sampling data-parallel, as training
    stages["eval"] = stage_eval(settings, model, log)
    stages["base_rates"] = stage_base_rates(settings, model, log)
    stages["spqr"] = stage_spqr(settings, model, log)
    stages["export"] = stage_export(settings, model, stages["base"]["pipeline"], log)
    with open(stages["eval"]["results"], encoding="utf-8") as f:
        eval_results = json.load(f)
    with open(stages["spqr"]["results"], encoding="utf-8") as f:
        spqr_results = json.load(f)
    items, images = demo_report.load_eval_images(stage_dir(settings, "eval"))
    oracle = ToyOracle()
    det = {k: oracle(v).categories for k, v in images.items()}
    metrics = demo_metrics(items, det, eval_results, spqr_results, stages["base_rates"])
    metrics["round_trip_max_abs_diff"] = stages["export"]["round_trip"]["max_abs_diff"]
    metrics["pair_accuracy"] = demo_report.pair_accuracy_curve(stages["dpo"]["workdir"])
    if settings.ablation_tokens is not None:
        stages["ablation"] = stage_ablation(settings, settings.ablation_tokens, log)
    metrics["ablation_user_tokens"] = ablation_rows(settings, metrics, stages)
    metrics["targets"] = targets(metrics)
    metrics["stage_seconds"] = {k: v.get("seconds") for k, v in stages.items()}
    metrics["settings"] = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    metrics["jax_devices"] = devices
    demo_report.write_report(settings.out, metrics, stages, items, images)
    return metrics


def _jax_devices() -> dict[str, Any]:
    """What the stages ran on (the training steps are data-parallel over every device)."""
    import jax

    return {"platform": jax.default_backend(), "count": jax.device_count()}


def _check_demo_folder(out: str) -> None:
    """``--fresh`` deletes ``out``: only a folder a demo wrote (or an empty one)."""
    entries = set(os.listdir(out))
    if entries and not entries & {"metrics.json", "data", "dpo", "base", "cache"}:
        raise DemoError(
            f"--fresh would delete {out}, which holds no demo output: {sorted(entries)[:5]}"
        )
