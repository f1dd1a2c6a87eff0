"""``run_bench``: every contestant of one shape and task, in one process, one after another.

Same shape, batch, dtype and random weights for all. psa_jax runs first (a GPU's
``peak_bytes_in_use`` is a process-lifetime figure); each contestant is released before the
next is built, and torch's peak-memory counter is reset between them.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import tempfile
from collections.abc import Callable
from typing import Any

from psa_jax.bench import CONTESTANTS, WHATS, report
from psa_jax.bench import flops as flops_lib
from psa_jax.bench.measure import Contestant, peak_tflops, time_contestant
from psa_jax.bench.shapes import SAMPLE_BATCH, BenchShape, resolve


@dataclasses.dataclass
class BenchOptions:
    shape: str = "tiny"
    what: str = "train"
    steps: int = 5  # timed steps (median reported)
    warmup: int = 1  # untimed steps after the first call
    batch: int | None = None  # None: the shape's (train) / 8 (sample)
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on a CPU
    device: str = "auto"  # auto | cpu | gpu
    peak_tflops: float | None = None
    torch_compile: str = "auto"  # auto | on | off (torch-fair)
    sample_steps: int = 50
    contestants: tuple[str, ...] = CONTESTANTS
    seed: int = 0
    config_dir: str | None = None
    torch_threads: int | None = None  # None: torch's default (one per physical core)
    remat: str | None = None  # None: the shape's / config's remat policy
    attention: str | None = None  # None: the config's model.attention


def devices(opts: BenchOptions) -> tuple[list, str]:
    """(JAX devices, torch device string) for ``--device``."""
    import jax
    import torch

    if opts.device == "cpu":
        return jax.devices("cpu"), "cpu"
    cuda = torch.cuda.is_available()
    if opts.device == "gpu" and not cuda:
        raise RuntimeError("--device gpu: torch sees no CUDA device")
    return (jax.devices("gpu") if opts.device == "gpu" else jax.devices()), (
        "cuda" if cuda else "cpu"
    )


def run_bench(
    opts: BenchOptions,
    log: Callable[[str], None] = print,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The JSON document: environment, settings, analytic FLOPs and one row per contestant,
    ``complete`` True. ``progress`` gets the document so far (``complete`` False) after each
    contestant but the last, so a run killed at its time limit keeps the rows it finished."""
    if opts.what not in WHATS:
        raise ValueError(f"--what must be one of {WHATS}, got {opts.what!r}")
    jdevs, tdev = devices(opts)
    if opts.torch_threads:
        import torch

        torch.set_num_threads(int(opts.torch_threads))
    dtype = opts.dtype or ("bfloat16" if tdev.startswith("cuda") else "float32")
    batch = opts.batch or (SAMPLE_BATCH if opts.what == "sample" else None)
    shape = resolve(
        opts.shape,
        batch=batch,
        dtype=dtype,
        configs=opts.config_dir,
        remat=opts.remat,
        attention=opts.attention,
    )
    batch = batch or int(shape.config.train.batch_size)
    peak = peak_tflops(_device_name(jdevs[0], tdev), opts.peak_tflops)
    if opts.what == "train":
        flops = flops_lib.dpo_step(shape, batch)
        builders = _train_builders(shape, opts, jdevs, tdev, batch)
    else:
        flops = flops_lib.sample_batch(shape, batch, opts.sample_steps)
        tmp = tempfile.TemporaryDirectory(prefix="psa-jax-bench-")
        builders = _sample_builders(shape, opts, jdevs, tdev, batch, tmp.name, log)
    meta = dict(shape=opts.shape, what=opts.what, batch=batch, dtype=dtype)
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(opts.contestants):
        rows.append(_run_one(name, builders[name], opts, tdev, meta, flops, peak, log))
        report.add_ratios(rows)
        if progress is not None and i + 1 < len(opts.contestants):
            progress(_document(opts, shape, batch, dtype, jdevs, tdev, peak, flops, rows, False))
    if opts.what == "sample":
        tmp.cleanup()
    return _document(opts, shape, batch, dtype, jdevs, tdev, peak, flops, rows, True)


