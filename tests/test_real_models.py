"""Real model layouts end to end (issue 19): SD1.5- and SDXL-like tiny random twins saved as
diffusers pipeline folders, a Sage-format folder and PSAlign ``.npy`` profile embeddings.

``psa-jax train --config configs/{sd15,sdxl}.py`` runs 2 DPO steps on them (the folder's UNet
architecture replaces ``model.unet``); then ``psa-jax sample --workdir`` and ``psa-jax export``
(psalign, diffusers-ip-adapter) work on the run, and for SDXL the exported IP-Adapter in
diffusers' ``StableDiffusionXLPipeline`` draws the run's images. The DPO step's loss equals a
PyTorch reference step: diffusers' UNet with PSA attention processors as the policy, the frozen
base as the reference model, the same noise, timesteps and batch.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import (
    SD15_LIKE,
    SDXL_LIKE,
    load_ip_adapter_export,
    psa_reference_processor,
    psa_reference_projection,
    randomize_adapter,
    rel_err,
    tiny_sd_folder,
    tiny_sdxl_folder,
)
from test_sage_data import NUM, USERS, _line, make_sage

import psa_jax
from psa_jax import cli
from psa_jax.core import diffusion as noise_lib
from psa_jax.core.checkpoint import restore_host_params
from psa_jax.core.parallel import interleave_rows, split_rows
from psa_jax.data.cache import load_caches
from psa_jax.data.profiles import packaged_users_csv
from psa_jax.sample.pipeline import Pipeline
from psa_jax.sample.sampler import initial_latents
from psa_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("sd15", "sdxl")
D = 12  # profile embedding size
LATENT = 8  # latent side: 16x16 images (the twins' VAE upsamples once)
RES = 2 * LATENT
MAX_LEN = 16
PROMPTS = ["a red cat on a mat", "a blue dog in the park"]
CAPTIONS = [_line(i)["caption"] for i in range(NUM)]
SEEDS = [3, 17]
STEPS, GUIDANCE = 4, 5.0
IMAGE_TOL = 2e-3  # max abs on [0, 1] images
LOSS_TOL = 1e-4  # relative
SCALE = 0.1  # adapter noise of the DPO reference test
UNETS = {
    "sd15": {**SD15_LIKE, "sample_size": LATENT, "layers_per_block": 1},
    "sdxl": {
        **SDXL_LIKE,
        "sample_size": LATENT,
        "layers_per_block": 1,
        "transformer_layers_per_block": 1,
    },
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The Sage folder (12 pairs of 16x20 images, 3 users), its users.csv (with User_ID) and
    one ``<id>.npy`` per user, as PSAlign ships them."""
    root = tmp_path_factory.mktemp("inputs")
    sage = make_sage(str(root / "sage"))
    lines = open(packaged_users_csv(), encoding="utf-8").read().splitlines()
    rows = [f"{lines[int(u)]},{u}" for u in USERS]  # row i of PSAlign's file is user i
    users = root / "users.csv"
    users.write_text("\n".join([lines[0] + ",User_ID", *rows]) + "\n", encoding="utf-8")
    npy = root / "npy"
    npy.mkdir()
    rng = np.random.default_rng(0)
    for u in USERS:
        np.save(npy / f"{u}.npy", rng.standard_normal(D).astype(np.float32))
    return {"sage": sage, "users": str(users), "npy": str(npy), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Tiny random diffusers pipeline folders: StableDiffusionPipeline and ...XLPipeline."""
    words = [*PROMPTS, *CAPTIONS]
    root = tmp_path_factory.mktemp("pipes")
    return {
        "sd15": tiny_sd_folder(root / "sd15", UNETS["sd15"], words, MAX_LEN),
        "sdxl": tiny_sdxl_folder(root / "sdxl", UNETS["sdxl"], words, MAX_LEN),
    }


def _train_argv(kind: str, folder, inputs: dict, workdir: str) -> list[str]:
    overrides = {
        "model.pretrained": folder,
        "model.dtype": "float32",
        "model.adapter.user_embed_dim": D,
        "data.source": inputs["sage"],
        "data.embeddings": f"npy:{inputs['npy']}",
        "data.users_csv": inputs["users"],
        "data.resolution": RES,
        "data.cache_dir": inputs["cache"],
        "data.num_threads": 1,
        "train.batch_size": 2,
        "train.accum_steps": 1,
        "train.progress": False,
        "train.async_checkpoint": False,
        # Large steps, so the adapter's user branch visibly acts after 2 steps.
        "optim.learning_rate": 0.05,
        "optim.warmup_steps": 0,
    }
    args = ["train", "--config", os.path.join(ROOT, "configs", f"{kind}.py")]
    args += ["--workdir", workdir, "--steps", "2", "--checkpoint-every", "2"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def runs(folders, inputs, tmp_path_factory):
    """``runs(kind)``: the workdir of a 2-step ``psa-jax train`` run on that twin (made once)."""
    made = {}

    def get(kind: str) -> str:
        if kind not in made:
            workdir = str(tmp_path_factory.mktemp(f"run-{kind}"))
            assert cli.main(_train_argv(kind, folders[kind], inputs, workdir)) == 0
            made[kind] = workdir
        return made[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_train_then_sample_and_export(kind, runs, folders, tmp_path, capsys):
    workdir = runs(kind)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
    adapter, config = restore_host_params(workdir)
    assert config["model"]["pretrained"] == str(folders[kind])
    assert np.abs(np.asarray(adapter["user_proj"]["kernel"])).max() > 0

    out = str(tmp_path / "samples")
    argv = ["sample", "--workdir", workdir, "--out", out, "--steps", "2"]
    argv += ["--users", f"base,{USERS[0]}", "--prompt", PROMPTS[0]]
    assert cli.main(argv) == 0
    pngs = sorted(glob.glob(os.path.join(out, "images", "*", "*.png")))
    assert len(pngs) == 2

    psalign, ip = str(tmp_path / "psa.safetensors"), str(tmp_path / "ip")
    for fmt, dest in (("psalign", psalign), ("diffusers-ip-adapter", ip)):
        assert cli.main(["export", "--workdir", workdir, "--format", fmt, "--out", dest]) == 0
    assert os.listdir(ip) == ["ip_adapter.safetensors"]
    unet = psa_jax.load_unet(folders[kind])
    unet.load_adapter(psalign)
    flat = jax.tree.leaves(jax.tree.map(np.asarray, adapter))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(unet.adapter), flat))
    capsys.readouterr()


def _cache_folder(inputs: dict) -> str:
    """The train-split cache of the SDXL run (the one with a second text encoder)."""
    pattern = os.path.join(inputs["cache"], "**", "caches", "train", "*", "manifest.json")
    found = []
    for path in glob.glob(pattern, recursive=True):
        with open(path) as f:
            if json.load(f)["text_encoder_2"] is not None:
                found.append(os.path.dirname(path))
    assert len(found) == 1, found
    return found[0]


def test_sdxl_run_trains_on_the_texts_its_pipeline_samples_with(runs, inputs):
    pipeline = Pipeline.from_run(runs("sdxl"))
    tables = load_caches(_cache_folder(inputs))
    assert pipeline.text_encoder_2 is not None and pipeline.force_zeros_for_empty_prompt
    states, pooled = pipeline.encode_prompts(list(tables.captions[1:]))
    assert rel_err(tables.text_states[1:], states) <= 1e-6
    assert rel_err(tables.text_pooled[1:], pooled) <= 1e-6
    # Caption dropout's row: the sampler's unconditional branch (force_zeros_for_empty_prompt).
    neg_states, neg_pooled = pipeline.encode_negative("")
    np.testing.assert_array_equal(tables.text_states[0], neg_states[0])
    np.testing.assert_array_equal(tables.text_pooled[0], neg_pooled[0])
    np.testing.assert_array_equal(tables.time_ids, pipeline.time_ids(1)[0])  # (16, 16, 0, 0, ..)


def _diffusers_sdxl_images(folder, ip_dir, profiles) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, local_files_only=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    load_ip_adapter_export(pipe, ip_dir)
    pipe.set_ip_adapter_scale(1.0)
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(SEEDS, np.uint32)))
    latents = np.asarray(initial_latents(keys, (LATENT, LATENT, 4)))
    images = []
    for i, prompt in enumerate(PROMPTS):
        user = torch.from_numpy(profiles[i : i + 1])[:, None, :]  # [1, 1, D]
        with torch.no_grad():
            out = pipe(
                prompt,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                latents=torch.from_numpy(latents[i : i + 1].transpose(0, 3, 1, 2).copy()),
                output_type="np",
                ip_adapter_image_embeds=[torch.cat([torch.zeros_like(user), user])],
            )
        images.append(np.asarray(out.images, np.float32))
    return np.concatenate(images)


def test_sdxl_ip_adapter_export_draws_the_runs_images_in_diffusers(runs, folders, tmp_path):
    workdir = runs("sdxl")
    ip = str(tmp_path / "ip")
    assert cli.main(["export", "--workdir", workdir, "--format", "diffusers-ip-adapter",
                     "--out", ip]) == 0  # fmt: skip
    pipeline = Pipeline.from_run(workdir)
    profiles = np.stack([pipeline.embeddings[u] for u in USERS[:2]])

    def ours(users):
        return pipeline(PROMPTS, users, SEEDS, scheduler="ddim", steps=STEPS,
                        guidance_scale=GUIDANCE, batch_size=2, output="float")  # fmt: skip

    got = ours(profiles)
    want = _diffusers_sdxl_images(folders["sdxl"], ip, profiles)
    diff = float(np.max(np.abs(got - want)))
    print(f"SDXL run's IP-Adapter export vs psa_jax: max abs {diff:.3g}")
    assert got.shape == want.shape == (2, RES, RES, 3) and diff <= IMAGE_TOL
    acts = float(np.max(np.abs(ours(None) - want)))  # the trained adapter really acts
    print(f"base vs adapter: max abs {acts:.3g}")
    assert acts > 10 * IMAGE_TOL


# -- the DPO step against a PyTorch reference ----------------------------------------------------


def _batch(kind: str, b: int = 4) -> dict:
    rng = np.random.default_rng(1)
    cfg = UNETS[kind]
    moments = lambda: np.concatenate([  # noqa: E731
        rng.standard_normal((b, LATENT, LATENT, 4)), rng.uniform(-4, -2, (b, LATENT, LATENT, 4))
    ], axis=-1).astype(np.float32)  # fmt: skip
    batch = {
        "chosen_moments": moments(),
        "rejected_moments": moments(),
        "text_states": rng.standard_normal((b, MAX_LEN, cfg["cross_attention_dim"])),
        "user_embeds": 3 * rng.standard_normal((b, D)),
    }
    if kind == "sdxl":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        batch["text_pooled"] = rng.standard_normal((b, pooled))
        batch["time_ids"] = np.tile(np.array([RES, RES, 0, 0, RES, RES]), (b, 1))
    return {k: np.asarray(v, np.float32) for k, v in batch.items()}


def _torch_unets(folder, adapter_file, cross: int):
    """diffusers' UNet with PSA reference processors loaded from a PSAlign file (the policy),
    PSAlign's projection, and the plain frozen UNet (the reference model)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    policy = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    procs = {}
    for name, proc in policy.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = policy.get_submodule(name[: -len(".processor")])
            proc = psa_reference_processor(attn.to_q.out_features, cross, 1, 1.0)
        procs[name] = proc
    policy.set_attn_processor(procs)
    sd = load_file(adapter_file)
    psa = torch.nn.ModuleList(p for n, p in policy.attn_processors.items() if "attn2" in n)
    psa.load_state_dict({k[len("psa_adapter.") :]: v for k, v in sd.items()
                         if k.startswith("psa_adapter.")})  # fmt: skip
    proj = psa_reference_projection(D, cross, 1)
    proj.load_state_dict({k[len("user_proj.") :]: v for k, v in sd.items()
                          if k.startswith("user_proj.")})  # fmt: skip
    return policy, proj, base


def _psalign_loss(pred, ref, target, beta: float) -> tuple[float, np.ndarray]:
    """PSAlign's ``compute_loss`` (train.py), in float64: -logsigmoid(-beta/2 (model_diff -
    ref_diff)) over pairs."""
    mse = lambda x: ((x.double() - target.double()) ** 2).mean(dim=[1, 2, 3])  # noqa: E731
    model_w, model_l = mse(pred).chunk(2)
    ref_w, ref_l = mse(ref).chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return float(-torch.nn.functional.logsigmoid(inside).mean()), inside.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_dpo_step_loss_equals_a_pytorch_reference_step(kind, folders, tmp_path):
    folder, cfg = folders[kind], UNETS[kind]
    beta, scaling = 5000.0, 0.18215
    unet = psa_jax.load_unet(folder, user_embed_dim=D)
    unet.adapter = randomize_adapter(unet.adapter, seed=5, scale=SCALE)
    adapter_file = unet.save_adapter(tmp_path / "psa.safetensors", format="psalign")
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        schedule = noise_lib.noise_schedule_from_config(json.load(f))
    task = step_lib.DPOTask(unet.module, schedule, beta, scaling)
    batch = _batch(kind)
    optimizer = optax.sgd(0.0)
    state = step_lib.init_state(unet.adapter, optimizer, seed=7)
    train_step = jax.jit(step_lib.make_train_step(task.loss, optimizer))
    _, metrics = train_step(state, unet.params, batch)

    # The step's draws, replayed with its own functions: latents from the moments, then one
    # noise and timestep per pair (rows interleaved as the step has them), then PSAlign's
    # layout: all chosen rows, then all rejected.
    r_w, r_l, r_noise = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
    x0 = interleave_rows(step_lib.clean_latents(batch, "chosen", r_w, scaling),
                         step_lib.clean_latents(batch, "rejected", r_l, scaling))  # fmt: skip
    noisy, t, target = (jnp.concatenate(split_rows(x, 2))
                        for x in step_lib._noised(schedule, x0, r_noise, 2))  # fmt: skip

    # The reference in float64: what is left is psa_jax's float32 rounding.
    policy, proj, base = (m.double() for m in _torch_unets(folder, adapter_file,
                                                           cfg["cross_attention_dim"]))  # fmt: skip

    def nchw(x):
        return torch.from_numpy(np.asarray(x, np.float64).transpose(0, 3, 1, 2).copy())

    def twice(key):
        return torch.from_numpy(np.concatenate([batch[key]] * 2).astype(np.float64))

    added = None
    if kind == "sdxl":
        added = {"text_embeds": twice("text_pooled"), "time_ids": twice("time_ids")}
    timesteps = torch.from_numpy(np.asarray(t).astype(np.int64))
    ctx = twice("text_states")
    with torch.no_grad():
        tokens = proj(twice("user_embeds"))
        pred = policy(nchw(noisy), timesteps, torch.cat([ctx, tokens], 1),
                      added_cond_kwargs=added).sample  # fmt: skip
        ref = base(nchw(noisy), timesteps, ctx, added_cond_kwargs=added).sample
    want, inside = _psalign_loss(pred, ref, nchw(target), beta)
    got = float(metrics["loss"])
    margins = jax.jit(task.margins)(
        unet.adapter, unet.params, batch, jax.random.fold_in(state.rng, 0)
    )
    got_inside = 0.5 * beta * np.asarray(margins, np.float64)
    print(
        f"{kind} DPO loss: psa_jax {got:.7g}, PyTorch {want:.7g} (rel "
        f"{abs(got - want) / want:.2g}); inside psa_jax {got_inside}, PyTorch {inside}"
    )
    assert np.max(np.abs(inside)) > 1.0  # the policy is not the reference: real margins
    assert abs(got - want) <= LOSS_TOL * abs(want)
    # Per pair: beta / 2 = 2500 scales the float32 rounding of the MSEs up (~1e-4 here).
    np.testing.assert_allclose(got_inside, inside, rtol=0, atol=1e-3)


def test_sdxl_benign_finetune_conditions_on_pooled_text_and_time_ids(runs):
    """SPQR's benign fine-tune on an SDXL run: the benign captions' pooled text and size ids
    come along (as the sampler conditions on them), and a full fine-tune on them lowers the
    denoising loss on its data; without them the SDXL UNet cannot run."""
    import jax
    import jax.numpy as jnp

    from psa_jax.eval.benign_data import encode_benign
    from psa_jax.sample.pipeline import Pipeline
    from psa_jax.train import benign

    pipe = Pipeline.from_run(runs("sdxl"))
    side = pipe.latent_shape()[0] * pipe.vae.config.downscale
    images = np.random.default_rng(0).integers(0, 256, (4, side, side, 3), dtype=np.uint8)
    captions = ["a house at dawn", "a tree in fog", "a boat by the sea", "a car at noon"]
    moments, states, added = encode_benign(pipe, images, captions)
    assert added["time_ids"].shape == (4, 6)
    np.testing.assert_allclose(added["text_pooled"], pipe.encode_prompts(captions)[1], rtol=1e-6)
    cfg = benign.finetune_config("standard", steps=12, batch_size=4)
    cfg.optim.learning_rate = 1e-3
    profile = benign.get_profile("standard")
    task = benign.BenignTask(pipe.module, pipe.noise_schedule, profile, pipe.scaling_factor)
    batch = {"image_moments": moments, "text_states": states, **added}

    def loss(p):
        keys = jax.random.split(jax.random.key(3), 4)
        return float(np.mean([task.loss(p, None, batch, k)[0] for k in keys]))

    out = benign.finetune(pipe.module, pipe.params, pipe.noise_schedule, pipe.scaling_factor,
                          moments, states, cfg, added=added, progress=False)  # fmt: skip
    assert loss(out.trainable) < loss(jax.tree.map(jnp.asarray, pipe.params))
    with pytest.raises(Exception):  # noqa: B017 - the SDXL UNet needs its added conditions
        benign.finetune(pipe.module, pipe.params, pipe.noise_schedule, pipe.scaling_factor,
                        moments, states, cfg, progress=False)  # fmt: skip
