"""Everything a training run reads, prepared once and cached: frozen models, data, embeddings.

Resolution order for the base models (``config.model``): ``pretrained`` (a local diffusers
pipeline folder: ``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/``) -> ``base_workdir`` (the
UNet of a ``denoise`` run, e.g. the pretrained tiny base) -> random weights from the config's
architecture and ``init_seed`` (the embedded tiny config). Without ``pretrained``, ``vae_path``
(a ``vae`` run's folder or a diffusers VAE folder) supplies a trained VAE and its scaling factor.

Data (``config.data``): ``source="toy"`` generates the synthetic Sage-mini world into the cache
directory (``$PSA_JAX_CACHE`` or ``~/.cache/psa_jax``) and builds it; any other ``source`` is a
Sage-format folder (``metadata.jsonl`` + images) or a folder already built by ``build-data``.
Profile embeddings (``config.data.embeddings``): ``"minilm"`` computes them offline for the
world's users (cached), else a folder written by ``embed-profiles``. Every step is keyed by its
inputs and reused; process 0 prepares first, the others then find (or, without a shared file
system, rebuild) the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from flax.core import meta
from orbax.checkpoint import multihost

from psa_jax.data import cache as cache_lib
from psa_jax.data import embed, sage, toy_world
from psa_jax.data.loader import SageLoader
from psa_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from psa_jax.models.clip import CLIPTextConfig, FlaxCLIPTextModel, load_text_encoder
from psa_jax.models.packaged import resolve as resolve_packaged
from psa_jax.models.psa_unet import init_variables, load_unet, unet_module_from_config
from psa_jax.models.unet import UNet2DConditionModel
from psa_jax.models.vae import AutoencoderKL, FlaxAutoencoderKL, VAEConfig, load_vae
from psa_jax.train import noise as noise_lib

T = TypeVar("T")
CACHE_ENV = "PSA_JAX_CACHE"
DATASET = "sage"


def cache_root(config: Any) -> str:
    root = config.data.get("cache_dir") or os.environ.get(CACHE_ENV)
    return os.path.abspath(os.path.expanduser(root or "~/.cache/psa_jax"))


def barrier(name: str, timeout_s: int = 4 * 3600) -> None:
    """Wait until every process reaches ``name`` (unique per call site and run).

    A key-value barrier of the coordination service, not a device collective: a collective
    would start CPU/gloo communication, whose context set-up times out after 30 s while one
    process is still building data or compiling encoders.
    """
    if jax.process_count() > 1:
        sync = multihost.get_barrier_sync_fn()
        sync(key=f"psa_jax:{name}", timeout_ms=timeout_s * 1000)


def process_zero_first(fn: Callable[[], T], tag: str) -> T:
    """Run ``fn`` on process 0, then on the others (which find its files on a shared file
    system, or make their own). One process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    out = fn() if jax.process_index() == 0 else None
    barrier(f"{tag}:0")
    if jax.process_index() != 0:
        out = fn()
    barrier(f"{tag}:1")
    return out


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- models ----------------------------------------------------------------------------------


@dataclasses.dataclass
class BaseModels:
    """The frozen pieces of a run (host arrays) and the UNet module with adapter slots."""

    module: UNet2DConditionModel
    unet_params: Any
    text_encoder: FlaxCLIPTextModel
    vae: FlaxAutoencoderKL | None
    tokenizer: Any | None  # None: the toy world's word tokenizer, built with the data
    schedule: noise_lib.NoiseSchedule
    scaling_factor: float


