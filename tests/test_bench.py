"""``psa-jax bench``: it runs and reports every field, its FLOP counts are right, and its
contestants compute the same loss. Nothing here times anything: speed is the benchmark's job
(BENCHMARKS.md), never a unit test's."""

from __future__ import annotations

import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from psa_jax import cli
from psa_jax.bench import SHAPE_NAMES, flops, measure
from psa_jax.bench.jax_train import base_models, synthetic_batch
from psa_jax.bench.report import SAMPLE_FIELDS, TRAIN_FIELDS
from psa_jax.bench.shapes import SHAPES, random_params, resolve

CONTESTANTS = {"psa_jax", "torch-psalign", "torch-fair"}


def _run_cli(tmp_path, capsys, *args):
    out = tmp_path / "bench.json"
    argv = ["bench", "--steps", "2", "--warmup", "0", "--torch-compile", "off", *args]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    return json.loads(out.read_text()), printed


def _check_rows(doc, printed, fields, unit):
    rows = doc["results"]
    assert {r["contestant"] for r in rows} == CONTESTANTS
    for r in rows:
        assert set(fields) <= set(r), set(fields) - set(r)
        assert r[unit] > 0 and r["steps"] == 2 and r["median_step_ms"] > 0
        assert r["first_call_s"] > 0 and r["model_flops_per_step"] > 0
        assert re.fullmatch(r"\d+\.\d\dx", r["psa_jax_ratio"]), r["psa_jax_ratio"]
        assert r["peak_memory_bytes"] is not None or r["rss_peak_delta_bytes"] is not None
        assert r["rss_peak_method"] in ("VmHWM", "sampled every 5 ms")
        assert r["mfu"] is None  # a CPU without --peak-tflops
        assert f"| {r['contestant']} |" in printed
    ours = next(r for r in rows if r["contestant"] == "psa_jax")
    assert ours["psa_jax_ratio"] == "1.00x"
    return rows


@pytest.mark.slow
def test_bench_train_tiny_reports_every_field(tmp_path, capsys):
    doc, printed = _run_cli(tmp_path, capsys, "--shape", "tiny", "--what", "train")
    rows = _check_rows(doc, printed, TRAIN_FIELDS, "pairs_per_s")
    for r in rows:
        assert math.isfinite(r["loss"])
    ours = next(r for r in rows if r["contestant"] == "psa_jax")
    assert ours["compile_s"] > 0 and ours["xla_flops_per_step"] > 0
    assert ours["peak_memory_source"].startswith("compiled memory_analysis")
    psalign = next(r for r in rows if r["contestant"] == "torch-psalign")
    assert psalign["extra_flops_per_step"] > 0  # its VAE and text encoding every step
    assert "| contestant |" in printed and "pairs/s" in printed


@pytest.mark.slow
def test_bench_sample_tiny_reports_every_field(tmp_path, capsys):
    doc, printed = _run_cli(tmp_path, capsys, "--shape", "tiny", "--what", "sample",
                            "--sample-steps", "3", "--batch", "2")  # fmt: skip
    _check_rows(doc, printed, SAMPLE_FIELDS, "images_per_s")
    assert doc["sample_steps"] == 3 and "images/s" in printed


@pytest.mark.slow
def test_bench_train_runs_the_sdxl_code_paths(tmp_path, capsys):
    """tiny-xl: text_time conditions, two text encoders, Adafactor, in every contestant."""
    doc, printed = _run_cli(tmp_path, capsys, "--shape", "tiny-xl", "--what", "train")
    rows = _check_rows(doc, printed, TRAIN_FIELDS, "pairs_per_s")
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_bench_json_is_written_after_each_contestant(tmp_path, monkeypatch, capsys):
    """With --json the file holds the finished contestants (``complete`` False) while the next
    one runs, so a GPU row killed at the device call's limit keeps them; the end rewrites it
    whole (``complete`` True). Contestants are stubbed: this checks the writing, not timing."""
    from psa_jax.bench import report, run

    out = tmp_path / "rows" / "bench.json"
    seen = []

    def stub(name, build, opts, tdev, meta, flops, peak, log):
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        row = report.failed_row(name, "stub", flops, **meta)
        row["pairs_per_s"] = {"psa_jax": 3.0, "torch-psalign": 1.5, "torch-fair": 2.0}[name]
        return row

    monkeypatch.setattr(run, "_run_one", stub)
    argv = ["bench", "--shape", "tiny", "--what", "train", "--json", str(out), "--contestants",
            "psa_jax", "torch-psalign", "torch-fair"]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen[0] is None  # nothing before the first contestant finished
    assert [[r["contestant"] for r in d["results"]] for d in seen[1:]] == [
        ["psa_jax"], ["psa_jax", "torch-psalign"]]  # fmt: skip
    assert [d["complete"] for d in seen[1:]] == [False, False]
    assert seen[2]["results"][1]["psa_jax_ratio"] == "2.00x"
    final = json.loads(out.read_text())
    assert final["complete"] is True and len(final["results"]) == 3
    assert final["results"][2]["psa_jax_ratio"] == "1.50x"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]  # no temporary left
    assert "| torch-fair |" in capsys.readouterr().out


