"""The two PyTorch training contestants, on the same random weights as psa_jax.

``torch-psalign`` is one step of PSAlign's ``train.py`` loop: a second, full reference UNet
(with its own zero adapter, as ``init_psa_adapter`` gives it), the VAE encoding both images and
the text encoder run every step, user tokens concatenated to the text states, shared noise and
timestep per pair, the Diffusion-DPO loss, backward, gradient clipping, the optimizer (AdamW;
Adafactor for SDXL) and its lr scheduler, ``loss.item()`` each step. On a GPU under
``--dtype bfloat16`` it runs as ``accelerate --mixed_precision bf16`` does: the trained UNet in
fp32 under bf16 autocast, the reference UNet, VAE and text encoder cast to bf16. SDXL adds
gradient checkpointing on the trained UNet (PSAlign turns it on for SDXL; its CPU offloading
of the frozen models is left out, as it would only slow it down further).

``torch-fair`` is what a careful PyTorch engineer writes: cached VAE moments and text states,
one UNet whose reference pass is the same weights with the user branch off, SDPA, the frozen
base stored in the bench dtype with fp32 adapter weights, and ``torch.compile`` of the UNet
where it works (the eager fallback is named in the output).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from psa_jax.bench.measure import Contestant, torch_peak_memory, torch_sync
from psa_jax.bench.shapes import BenchShape
from psa_jax.bench.torch_models import (
    PSAAdapter,
    torch_dtype,
    torch_text_encoders,
    torch_unet,
    torch_vae,
)


def dpo_loss(pred: torch.Tensor, ref: torch.Tensor, target: torch.Tensor, beta: float):
    """PSAlign's ``compute_loss``: ``-logsigmoid(-beta/2 ((w - l) - (rw - rl)))`` of MSEs."""
    model = (pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    refl = (ref.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    mw, ml = model.chunk(2)
    rw, rl = refl.chunk(2)
    inside = -0.5 * beta * ((mw - ml) - (rw - rl))
    return -F.logsigmoid(inside).mean()


def add_noise(alphas_cumprod: torch.Tensor, x0, noise, t) -> torch.Tensor:
    """DDPMScheduler.add_noise: sqrt(a_t) x0 + sqrt(1 - a_t) noise (``alphas_cumprod`` fp32)."""
    a = alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def fair_loss(
    unet,
    adapter: PSAAdapter,
    lat_w,
    lat_l,
    noise,
    t,
    text,
    user,
    beta: float,
    alphas_cumprod: torch.Tensor,
    added: dict | None = None,
) -> torch.Tensor:
    """torch-fair's DPO loss for given clean latents (NCHW), one noise/timestep per pair: the
    policy pass with user tokens, the reference pass (same UNet, branch off) without grad."""
    x0 = torch.cat([lat_w, lat_l])
    noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
    noisy = add_noise(alphas_cumprod, x0, noise2, t2)
    ctx = torch.cat([text, text])
    tokens = adapter.user_proj(torch.cat([user, user]))
    pred = unet(
        noisy, t2, ctx, added_cond_kwargs=added, cross_attention_kwargs={"user_tokens": tokens}
    ).sample
    with torch.no_grad():
        ref = unet(
            noisy, t2, ctx, added_cond_kwargs=added, cross_attention_kwargs={"user_tokens": None}
        ).sample
    return dpo_loss(pred, ref, noise2, beta)


def _optimizer(config: Any, params: list, device: str):
    """The config's optimizer as PSAlign builds it (AdamW, or transformers' Adafactor)."""
    o = config.optim
    if o.name == "adafactor":
        from transformers import Adafactor

        return Adafactor(
            params,
            lr=o.learning_rate,
            weight_decay=o.weight_decay,
            clip_threshold=1.0,
            scale_parameter=False,
            relative_step=False,
        )
    fused = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    return torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.b1, o.b2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        **fused,
    )


def _inputs(shape: BenchShape, batch: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """The synthetic batch psa_jax gets (same values), NCHW; SDXL's pooled text and size ids."""
    from psa_jax.bench.jax_train import synthetic_batch

    b = synthetic_batch(shape, batch, seed)
    out = {k: torch.from_numpy(v).to(device) for k, v in b.items()}
    for key in ("chosen_moments", "rejected_moments"):
        out[key] = out[key].permute(0, 3, 1, 2).contiguous()
    return out


def _added(inp: dict, repeat: int, dtype=None) -> dict | None:
    if "time_ids" not in inp:
        return None
    cat = lambda x: torch.cat([x] * repeat).to(dtype or x.dtype)  # noqa: E731
    return {"text_embeds": cat(inp["text_pooled"]), "time_ids": cat(inp["time_ids"])}


def _autocast(device: str, dtype: torch.dtype):
    enabled = dtype != torch.float32
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled)


class _FairStep:
    """torch-fair's step and what it holds: the UNet (compiled, or eager after a failed
    compilation), the adapter and its optimizer, the cached inputs on the device."""

    def __init__(self, shape: BenchShape, state: dict, batch: int, device: str, compile_mode: str,
                 seed: int):  # fmt: skip
        self.dtype, self.device, self.batch = torch_dtype(shape.config.model.dtype), device, batch
        self.unet = torch_unet(shape.unet, state).to(device, self.dtype).train()
        if shape.config.model.get("remat_policy", "none") != "none":
            self.unet.enable_gradient_checkpointing()
        torch.manual_seed(seed)
        self.adapter = PSAAdapter(self.unet, shape.user_embed_dim, shape.num_user_tokens, False)
        self.adapter.to(device).attach(self.unet)
        self.params = list(self.adapter.parameters())
        self.opt = _optimizer(shape.config, self.params, device)
        self.inp = _inputs(shape, batch, device, seed)
        self.acp = _alphas_cumprod(shape).to(device)
        self.sf, self.beta, self.clip = (
            shape.scaling_factor,
            float(shape.config.train.beta),
            _clip(shape),
        )
        self.model, self.notes = self.unet, ["eager"]
        if compile_mode != "off":
            self.model, self.notes = torch.compile(self.unet), ["torch.compile(unet)"]

    def _latents(self, key: str) -> torch.Tensor:
        mean, logvar = self.inp[key].chunk(2, dim=1)
        return (mean + (0.5 * logvar).exp() * torch.randn_like(mean)) * self.sf

    def __call__(self) -> torch.Tensor:
        inp = self.inp
        with _autocast(self.device, self.dtype):
            lat_w, lat_l = self._latents("chosen_moments"), self._latents("rejected_moments")
            noise = torch.randn_like(lat_w)
            t = torch.randint(0, self.acp.shape[0], (self.batch,), device=self.device)
            loss = fair_loss(self.model, self.adapter, lat_w, lat_l, noise, t,
                             inp["text_states"], inp["user_embeds"], self.beta, self.acp,
                             _added(inp, 2))  # fmt: skip
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def first(self) -> torch.Tensor:
        """The first step; a compilation failure falls back to eager and is named."""
        try:
            return self()
        except Exception as e:  # dynamo/inductor failures
            if self.model is self.unet:
                raise
            self.model = self.unet
            self.notes[:] = [f"eager (torch.compile failed: {type(e).__name__}: {str(e)[:80]})"]
            self.opt.zero_grad(set_to_none=True)
            return self()


def fair_contestant(shape: BenchShape, state: dict[str, np.ndarray], batch: int, device: str,
                    compile_mode: str = "auto", seed: int = 0) -> Contestant:  # fmt: skip
    """torch-fair (see the module docstring); ``compile_mode``: on, off, auto (= on)."""
    s = _FairStep(shape, state, batch, device, compile_mode, seed)
    return _contestant("torch-fair", s.first, s, device, s.dtype, s.notes)


def _contestant(name, first, step, device, dtype, notes) -> Contestant:
    last: dict[str, Any] = {}

    def run(fn):
        def wrapped():
            last["loss"] = fn()
            return last["loss"]

        return wrapped

    return Contestant(
        name,
        run(first),
        run(step),
        torch_sync(device),
        peak_memory=lambda: torch_peak_memory(device),
        info={
            "notes": lambda: "; ".join(notes),
            "device": _device_name(device),
            "torch_dtype": str(dtype),
        },
        loss=lambda: float(last["loss"]) if "loss" in last else None,
    )


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _alphas_cumprod(shape: BenchShape) -> torch.Tensor:
    from diffusers import DDPMScheduler

    noise = dict(shape.config.noise)
    return DDPMScheduler(**noise).alphas_cumprod.float()


def _clip(shape: BenchShape) -> float | None:
    clip = shape.config.optim.grad_clip_norm
    return float(clip) if clip and clip > 0 else None


def psalign_contestant(
    shape: BenchShape, state: dict[str, np.ndarray], batch: int, device: str, seed: int = 0
) -> Contestant:
    """torch-psalign (see the module docstring)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    dtype = torch_dtype(shape.config.model.dtype)
    unet = torch_unet(shape.unet, state)
    ref_unet = copy.deepcopy(unet).to(device, dtype)  # PSAlign loads the base twice
    unet.to(device).train()  # trained UNet: fp32 master weights, autocast does the rest
    if shape.sdxl:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(seed)
    d, t = shape.user_embed_dim, shape.num_user_tokens
    adapter = PSAAdapter(unet, d, t, concat=True).to(device)
    adapter.attach(unet)
    PSAAdapter(ref_unet, d, t, concat=True).to(device, dtype).attach(ref_unet)
    vae = torch_vae(shape.vae, seed).to(device, dtype)
    texts = [m.to(device, dtype) for m in torch_text_encoders(shape.text_encoders, seed)]
    params = list(adapter.parameters())
    opt = _optimizer(shape.config, params, device)
    lr = get_scheduler("constant_with_warmup", opt, num_warmup_steps=0)
    sched = DDPMScheduler(**dict(shape.config.noise))
    inputs = _psalign_inputs(shape, batch, device, seed)
    beta, clip = float(shape.config.train.beta), _clip(shape)
    models = dict(
        unet=unet,
        ref_unet=ref_unet,
        adapter=adapter,
        vae=vae,
        texts=texts,
        sched=sched,
        dtype=dtype,
    )

    def step() -> torch.Tensor:
        with _autocast(device, dtype):
            pred, ref, target = _psalign_forward(shape, models, inputs)
            loss = dpo_loss(pred, ref, target, beta)
        loss.item()  # PSAlign gathers and logs the loss every step (a host sync)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        lr.step()
        opt.zero_grad()
        return loss.detach()

    return _contestant("torch-psalign", step, step, device, dtype, ["eager, 2 UNets"])


def _psalign_inputs(shape: BenchShape, batch: int, device: str, seed: int) -> dict:
    """What PSAlign's data loader yields: both images stacked on channels, prompt ids,
    profile embeddings."""
    g = np.random.default_rng(seed)
    r = shape.resolution
    pixels = g.uniform(-1, 1, (batch, 6, r, r)).astype(np.float32)
    vocab = int(shape.text_encoders[0]["vocab_size"])
    ids = g.integers(2, vocab, (batch, shape.text_len))
    users = g.standard_normal((batch, shape.user_embed_dim)).astype(np.float32)
    return {
        "pixel_values": torch.from_numpy(pixels).to(device),
        "input_ids": torch.from_numpy(ids).to(device),
        "user_embedding": torch.from_numpy(users).to(device),
    }


def _psalign_forward(shape: BenchShape, m: dict, batch: dict):
    """PSAlign's ``prepare_batch_inputs`` + ``training_step``: (policy, reference, target)."""
    dtype = m["dtype"]
    pixels = torch.cat(batch["pixel_values"].chunk(2, dim=1))
    with torch.no_grad():
        latents = m["vae"].encode(pixels.to(dtype)).latent_dist.sample()
        latents = latents * m["vae"].config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(
        0, m["sched"].config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    t = t.chunk(2)[0].repeat(2)
    noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
    noisy = m["sched"].add_noise(latents, noise, t)
    text, added = _psalign_text(shape, m, batch["input_ids"])
    tokens = m["adapter"].user_proj(batch["user_embedding"].repeat(2, 1)).to(dtype)
    ctx = torch.cat([text.repeat(2, 1, 1), tokens], dim=1)
    pred = m["unet"](noisy, t, ctx, added_cond_kwargs=added).sample
    with torch.no_grad():
        ref = m["ref_unet"](noisy, t, ctx, added_cond_kwargs=added).sample.detach()
    return pred, ref, noise


def _psalign_text(shape: BenchShape, m: dict, ids: torch.Tensor):
    """SD1.x: the encoder's last states. SDXL: both encoders' penultimate states side by side,
    pooled = encoder 2's projection, plus the size ids (PSAlign's ``encode_prompt_sdxl``)."""
    if not shape.sdxl:
        return m["texts"][0](ids)[0], None
    with torch.no_grad():
        states, pooled = [], None
        for enc in m["texts"]:
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
    r = float(shape.resolution)
    b = ids.shape[0] * 2
    time_ids = torch.tensor([r, r, 0, 0, r, r], dtype=m["dtype"], device=ids.device)
    added = {"time_ids": time_ids[None].repeat(b, 1), "text_embeds": pooled.repeat(2, 1)}
    return torch.cat(states, dim=-1), added


def timed_build(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0
