"""``psa-jax bench``: psa_jax against PSAlign-equivalent PyTorch, one table row per contestant.

    psa-jax bench --shape {tiny,sd15-256,sd15,sdxl,tiny-xl} --what {train,sample} [--steps N]
                  [--batch N] [--dtype D] [--device auto|cpu|gpu] [--peak-tflops T]
                  [--torch-compile auto|on|off] [--torch-threads N] [--remat P]
                  [--attention xla|cudnn|auto] [--json PATH]

Contestants (``psa_jax``, ``torch-psalign``, ``torch-fair``) run in this one process, on the same
random weights, shapes, batch and dtype; see :mod:`psa_jax.bench`. Speed is measured here and
recorded in BENCHMARKS.md, never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def cpu_split(args: argparse.Namespace) -> int:
    """The bench's CPU split (:func:`psa_jax.cli.cpu_devices`' default): one JAX device per
    core, as many as divide the step's pairs (train) or images (sample), so psa_jax uses a
    CPU's cores as ``PSA_JAX_CPU_DEVICES=N psa-jax train`` does and torch does by its threads.
    Batch 1 (sd15-256) stays on one device. Accelerator devices are unaffected."""
    from psa_jax.bench.shapes import SAMPLE_BATCH, resolve
    from psa_jax.cli import per_core_devices

    batch = args.batch or (SAMPLE_BATCH if args.what == "sample" else None)
    if batch is None:
        batch = int(resolve(args.shape, configs=args.config_dir).config.train.batch_size)
    return per_core_devices(batch)


def _bench_cmd(args: argparse.Namespace) -> int:
    # JAX must not take most of a GPU's memory before the torch contestants run.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from psa_jax.bench.report import table
    from psa_jax.bench.run import BenchOptions, run_bench

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    diffusers_logging.disable_progress_bar()  # per-load bars would bury the table
    transformers_logging.disable_progress_bar()

    opts = BenchOptions(
        shape=args.shape,
        what=args.what,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        dtype=args.dtype,
        device=args.device,
        peak_tflops=args.peak_tflops,
        torch_compile=args.torch_compile,
        sample_steps=args.sample_steps,
        contestants=tuple(args.contestants),
        torch_threads=args.torch_threads,
        remat=args.remat,
        attention=args.attention,
        seed=args.seed,
        config_dir=args.config_dir,
    )

    def write(doc: dict[str, Any]) -> None:
        """The JSON file, replaced whole (a reader never sees half of it)."""
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.replace(path + ".tmp", path)

    # With --json the file is written after each contestant too: a GPU row cut off at the
    # device call's limit (a slow torch.compile, say) keeps the contestants it finished.
    doc = run_bench(opts, progress=write if args.json else None)
    m = doc["machine"]
    print(
        f"\npsa-jax bench --shape {doc['shape']} --what {doc['what']}: batch {doc['batch']}, "
        f"{doc['dtype']}, {m['device_name']} ({m['cpu_count']} CPUs, {m['jax_devices']} JAX "
        f"device{'s' * (m['jax_devices'] != 1)}), peak "
        f"{doc['peak_tflops'] or 'n/a'} TFLOP/s, median of {doc['steps']} steps, "
        f"torch threads {m['torch_threads']}, GLIBC_TUNABLES {m['glibc_tunables'] or 'unset'}"
    )
    print(table(doc["results"]))
    if args.json:
        write(doc)
    return 0


def register(subparsers: Any) -> None:
    from psa_jax.bench import CONTESTANTS, SHAPE_NAMES, WHATS

    p = subparsers.add_parser(
        "bench",
        help="time psa_jax against PyTorch (PSAlign's loop, a careful version)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--shape", default="tiny", choices=SHAPE_NAMES)
    p.add_argument("--what", default="train", choices=WHATS)
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    p.add_argument("--batch", type=int, help="pairs (train) or images (sample, default 8)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="default: bfloat16 on a GPU, float32 on a CPU",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak FLOP/s for MFU (default: a table of known GPUs; CPU: n/a)",
    )
    p.add_argument(
        "--torch-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile for torch-fair (auto = on, eager if it fails)",
    )
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (--what sample)")
    p.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=CONTESTANTS)
    p.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads (default: torch's); on a shared CPU 1 avoids OpenMP "
        "threads waiting on each other",
    )
    p.add_argument(
        "--remat",
        choices=("none", "full", "dots", "dots_no_batch"),
        help="psa_jax's remat policy (torch-fair checkpoints when not none); default: the "
        "config's, full for sdxl",
    )
    p.add_argument(
        "--attention",
        choices=("xla", "cudnn", "auto"),
        help="psa_jax's attention (model.attention): cudnn = cuDNN flash attention; auto = "
        "cuDNN where it applies (CUDA, bf16/fp16, heads <= 128 wide); default: the config's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config-dir", help="the configs/ folder (default: ./configs)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.set_defaults(func=_bench_cmd, cpu_devices=cpu_split)