def test_every_shape_resolves():
    assert set(SHAPE_NAMES) == set(SHAPES)
    for name in SHAPE_NAMES:
        shape = resolve(name)
        assert shape.unet.cross_attention_dim == shape.text_dim
        assert shape.config.train.dpo_chosen_weight == 0.0
    sd = resolve("sd15-256")
    assert (sd.latent_side, sd.text_len, sd.config.train.batch_size) == (32, 77, 1)
    assert resolve("sdxl").sdxl and resolve("sdxl").latent_side == 128


def test_analytic_flops_of_sd15():
    """SD1.5 at 512 px: UNet forward ~803 GFLOP, VAE encoder ~1,117 GFLOP per image."""
    shape = resolve("sd15")
    unet = flops.unet_forward(shape.unet, 64, 77).flops / 1e9
    vae = flops.vae_encode(shape.vae, 512).flops / 1e9
    assert unet == pytest.approx(803, rel=0.05)
    assert vae == pytest.approx(1117, rel=0.05)
    # The DPO step: policy forward + input-gradient backward + reference forward, two images.
    step = flops.dpo_step(shape, batch=1)["model"] / 1e9
    assert 5 * unet < step < 7 * unet


def test_analytic_flops_agree_with_xla_on_the_tiny_unet():
    """The counter walks the same network XLA compiles. XLA also counts norms and elementwise
    work, but counts a convolution's taps only where they fall inside the image (16x16 and 8x8
    latents: 8% and 16% fewer than k^2 per pixel), so it may land a little either side."""
    shape = resolve("tiny")
    models = base_models(shape)
    s, c, n = shape.latent_side, shape.latent_channels, 2
    args = (
        jnp.zeros((n, s, s, c)),
        jnp.zeros((n,)),
        jnp.zeros((n, shape.text_len, shape.text_dim)),
    )
    fwd = jax.jit(lambda p, *a: models.module.apply({"params": p}, *a))
    cost = fwd.lower(models.unet_params, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = n * flops.unet_forward(shape.unet, s, shape.text_len).flops
    assert 0.85 * analytic <= cost["flops"] <= 1.25 * analytic, (analytic, cost["flops"])


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_torch_fair_and_psa_jax_compute_the_same_dpo_loss(name):
    """Same random base and adapter, same latents, noise and timesteps (drawn as psa_jax's
    DPOTask draws them): torch-fair's loss equals psa_jax's, fp32.

    The UNet outputs agree to ~1e-6 relative; the loss multiplies their MSE differences by
    beta/2, so beta is the tiny config's 1000 for both shapes (SDXL's 5000 would turn the same
    1e-6 into ~2e-4 of the loss)."""
    from flax.core import meta

    from psa_jax.bench.torch_models import PSAAdapter, torch_unet
    from psa_jax.bench.torch_train import _alphas_cumprod, fair_loss
    from psa_jax.core.parallel import interleave_rows, split_rows
    from psa_jax.models.adapter_io import export_adapter
    from psa_jax.models.convert import flax_to_torch
    from psa_jax.models.psa_unet import abstract_variables
    from psa_jax.train.step import DPOTask, _noised, clean_latents

    shape = resolve(name, batch=2)
    models = base_models(shape, seed=1)
    adapter = random_params(meta.unbox(abstract_variables(models.module)["adapter"]), seed=2)
    beta = 1000.0
    task = DPOTask(models.module, models.schedule, beta, shape.scaling_factor)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(shape, 2, seed=3).items()}
    rng = jax.random.PRNGKey(4)
    want, _ = jax.jit(task.loss)(adapter, models.unet_params, batch, rng)

    r_w, r_l, r_noise = jax.random.split(rng, 3)
    lat_w = clean_latents(batch, "chosen", r_w, shape.scaling_factor)
    lat_l = clean_latents(batch, "rejected", r_l, shape.scaling_factor)
    pairs = interleave_rows(lat_w, lat_l)  # as DPOTask: a pair's two images side by side
    _, t, target = _noised(models.schedule, pairs, r_noise, 2)
    (target_w, _), (t_w, _) = split_rows(target, 2), split_rows(t, 2)
    nchw = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())  # noqa: E731
    unet = torch_unet(shape.unet, flax_to_torch(models.unet_params, np.float32))
    ta = PSAAdapter(unet, shape.user_embed_dim, shape.num_user_tokens, concat=False)
    ta.load_state_dict(
        {k: torch.from_numpy(v) for k, v in export_adapter(adapter, "psalign").items()}
    )
    ta.attach(unet)
    tb = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
    added = None
    if shape.sdxl:
        added = {k: torch.cat([tb[v]] * 2) for k, v in (("text_embeds", "text_pooled"),
                                                       ("time_ids", "time_ids"))}  # fmt: skip
    got = fair_loss(unet, ta, nchw(lat_w), nchw(lat_l), nchw(target_w),
                    torch.from_numpy(np.array(t_w)).long(), tb["text_states"],
                    tb["user_embeds"], beta, _alphas_cumprod(shape), added)  # fmt: skip
    assert abs(float(want) - math.log(2)) > 1e-3  # the adapter really moves the policy
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-4)