def _run_one(
    name: str,
    build: Callable[[], Contestant],
    opts: BenchOptions,
    tdev: str,
    meta: dict,
    flops: dict,
    peak: float | None,
    log: Callable[[str], None],
) -> dict:
    """Build, time and release one contestant. A failure (out of memory, a missing kernel)
    becomes a row saying so, and the other contestants still run: a GPU run is one shot."""
    log(f"[bench] {name}: building ({meta['shape']}, {meta['what']}, batch {meta['batch']}, "
        f"{meta['dtype']})")  # fmt: skip
    _reset_torch_peak(tdev)
    c = None
    try:
        c, t = time_contestant(build, opts.steps, opts.warmup)
        out = report.row(c, t, flops=flops, peak_tflops=peak, **meta)
        log(f"[bench] {name}: median {1e3 * t.median_s:.1f} ms, first call {t.first_call_s:.1f} s")
    except Exception as e:
        log(f"[bench] {name}: FAILED: {type(e).__name__}: {e}")
        out = report.failed_row(name, f"{type(e).__name__}: {str(e)[:200]}", flops, **meta)
    finally:
        if c is not None:
            c.close()
        del c
        gc.collect()
        _reset_torch_peak(tdev)
    return out


def _train_builders(
    shape: BenchShape, opts: BenchOptions, jdevs: list, tdev: str, batch: int
) -> dict[str, Callable[[], Contestant]]:
    """Lazy builders sharing one random base: psa_jax gets the Flax tree, torch a state dict
    converted from it (so every contestant computes with the same weights)."""
    from psa_jax.bench.jax_train import base_models, psa_jax_contestant

    models = base_models(shape, opts.seed)
    cache: dict[str, Any] = {}

    def state() -> dict:
        import numpy as np

        from psa_jax.models.convert import flax_to_torch

        if "state" not in cache:
            cache["state"] = flax_to_torch(models.unet_params, np.float32)
        return cache["state"]

    def torch_fair() -> Contestant:
        from psa_jax.bench.torch_train import fair_contestant

        return fair_contestant(shape, state(), batch, tdev, opts.torch_compile, opts.seed)

    def torch_psalign() -> Contestant:
        from psa_jax.bench.torch_train import psalign_contestant

        return psalign_contestant(shape, state(), batch, tdev, opts.seed)

    return {
        "psa_jax": lambda: psa_jax_contestant(shape, models, batch, jdevs),
        "torch-fair": torch_fair,
        "torch-psalign": torch_psalign,
    }


def _sample_builders(
    shape: BenchShape,
    opts: BenchOptions,
    jdevs: list,
    tdev: str,
    batch: int,
    root: str,
    log: Callable[[str], None],
) -> dict[str, Callable[[], Contestant]]:
    from psa_jax.bench import sample
    from psa_jax.bench.jax_train import base_models

    log(f"[bench] writing a random {opts.shape} pipeline folder and IP-Adapter export to {root}")
    params = base_models(shape, opts.seed).unet_params
    adapter = sample.write_folder(shape, params, root, opts.seed)
    del params
    steps = opts.sample_steps
    return {
        "psa_jax": lambda: sample.psa_jax_sampler(shape, root, adapter, batch, steps, jdevs[0]),
        "torch-psalign": lambda: sample.diffusers_sampler(
            "torch-psalign", shape, root, batch, steps, tdev, compile_unet=False
        ),
        "torch-fair": lambda: sample.diffusers_sampler(
            "torch-fair", shape, root, batch, steps, tdev, compile_unet=opts.torch_compile != "off"
        ),
    }


def _reset_torch_peak(tdev: str) -> None:
    import torch

    if tdev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _device_name(jdev: Any, tdev: str) -> str:
    import torch

    if tdev.startswith("cuda"):
        return torch.cuda.get_device_name()
    return str(getattr(jdev, "device_kind", "cpu"))


def _document(
    opts, shape, batch, dtype, jdevs, tdev, peak, flops, rows, complete
) -> dict[str, Any]:
    import jax
    import torch

    jdev = jdevs[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": opts.shape,
        "what": opts.what,
        "batch": batch,
        "dtype": dtype,
        "resolution": shape.resolution,
        "latent_side": shape.latent_side,
        "text_len": shape.text_len,
        "num_user_tokens": shape.num_user_tokens,
        "user_embed_dim": shape.user_embed_dim,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "sample_steps": opts.sample_steps if opts.what == "sample" else None,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax_device": str(jdev),
            "jax_devices": len(jdevs),  # psa_jax's mesh (a CPU split into one per core)
            "jax_device_kind": getattr(jdev, "device_kind", None),
            "torch_device": tdev,
            "device_name": _device_name(jdev, tdev),
            "torch_threads": torch.get_num_threads(),
            # glibc's malloc settings (the psa-jax program asks for huge pages): every
            # contestant in this process allocates through them.
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        },
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "peak_tflops": peak,
        "model_flops_per_step": flops["model"],
        "extra_flops_per_step": flops["extra"],
        "results": [dict(r) for r in rows],
        "complete": complete,  # False: written after a contestant, before the last finished
    }
