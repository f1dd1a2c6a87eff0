"""Text + profile -> images: the frozen models, an optional adapter, and the compiled sampler.

A :class:`Pipeline` comes from a ``psa-jax train`` run (:meth:`Pipeline.from_run`: the run's
config rebuilds its base models, its newest checkpoint gives the adapter, or the UNet of a
``denoise`` run) or from a local diffusers folder plus an adapter file
(:meth:`Pipeline.from_pretrained`: SD1.x/2.x, or SDXL with its two text encoders and its
pooled-text + image-size conditioning, as diffusers' ``StableDiffusionXLPipeline``); such a
folder's ``scheduler/scheduler_config.json`` is its default sampler (PNDM for SD 1.5). Prompts are
encoded once per call; samples are generated in fixed-size chunks so one compiled loop serves any
number of prompts (the last chunk is padded, and the padding dropped).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.core.images import to_uint8
from psa_jax.data.cache import encode_text, encode_text_pair
from psa_jax.data.tokenizer import tokenize
from psa_jax.sample import schedulers as sched_lib
from psa_jax.sample.sampler import Conditioning, Sampler, sample_latents
from psa_jax.train.restore import Run, load_run

DEFAULT_SCHEDULER = "ddim"  # a call naming no scheduler, on a pipeline without a folder's


@dataclasses.dataclass
class Pipeline:
    """Frozen UNet/text encoder/VAE (host arrays), the adapter (None: the base model).

    SDXL sets ``text_encoder_2``/``tokenizer_2``: the prompt is then both encoders' penultimate
    states side by side, and encoder 2's projected pooled embedding feeds the UNet's ``added``
    conditions (``text_layer`` is SD1.x/2.x only). ``force_zeros_for_empty_prompt``: an empty
    negative prompt is all-zero embeddings instead of the encoded ``""`` (SDXL's training).
    """

    module: Any  # UNet2DConditionModel with adapter slots when ``adapter`` is set
    params: Any
    adapter: Any | None
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scaling_factor: float
    noise_schedule: Any  # psa_jax.core.diffusion.NoiseSchedule: betas and prediction type
    text_layer: str = "last"
    shift_factor: float = 0.0
    embeddings: dict[str, np.ndarray] | None = None  # user id -> profile embedding, if known
    text_encoder_2: Any | None = None  # SDXL: CLIPTextModelWithProjection
    tokenizer_2: Any | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL only (the pipeline config's flag)
    # The base folder's scheduler_config.json: the sampler when a call names none (None: DDIM)
    scheduler_config: dict | None = None
    # A one-host mesh every call splits its chunks over (a call's ``mesh`` wins); None: one device
    mesh: Any | None = None

    @classmethod
    def from_run(cls, workdir: str | os.PathLike, step: int | None = None) -> Pipeline:
        """The models of a training run: a ``dpo`` run's adapter on its base, or the UNet of a
        ``denoise`` run (full fine-tune, or its LoRA merged into the base). The run's profile
        embedding table comes along as ``embeddings``. The run's TFDS splits are not needed
        (nor built, nor checked)."""
        return cls.from_loaded_run(load_run(workdir, step, build_splits=False), str(workdir))

    @classmethod
    def from_loaded_run(cls, run: Run, where: str = "the run") -> Pipeline:
        """:meth:`from_run` on a :func:`load_run` result (evaluation keeps the ``Run``)."""
        from psa_jax.models.packaged import resolve

        models = run.models
        if models.vae is None:
            raise ValueError(f"the config of {where} has no VAE to decode samples")
        model = run.config.model
        folder = resolve(model.pretrained) if model.init == "pretrained" else ""
        return cls(
            models.module,
            run.unet_params,
            run.adapter,
            models.text_encoder,
            run.splits.tokenizer if models.tokenizer is None else models.tokenizer,
            models.vae,
            models.scaling_factor,
            models.schedule,
            run.config.model.text_layer,
            models.vae.shift_factor,
            run.splits.embeddings,
            text_encoder_2=models.text_encoder_2,  # SDXL: as the run's caches encoded its text
            tokenizer_2=models.tokenizer_2,
            force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt,
            # A run on a diffusers folder samples, by default, with that folder's scheduler.
            scheduler_config=read_scheduler_config(folder) if folder else None,
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        *,
        dtype: str = "float32",
        text_layer: str = "last",
    ) -> Pipeline:
        """A local diffusers pipeline folder (``unet/``, ``text_encoder/``, ``tokenizer/``,
        ``vae/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``) plus an
        optional adapter file (PSAlign, IP-Adapter export, or a run folder: anything
        :meth:`PSAUNet.load_adapter` reads). The folder's scheduler config becomes
        ``scheduler_config``: what a call without ``scheduler=`` samples with."""
        import json

        from psa_jax.core.diffusion import noise_schedule_from_config
        from psa_jax.data.prepare import open_tokenizer
        from psa_jax.models.clip import load_text_encoder
        from psa_jax.models.psa_unet import load_unet
        from psa_jax.models.vae import load_vae

        def read_json(*parts: str) -> dict:
            path = os.path.join(folder, *parts)
            if not os.path.isfile(path):
                return {}
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        folder = os.fspath(folder)
        sdxl = {}
        if os.path.isdir(os.path.join(folder, "text_encoder_2")):
            sdxl = dict(
                text_encoder_2=load_text_encoder(
                    os.path.join(folder, "text_encoder_2"), dtype=dtype, with_projection=True
                ),
                tokenizer_2=open_tokenizer(os.path.join(folder, "tokenizer_2")),
                force_zeros_for_empty_prompt=bool(
                    read_json("model_index.json").get("force_zeros_for_empty_prompt", True)
                ),
            )
        unet = load_unet(folder, dtype=dtype)
        if adapter is not None:
            unet.load_adapter(adapter)
        vae = load_vae(folder, dtype=dtype)
        scheduler_config = read_scheduler_config(folder, sdxl=bool(sdxl))
        return cls(
            unet.module,
            unet.params,
            unet.adapter,
            load_text_encoder(os.path.join(folder, "text_encoder"), dtype=dtype),
            open_tokenizer(folder),
            vae,
            vae.scaling_factor,
            noise_schedule_from_config(scheduler_config or {}),
            text_layer,
            vae.shift_factor,
            **sdxl,
            scheduler_config=scheduler_config,
        )

    @property
    def user_embed_dim(self) -> int | None:
        if self.adapter is None:
            return None
        return int(np.shape(self.adapter["user_proj"]["kernel"])[0])

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """``[N, L, D]`` text states (of ``text_layer``) and ``[N, D']`` pooled embeddings.

        SDXL: the penultimate states of both encoders concatenated on D (as diffusers, which
        ignores the final layer norm there), pooled = encoder 2's projected ``text_embeds``."""

        def ids(encoder, tokenizer):
            return tokenize(tokenizer, prompts, int(encoder.config.max_position_embeddings))

        first = ids(self.text_encoder, self.tokenizer)
        if self.text_encoder_2 is None:
            return encode_text(self.text_encoder, first, self.text_layer)
        second = ids(self.text_encoder_2, self.tokenizer_2)
        return encode_text_pair(self.text_encoder, self.text_encoder_2, first, second)

    def encode_negative(self, negative_prompt: str) -> tuple[jax.Array, jax.Array]:
        """``[1, L, D]`` states and ``[1, D']`` pooled of the negative prompt. SDXL with
        ``force_zeros_for_empty_prompt`` gives zeros for ``""`` (diffusers' default of no
        ``negative_prompt`` at all; an explicit ``""`` there is encoded, as with the flag off)."""
        states, pooled = self.encode_prompts([negative_prompt])
        sdxl = self.text_encoder_2 is not None
        if sdxl and self.force_zeros_for_empty_prompt and not negative_prompt:
            return jnp.zeros_like(states), jnp.zeros_like(pooled)
        return states, pooled

    def time_ids(self, n: int) -> jax.Array:
        """SDXL's ``[n, 6]`` size conditioning: (original H, W, crop top, left, target H, W) =
        (H, W, 0, 0, H, W) for the generated image size, as diffusers' defaults."""
        h, w, _ = self.latent_shape()
        scale = self.vae.config.downscale
        ids = np.array([h * scale, w * scale, 0, 0, h * scale, w * scale], np.float32)
        return jnp.asarray(np.broadcast_to(ids, (n, 6)))

    def latent_shape(self) -> tuple[int, int, int]:
        """HWC of the UNet's latents (its configured sample size)."""
        cfg = self.module.config
        return (cfg.sample_size, cfg.sample_size, cfg.in_channels)

    def __call__(
        self,
        prompts: Sequence[str],
        user_embeds: np.ndarray | None = None,
        seeds: Sequence[int] | None = None,
        *,
        scheduler: str | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        user_scale: float | Sequence[float] = 1.0,
        negative_prompt: str = "",
        batch_size: int = 8,
        scheduler_options: dict | None = None,
        output: str = "uint8",
        mesh: Any | None = None,
    ) -> np.ndarray:
        """``[N, H, W, 3]`` images, one per prompt (``user_embeds [N, D]`` row-aligned;
        ``None``: the base model). ``seeds`` default to ``0..N-1``. ``output="float"`` gives
        float32 in [0, 1] (as diffusers' ``output_type="np"``), else uint8. ``scheduler``: see
        :meth:`sampler_schedule` (None: the folder's, else DDIM). With a ``mesh`` (one host;
        default: the pipeline's), each chunk of ``batch_size`` samples splits over its data
        axes and the weights are replicated. SDXL's negative branch: see :meth:`encode_negative`."""
        n = len(prompts)
        user_embeds, seeds, scales = self._check_args(n, user_embeds, seeds, user_scale, output)
        schedule = self.sampler_schedule(scheduler, steps, scheduler_options)
        sampler = Sampler(self.module, float(guidance_scale))
        variables = {"params": self.params}
        if self.adapter is not None and user_embeds is not None:
            variables["adapter"] = self.adapter
        mesh = self.mesh if mesh is None else mesh
        shardings = None if mesh is None else _mesh_shardings(mesh, batch_size)
        negative = self.encode_negative(negative_prompt)
        time_ids = self.time_ids(batch_size) if self.text_encoder_2 is not None else None
        images = []
        for lo in range(0, n, batch_size):
            idx = np.minimum(np.arange(lo, lo + batch_size), n - 1)  # pad with the last row
            cond = self._chunk_conditioning(
                [prompts[i] for i in idx],
                negative,
                time_ids,
                None if user_embeds is None else user_embeds[idx],
                scales[idx],
            )
            latents = sample_latents(
                sampler,
                schedule,
                variables,
                cond,
                seeds[idx],
                self.latent_shape(),
                shardings=shardings,
            )
            keep = min(batch_size, n - lo)
            images.append(self.decode(latents[:keep], output))
        return np.concatenate(images)

    def scheduler_name(self, scheduler: str | None = None) -> str:
        """The sampler a call with ``scheduler`` uses (see :meth:`sampler_schedule`)."""
        if scheduler is not None:
            return scheduler
        if self.scheduler_config is None:
            return DEFAULT_SCHEDULER
        return sched_lib.scheduler_for_class(
            self.scheduler_config.get("_class_name"), "the base folder's scheduler_config.json"
        )

    def sampler_schedule(
        self, scheduler: str | None, steps: int, options: dict | None = None
    ) -> sched_lib.SamplerSchedule:
        """The tables of ``steps`` inference steps. A named ``scheduler`` takes its Stable
        Diffusion defaults (``SCHEDULERS[name].defaults``) and this pipeline's betas and
        prediction type; None takes ``scheduler_config`` (the folder's class and its options, as
        diffusers' pipeline would sample; a class we do not implement is an
        :class:`~psa_jax.sample.schedulers.UnsupportedSchedulerError` listing those we do), or
        DDIM without one. ``options`` override either."""
        options = dict(options or {})
        if scheduler is not None or self.scheduler_config is None:
            name = self.scheduler_name(scheduler)
            return sched_lib.make_sampler_schedule(name, steps, self.noise_schedule, **options)
        return sched_lib.from_diffusers_config(
            self.scheduler_config,
            steps,
            self.scheduler_name(None),
            noise_schedule=self.noise_schedule,
            **options,
        )

    def _check_args(
        self,
        n: int,
        user_embeds: np.ndarray | None,
        seeds: Sequence[int] | None,
        user_scale: float | Sequence[float],
        output: str,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """:meth:`__call__`'s per-prompt arguments as float32/int arrays of N rows, or raise
        before anything is compiled."""
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        if user_embeds is not None:
            if self.adapter is None:
                raise ValueError("user_embeds given, but this pipeline has no adapter")
            user_embeds = np.asarray(user_embeds, np.float32)
            if user_embeds.shape != (n, self.user_embed_dim):
                raise ValueError(
                    f"user_embeds has shape {user_embeds.shape}; expected ({n}, "
                    f"{self.user_embed_dim}): one profile embedding per prompt"
                )
        seeds = np.arange(n) if seeds is None else np.asarray(seeds)
        scales = np.broadcast_to(np.asarray(user_scale, np.float32), (n,))
        if seeds.shape != (n,):
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        return user_embeds, seeds, scales

    def _chunk_conditioning(
        self,
        prompts: Sequence[str],
        negative: tuple[jax.Array, jax.Array],
        time_ids: jax.Array | None,
        user_embeds: np.ndarray | None,
        scales: np.ndarray,
    ) -> Conditioning:
        """One chunk's :class:`Conditioning`: its prompts encoded, the negative prompt's
        ``(states, pooled)`` broadcast to them; ``time_ids`` set (SDXL) adds pooled text + size."""
        states, pooled = self.encode_prompts(prompts)
        neg_states, neg_pooled = negative
        added = neg_added = None
        if time_ids is not None:
            added = {"text_embeds": pooled, "time_ids": time_ids}
            neg_added = {
                "text_embeds": jnp.broadcast_to(neg_pooled, pooled.shape),
                "time_ids": time_ids,
            }
        return Conditioning(
            text_states=states,
            neg_text_states=jnp.broadcast_to(neg_states, states.shape),
            user_embeds=None if user_embeds is None else jnp.asarray(user_embeds),
            user_scale=jnp.asarray(scales),
            added=added,
            neg_added=neg_added,
        )

    def decode(self, latents_nhwc: jax.Array, output: str = "uint8") -> np.ndarray:
        """Diffusion latents -> NHWC images (``z = latents / scaling + shift``), float32 in
        [0, 1] (``output="float"``) or uint8."""
        z = jnp.transpose(latents_nhwc, (0, 3, 1, 2)) / self.scaling_factor + self.shift_factor
        images = np.asarray(self.vae.decode(z), np.float32)  # NCHW in [-1, 1]
        unit = np.transpose(np.clip(images / 2 + 0.5, 0.0, 1.0), (0, 2, 3, 1))
        return unit if output == "float" else to_uint8(unit)


def read_scheduler_config(folder: str | os.PathLike, *, sdxl: bool | None = None) -> dict | None:
    """A diffusers folder's ``scheduler/scheduler_config.json`` (None without one), with the
    fixes ``StableDiffusionPipeline`` applies to old SD 1.x/2.x configs (``steps_offset=1``,
    ``clip_sample=False``); SDXL's pipeline (``sdxl``; None: the folder has
    ``text_encoder_2/``) applies none."""
    import json

    folder = os.fspath(folder)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    if sdxl is None:
        sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not sdxl:
        if config.get("steps_offset", 1) != 1:
            config["steps_offset"] = 1
        if config.get("clip_sample", False) is True:
            config["clip_sample"] = False
    return config


def _mesh_shardings(mesh: Any, batch_size: int) -> tuple[Any, Any]:
    """(batch, replicated) shardings of ``mesh`` for ``sample_latents``; a chunk must split evenly
    over the data-parallel devices."""
    from psa_jax.core import parallel

    if batch_size % parallel.data_parallel_size(mesh):
        raise ValueError(
            f"batch_size {batch_size} does not split over the mesh's "
            f"{parallel.data_parallel_size(mesh)} data-parallel devices"
        )
    return (parallel.batch_sharding(mesh), parallel.replicated(mesh))