def test_torch_fair_falls_back_to_eager_and_says_why(monkeypatch):
    """A torch.compile that fails at the first call leaves an eager step and a named reason."""
    from psa_jax.bench.torch_train import fair_contestant
    from psa_jax.models.convert import flax_to_torch

    def broken(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no inductor here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    shape = resolve("tiny", batch=1)
    state = flax_to_torch(base_models(shape).unet_params, np.float32)
    c = fair_contestant(shape, state, 1, "cpu", "on")
    c.sync(c.first())
    c.sync(c.step())
    assert c.info["notes"]().startswith("eager (torch.compile failed: RuntimeError: no inductor")
    assert math.isfinite(c.loss())


def test_a_contestant_that_fails_is_a_row_saying_why():
    """One failing contestant (say, out of GPU memory) must not lose the others' rows."""
    from psa_jax.bench import report
    from psa_jax.bench.run import BenchOptions, _run_one

    def build():
        raise MemoryError("out of memory")

    meta = dict(shape="tiny", what="train", batch=2, dtype="float32")
    row = _run_one("torch-psalign", build, BenchOptions(), "cpu", meta, {"model": 1.0}, None,
                   lambda _: None)  # fmt: skip
    assert set(TRAIN_FIELDS) <= set(row) and row["notes"].startswith("FAILED: MemoryError")
    ok = dict(row, contestant="psa_jax", pairs_per_s=2.0, steps_per_s=1.0)
    rows = [ok, row]
    report.add_ratios(rows)
    assert row["psa_jax_ratio"] is None
    assert "| torch-psalign | tiny | train | 2 | float32 | failed |" in report.table([row])


@pytest.mark.parametrize("kernel_mark", [True, False])
def test_peak_rss_sees_a_freed_allocation(monkeypatch, kernel_mark):
    """The peak counts memory held only briefly inside the block, and not a larger peak from
    before it, whether it comes from the kernel's high-water mark (reset at entry) or (where
    that cannot be reset) from the sampling thread."""
    if measure._rss_bytes() is None:  # no /proc: no figure, rather than a wrong one
        with measure.PeakRss() as rss:
            pass
        assert rss.peak_delta is None and rss.method is None
        return
    if not kernel_mark:
        monkeypatch.setattr(measure, "_reset_hwm", lambda: False)
    size = 64 << 20
    earlier = np.ones(4 * size, np.uint8)  # a higher peak before the block
    del earlier
    with measure.PeakRss() as rss:
        block = np.ones(size, np.uint8)  # touched: resident
        time.sleep(0.05)  # long enough for the sampler's 5 ms period
        del block
    assert rss.method == ("VmHWM" if kernel_mark else "sampled every 5 ms")
    assert 0.9 * size <= rss.peak_delta < 2 * size


def test_xla_flops_count_every_device_of_an_spmd_step():
    """A partitioned program's cost analysis is one device's share (the tiny step on 2 CPU
    devices: 5.2 of 10.4 GFLOP); the row reports the whole step."""

    class Compiled:
        def cost_analysis(self):
            return [{"flops": 5.0e9}]

    assert measure.xla_flops(Compiled()) == 5.0e9
    assert measure.xla_flops(Compiled(), devices=2) == 1.0e10
