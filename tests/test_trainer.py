"""The trainer end to end on a small Sage-mini world: resume after SIGKILL, NaN stop,
two processes, and the staged tiny pipeline (vae -> base -> dpo).

Subprocess runs share a JAX compilation cache, so the tiny DPO step compiles once per test
session instead of once per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import faults
import jax
import numpy as np
import pytest
from helpers import SMALL_WORLD

from configs import tiny
from psa_jax.config import apply_overrides
from psa_jax.core.checkpoint import Checkpointer, restore_host_params
from psa_jax.data import prepare
from psa_jax.models import loading
from psa_jax.models.psa_unet import PSAUNet
from psa_jax.models.unet import UNetConfig
from psa_jax.train import tasks, trainer
from psa_jax.train.metrics_io import last_per_step, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("psa_cache"))


def small_config(cache: str, *extra: str):
    return apply_overrides(tiny.get_config(), [*SMALL_WORLD, f"data.cache_dir={cache}", *extra])


def _env(cache: str) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def train_cmd(cache: str, workdir: str, *args: str, fault: str = "") -> list[str]:
    """``psa-jax train`` on the tiny config and the small world, as a subprocess command;
    ``fault`` (``kill_at=N``) runs it through tests/scripts/train_with_fault.py."""
    config = os.path.join(ROOT, "configs", "tiny.py")
    overrides = [f"--config.{o}" for o in (*SMALL_WORLD, f"data.cache_dir={cache}")]
    launcher = ["-m", "psa_jax.cli"]
    if fault:
        launcher = [os.path.join(ROOT, "tests", "scripts", "train_with_fault.py"), fault]
    base = [sys.executable, *launcher, "train", "--config", config]
    return [*base, "--workdir", workdir, *overrides, *args]


def run_cli(cache: str, workdir: str, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(cache, workdir, *args, fault=fault),
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=900,
    )


def losses(workdir: str) -> dict[int, float]:
    return {s: r["loss"] for s, r in last_per_step(read_metrics(workdir)).items() if "loss" in r}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(cache, tmp_path):
    n = 4
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    common = ("--steps", str(2 * n), "--checkpoint-every", str(n))
    proc = run_cli(cache, straight, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(cache, killed, *common, fault=f"kill_at={n + 3}")
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    assert Checkpointer(killed, read_only=True).latest_step() == n
    # Step n+1 ran and was logged (metrics are read one step late: n+2's were not), then the
    # kill as step n+3 began; the resumed run logs n+1 again.
    assert max(losses(killed)) == n + 1
    proc = run_cli(cache, killed, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = losses(straight), losses(killed)
    assert sorted(got) == list(range(1, 2 * n + 1))
    assert [got[s] for s in range(n, 2 * n + 1)] == [want[s] for s in range(n, 2 * n + 1)]
    a, cfg_a = restore_host_params(straight)
    b, _ = restore_host_params(killed)
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert cfg_a["task"] == "dpo" and cfg_a["train"]["steps"] == 2 * n
    with open(os.path.join(killed, "summary.json")) as f:
        assert json.load(f)["start_step"] == n


def test_nan_stops_with_a_named_error_and_keeps_the_checkpoint(cache, tmp_path):
    config = small_config(cache, "train.steps=4", "train.checkpoint_every=2")
    with pytest.raises(trainer.NonFiniteError, match="step 3: loss nan"):
        trainer.train(config, tmp_path, batch_hook=faults.nan_at(3))
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [2]
    params, _ = restore_host_params(tmp_path)
    assert all(np.isfinite(x).all() for x in leaves(params))
    assert max(losses(str(tmp_path))) == 2  # the poisoned step was never logged as trained
    # The public API loads the adapter straight from the run folder.
    unet = PSAUNet(UNetConfig.from_diffusers_config(dict(config.model.unet)), params={})
    unet.load_adapter(tmp_path)
    tokens = config.model.adapter.num_user_tokens
    assert (unet.user_embed_dim, unet.num_user_tokens) == (384, tokens)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(unet.adapter), leaves(params)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_the_checkpoint_restores_in_one(cache, tmp_path):
    config = small_config(cache)
    models = loading.load_base_models(config)
    splits = prepare.prepare_data(config, models)  # built once here; the two processes reuse it
    workdir = str(tmp_path / "run")
    port = _free_port()
    procs = []
    for i in range(2):
        dist = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
        cmd = train_cmd(
            cache, workdir, "--steps", "3", "--checkpoint-every", "3", *dist, "--process-id", str(i)
        )
        procs.append(
            subprocess.Popen(
                cmd, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    out = outs[0][0]
    summary = json.loads(out[out.index('{\n  "workdir"') :])
    assert summary["step"] == 3 and summary["checkpoints"] == [3]
    params, cfg = restore_host_params(workdir)  # this (pytest) process: one host, one device
    assert cfg["task"] == "dpo"
    assert all(np.isfinite(x).all() for x in leaves(params))
    embeds = np.stack(list(splits.embeddings.values()))
    fresh = tasks.build_task(config, models, embeds).trainable
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(params), leaves(fresh)))


def test_standardized_projection_starts_from_the_training_users(cache):
    config = small_config(cache)
    assert config.model.adapter.proj_init == "standardized"
    models = loading.load_base_models(config)
    splits = prepare.prepare_data(config, models)
    caches = prepare.open_caches(config, models, splits, "train")
    loader = prepare.make_loader(config, splits, "train", caches, 4, seed=0)
    embeds = tasks.training_user_embeds(config, splits, loader)
    toy = config.data.toy
    assert embeds.shape == (toy.num_users, 384)  # seen users only, not the unseen ones
    assert len(splits.embeddings) == toy.num_users + toy.num_unseen_users
    proj = tasks.build_task(config, models, embeds).trainable["user_proj"]
    tokens = embeds @ proj["kernel"] + proj["bias"]
    assert tokens.std(0).mean() > 0.5  # users differ by O(1) at step 0
    with pytest.raises(ValueError, match="needs the training users' embeddings"):
        tasks.build_task(config, models)
    # Resuming: the checkpoint replaces the init, so no embeddings are needed; same tree.
    resumed = tasks.build_task(config, models, resuming=True).trainable
    assert jax.tree.structure(resumed) == jax.tree.structure(
        tasks.build_task(config, models, embeds).trainable
    )
    plain = apply_overrides(config, ["model.adapter.proj_init=torch", "train.user_proj_space=raw"])
    assert tasks.training_user_embeds(plain, splits, loader) is None
    # An optimizer in the users' coordinates reads them however the projection starts, and on
    # resume too (the tiny config's train.user_proj_space="standardized").
    steps_in_z = apply_overrides(config, ["train.user_proj_space=standardized"])  # torch init
    again = tasks.training_user_embeds(steps_in_z, splits, loader, resuming=True)
    np.testing.assert_array_equal(again, embeds)
    torch_proj = tasks.build_task(plain, models).trainable["user_proj"]
    assert (embeds @ torch_proj["kernel"]).std(0).mean() < 0.1
    with pytest.raises(ValueError, match="proj_init 'pca' unknown"):
        tasks.build_task(apply_overrides(config, ["model.adapter.proj_init=pca"]), models)


@pytest.mark.slow
def test_vae_then_base_then_dpo_stages_chain(cache, tmp_path):
    """configs/tiny.py stages: the vae run exports a diffusers VAE with a measured scaling
    factor, the base run trains on its latents, and DPO starts from both."""
    from psa_jax.models.vae import load_vae

    vae_dir, base_dir, dpo_dir = (str(tmp_path / n) for n in ("vae", "base", "dpo"))
    short = ("train.steps=3", "train.checkpoint_every=3")
    vae_cfg = apply_overrides(
        tiny.get_config("vae"), [*SMALL_WORLD, f"data.cache_dir={cache}", *short]
    )
    summary = trainer.train(vae_cfg, vae_dir)
    vae = load_vae(vae_dir)  # <workdir>/vae, as model.vae_path reads it
    assert vae.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    assert summary["vae"]["images"] > 0 and summary["metrics"]["recon_mse"] > 0
    trained, _ = restore_host_params(vae_dir)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(trained), leaves(vae.params)))

    base_cfg = apply_overrides(
        tiny.get_config("base"),
        [*SMALL_WORLD, f"data.cache_dir={cache}", *short, f"model.vae_path={vae_dir}"],
    )
    assert base_cfg.task == "denoise" and base_cfg.train.image_key == "both"
    models = loading.load_base_models(base_cfg)
    assert models.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    base = trainer.train(base_cfg, base_dir)
    assert np.isfinite(base["metrics"]["mse"])

    dpo_cfg = small_config(
        cache,
        *short,
        f"model.vae_path={vae_dir}",
        f"model.base_workdir={base_dir}",
        "model.pretrained=",  # the base run instead of the shipped base
    )
    trainer.train(dpo_cfg, dpo_dir)
    frozen = loading.load_base_models(dpo_cfg).unet_params
    base_params, _ = restore_host_params(base_dir)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(frozen), leaves(base_params)))


def test_a_set_up_error_closes_the_checkpointer(cache, tmp_path, monkeypatch):
    """An error between opening the checkpoint manager and the first step still closes it."""
    closed = []

    class Spy(Checkpointer):
        def close(self):
            closed.append(True)
            super().close()

    def broken(*args, **kwargs):
        raise ValueError("broken set-up")

    monkeypatch.setattr(trainer, "Checkpointer", Spy)
    monkeypatch.setattr(trainer, "build_task", broken)
    with pytest.raises(ValueError, match="broken set-up"):
        trainer.train(small_config(cache, "train.steps=2"), str(tmp_path / "run"))
    assert closed == [True]


@pytest.mark.slow
def test_standardized_user_proj_space_trains_and_resumes_exactly(cache, tmp_path):
    """``train.user_proj_space=standardized``: the optimizer's coordinates come from the
    training users on resume too, so a killed and resumed run ends bit-identical to a straight
    one; the saved projection is still an ordinary Linear that the trained run differs in."""
    n, space = 3, "--config.train.user_proj_space=standardized"
    straight, killed, raw = (str(tmp_path / k) for k in ("straight", "killed", "raw"))
    common = ("--steps", str(2 * n), "--checkpoint-every", str(n))
    runs = ((straight, space, ""), (killed, space, f"kill_at={n + 3}"), (killed, space, ""),
            (raw, "--config.train.user_proj_space=raw", ""))  # fmt: skip
    for workdir, extra, fault in runs:
        proc = run_cli(cache, workdir, *common, extra, fault=fault)
        assert proc.returncode == (-9 if fault else 0), proc.stderr[-3000:]
    a, cfg = restore_host_params(straight)
    b, _ = restore_host_params(killed)
    c, _ = restore_host_params(raw)
    assert cfg["train"]["user_proj_space"] == "standardized"
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert {"kernel", "bias"} <= set(a["user_proj"])
    assert not np.allclose(a["user_proj"]["kernel"], c["user_proj"]["kernel"])
    assert [losses(straight)[s] for s in range(n, 2 * n + 1)] == [
        losses(killed)[s] for s in range(n, 2 * n + 1)
    ]