def load_base_models(config: Any) -> BaseModels:
    """Frozen UNet / text encoder / VAE in ``config.model.dtype`` (see module docstring)."""
    model = config.model
    dtype = model.get("dtype", "float32")
    seed = int(model.get("init_seed", 0))
    schedule = noise_lib.noise_schedule_from_config(dict(config.noise))
    init = model_init(model)
    if init == "pretrained" and model.get("pretrained"):
        root = resolve_packaged(model.pretrained)
        if os.path.isdir(os.path.join(root, "text_encoder_2")):
            raise NotImplementedError(
                f"{root} has two text encoders (SDXL): the encoder caches hold one text encoder "
                "so far; SDXL training needs their concatenation (planned)"
            )
        unet = load_unet(root, dtype=dtype)
        text = load_text_encoder(os.path.join(root, "text_encoder"), dtype=dtype)
        vae = load_vae(root, dtype=dtype)
        tokenizer = load_tokenizer(root)
        module = unet_module_from_config(model, dtype, unet.config)
        params = unet.params
        scaling = vae.scaling_factor
        sched_file = os.path.join(root, "scheduler", "scheduler_config.json")
        if os.path.isfile(sched_file):
            with open(sched_file, encoding="utf-8") as f:
                schedule = noise_lib.noise_schedule_from_config(
                    {**json.load(f), **_prediction(config)}
                )
        return BaseModels(module, params, text, vae, tokenizer, schedule, scaling)

    module = unet_module_from_config(model, dtype)
    if init == "pretrained":
        from psa_jax.train.checkpoint import restore_host_params

        params, _ = restore_host_params(model.base_workdir)
    else:
        # Initialised in float32 (then cast): the same weights whatever the compute dtype.
        params = meta.unbox(init_variables(unet_module_from_config(model), seed))["params"]
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    text_cfg = CLIPTextConfig.from_hf_config(dict(model.text_encoder))
    text = FlaxCLIPTextModel.init_random(text_cfg, seed=seed + 1, dtype=dtype)
    vae = None
    if model.get("vae_path"):  # a trained VAE (a vae run's folder, or a diffusers VAE folder)
        vae = load_vae(os.path.expanduser(model.vae_path), dtype=dtype)
    elif model.get("vae"):
        vae_cfg = VAEConfig.from_diffusers_config(dict(model.vae))
        side = vae_cfg.sample_size
        vae_init = jax.jit(AutoencoderKL(vae_cfg, dtype=jax.numpy.dtype(dtype)).init)
        vae_params = vae_init(jax.random.key(seed + 2), np.zeros((1, side, side, 3), np.float32))
        vae = FlaxAutoencoderKL(vae_cfg, meta.unbox(vae_params["params"]), dtype)
    scaling = vae.scaling_factor if vae is not None else 1.0
    return BaseModels(module, params, text, vae, None, schedule, scaling)


INITS = ("pretrained", "random")


def model_init(model: Any) -> str:
    """``model.init``: ``"pretrained"`` (``model.pretrained``, a diffusers folder or
    ``packaged:<name>``; or ``model.base_workdir``, a denoise run's UNet) or ``"random"`` (the
    config's architecture at ``init_seed``). Configs saved before the key existed migrate by
    what they set: a pretrained folder or base run means "pretrained", else "random"."""
    init = model.get("init")
    if init is None:  # migration: runs written before model.init
        init = "pretrained" if model.get("pretrained") or model.get("base_workdir") else "random"
    if init not in INITS:
        raise ValueError(f"model.init {init!r} unknown; one of {INITS}")
    if init == "pretrained" and model.get("pretrained") and model.get("base_workdir"):
        raise ValueError(
            f"model.pretrained ({model.pretrained!r}) and model.base_workdir "
            f"({model.base_workdir!r}) both name a base: set one (model.pretrained='' to train "
            "on a base run)"
        )
    if init == "pretrained" and not (model.get("pretrained") or model.get("base_workdir")):
        raise ValueError(
            "model.init='pretrained' needs model.pretrained (a local diffusers folder, or "
            "packaged:tiny-base) or model.base_workdir (a denoise run); set model.init='random' "
            "to train on random weights"
        )
    return init


def _prediction(config: Any) -> dict:
    pred = config.noise.get("prediction_type")
    return {"prediction_type": pred} if pred else {}


# -- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Splits:
    """Built TFDS folders per split, the embedding table and the tokenizer."""

    data_dirs: dict[str, str]
    embeddings: dict[str, np.ndarray]
    tokenizer: Any
    resolution: int | None


def _build(source_dir: str, out_dir: str, split: str, resolution: int | None, skip: bool) -> str:
    report = os.path.join(out_dir, DATASET, sage.VERSION, sage.REPORT)
    if not os.path.isfile(report):
        sage.build_data(
            source_dir, out_dir, resolution=resolution, skip_bad=skip, name=DATASET, split=split
        )
    return out_dir


def _toy_splits(config: Any, root: str) -> tuple[str, dict[str, str], str]:
    users = config.data.get("users_csv") or toy_world.default_users_csv()
    toy_cfg = toy_world.ToyWorldConfig(**dict(config.data.get("toy", {})))
    world = os.path.join(root, f"sage-mini-{_key(dataclasses.asdict(toy_cfg), users)}")
    process_zero_first(lambda: toy_world.ensure_toy_world(world, users, toy_cfg), "toy_world")
    splits = {s: os.path.join(world, s) for s in ("train", "test_seen", "test_unseen")}
    return world, splits, os.path.join(world, "users.csv")


def toy_world_dir(config: Any) -> str:
    """The Sage-mini folder of a ``data.source="toy"`` config (generated if absent)."""
    if config.data.source != "toy":
        raise ValueError(f"data.source is {config.data.source!r}, not the toy world")
    return _toy_splits(config, cache_root(config))[0]


def prepare_data(config: Any, models: BaseModels) -> Splits:
    """Build (or reuse) the TFDS splits, embeddings and tokenizer a run needs."""
    root = cache_root(config)
    data = config.data
    if not data.source or not data.embeddings:
        raise ValueError(
            "set --config.data.source (a Sage-format folder, or 'toy') and "
            "--config.data.embeddings (an embed-profiles folder, or 'minilm')"
        )
    resolution = data.get("resolution")
    wanted = [data.train_split] + ([data.eval_split] if data.get("eval_split") else [])
    if data.source == "toy":
        world, sources, users_csv = _toy_splits(config, root)
        tag = os.path.basename(world)
    else:
        world = os.path.abspath(os.path.expanduser(data.source))
        sources = sage.find_splits(world, data.train_split)
        users_csv = data.get("users_csv")
        tag = f"src-{_key(world)}"
    data_dirs = {}
    for split in wanted:
        if split not in sources:
            raise FileNotFoundError(f"split {split!r} not in {world} (has {sorted(sources)})")
        out = os.path.join(root, "tfds", tag, f"{split}-r{resolution}")
        data_dirs[split] = process_zero_first(
            lambda s=sources[split], o=out, n=split: _build(s, o, n, resolution, data.skip_bad),
            f"build:{split}",
        )
    embeddings = _embeddings(config, root, users_csv)
    tokenizer = models.tokenizer
    if tokenizer is None:
        tokenizer = process_zero_first(lambda: _toy_tokenizer(config, root, sources), "tok")
    return Splits(data_dirs, embeddings, tokenizer, resolution)


def _embeddings(config: Any, root: str, users_csv: str | None) -> dict[str, np.ndarray]:
    spec = config.data.embeddings
    if spec != "minilm":
        return embed.load_embeddings(os.path.expanduser(spec))
    if not users_csv:
        raise ValueError("data.embeddings='minilm' needs data.users_csv (the users to embed)")
    with open(users_csv, "rb") as f:
        out = os.path.join(
            root, "embeddings", f"minilm-{hashlib.sha256(f.read()).hexdigest()[:12]}"
        )

    def make() -> None:
        if not os.path.isfile(os.path.join(out, embed.MANIFEST)):
            embed.embed_profiles(users_csv, "minilm", out)

    process_zero_first(make, "embeddings")
    return embed.load_embeddings(out)


def _toy_tokenizer(config: Any, root: str, sources: dict[str, str]) -> Any:
    """Word tokenizer over every caption of the world (train and held-out prompts)."""
    captions = set()
    for folder in sources.values():
        with open(os.path.join(folder, sage.METADATA), encoding="utf-8") as f:
            captions.update(json.loads(line)["caption"] for line in f if line.strip())
    length = int(config.model.text_encoder.max_position_embeddings)
    out = os.path.join(root, "tokenizers", f"words-{_key(sorted(captions), length)}")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return load_tokenizer(out)
    tok = build_word_tokenizer(sorted(captions), max_length=length)
    vocab = int(config.model.text_encoder.vocab_size)
    if len(tok.get_vocab()) > vocab:
        raise ValueError(f"toy vocabulary has {len(tok.get_vocab())} words > vocab_size {vocab}")
    tmp = f"{out}.tmp-{os.getpid()}"
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:
        pass  # another process saved the same tokenizer first
    return load_tokenizer(out)


def open_caches(config: Any, models: BaseModels, splits: Splits, split: str, with_vae: bool = True):
    """Encoder caches of one split (built on first use, reused after); ``with_vae=False``:
    text only (the loader then decodes pixels)."""
    layer = config.model.get("text_layer", "last")

    def build() -> dict:
        return cache_lib.build_caches(
            splits.data_dirs[split],
            DATASET,
            split,
            text_encoder=models.text_encoder,
            tokenizer=splits.tokenizer,
            vae=models.vae if with_vae else None,
            text_layer=layer,
            resolution=splits.resolution,
        )

    manifest = process_zero_first(build, f"caches:{split}")
    return cache_lib.load_caches(manifest["path"])


def make_loader(
    config: Any,
    splits: Splits,
    split: str,
    caches: Any,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> SageLoader:
    """This process's loader: ``batch_size`` is the global batch, split over processes."""
    if batch_size % jax.process_count():
        raise ValueError(f"batch {batch_size} does not split over {jax.process_count()} processes")
    data = config.data
    return SageLoader(
        splits.data_dirs[split],
        DATASET,
        split,
        batch_size=batch_size // jax.process_count(),
        seed=seed,
        embeddings=splits.embeddings,
        resolution=splits.resolution,
        flip=data.get("flip", True),
        # Runs saved before data.flip_pair existed flipped their pairs jointly.
        flip_pair=data.get("flip_pair", "joint"),
        caption_dropout=data.get("caption_dropout", 0.0),
        shuffle=shuffle,
        num_epochs=num_epochs,
        num_threads=data.get("num_threads", 2),
        caches=caches,
        decode_pixels=caches.moments is None,
    )
