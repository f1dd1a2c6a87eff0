"""A run's data, prepared once and cached: built TFDS splits, profile embeddings, tokenizer,
frozen-encoder caches and the loader.

``config.data.source="toy"`` generates the synthetic Sage-mini world into the cache directory
(``$PSA_JAX_CACHE`` or ``~/.cache/psa_jax``) and builds it; any other ``source`` is a
Sage-format folder (``metadata.jsonl`` + images) or a folder already built by ``build-data``.
Profile embeddings (``config.data.embeddings``): ``"minilm"`` computes them offline for the
world's users (cached), ``"npy:DIR"`` imports PSAlign's ``<id>.npy`` files for
``data.users_csv`` (cached), else a folder written by ``embed-profiles``. Every step is keyed by its
inputs and reused; process 0 prepares first, the others then find (or, without a shared file
system, rebuild) the same files. The frozen models (``psa_jax.models.loading.BaseModels``) come
in as arguments: their text encoder and VAE fill the caches, their tokenizer (if any) is used.

All of it is local, never ``gs://`` (a :class:`~psa_jax.core.paths.RemotePathError` says so up
front): the encoder caches are memory-mapped, tokenizers and images are read as local files,
and each host of a pod prepares its own copy, so a local disk per host is what it needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from psa_jax.core import paths
from psa_jax.core.parallel import process_zero_first
from psa_jax.data import cache as cache_lib
from psa_jax.data import embed, sage, toy_scenes, toy_world
from psa_jax.data.embed_format import MANIFEST
from psa_jax.data.loader import SageLoader
from psa_jax.data.tokenizer import build_word_tokenizer, load_tokenizer

CACHE_ENV = "PSA_JAX_CACHE"
DATASET = "sage"
_LOCAL_DATA = ("caches are memory-mapped and data read as local files (each host prepares its "
               "own copy)")  # fmt: skip


def cache_root(config: Any) -> str:
    root = config.data.cache_dir or os.environ.get(CACHE_ENV)
    where = "data.cache_dir" if config.data.cache_dir else f"${CACHE_ENV}"
    paths.require_local(root or "", where, _LOCAL_DATA)
    return os.path.abspath(os.path.expanduser(root or "~/.cache/psa_jax"))


def _require_local_inputs(data: Any) -> None:
    """data.source, data.users_csv and data.embeddings name local files (module docstring)."""
    embeddings = data.embeddings.removeprefix("npy:")
    for key, value in (("source", data.source), ("users_csv", data.users_csv),
                       ("embeddings", embeddings)):  # fmt: skip
        paths.require_local(value or "", f"data.{key}", _LOCAL_DATA)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass
class Splits:
    """Built TFDS folders per split, the embedding table and the tokenizer."""

    data_dirs: dict[str, str]
    embeddings: dict[str, np.ndarray]
    tokenizer: Any
    resolution: int | None
    users_csv: str | None = None  # the users file (profiles, banned categories), if known


def _build(source_dir: str, out_dir: str, split: str, resolution: int | None, skip: bool) -> str:
    report = os.path.join(out_dir, DATASET, sage.VERSION, sage.REPORT)
    if not os.path.isfile(report):
        sage.build_data(
            source_dir, out_dir, resolution=resolution, skip_bad=skip, name=DATASET, split=split
        )
    return out_dir


def _toy_splits(config: Any, root: str) -> tuple[str, dict[str, str], str]:
    users = config.data.users_csv or toy_world.default_users_csv()
    toy_cfg = toy_scenes.ToyWorldConfig(**dict(config.data.toy))
    # Keyed by the users file's content, not its path: another checkout reuses the same world.
    digest = toy_world.file_sha256(users)
    world = os.path.join(root, f"sage-mini-{_key(dataclasses.asdict(toy_cfg), digest)}")
    process_zero_first(lambda: toy_world.ensure_toy_world(world, users, toy_cfg), "toy_world")
    splits = {s: os.path.join(world, s) for s in ("train", "test_seen", "test_unseen")}
    return world, splits, os.path.join(world, "users.csv")


def toy_world_dir(config: Any) -> str:
    """The Sage-mini folder of a ``data.source="toy"`` config (generated if absent)."""
    if config.data.source != "toy":
        raise ValueError(f"data.source is {config.data.source!r}, not the toy world")
    return _toy_splits(config, cache_root(config))[0]


def _sources(config: Any, root: str) -> tuple[str, dict[str, str], str | None, str]:
    """The world folder, its split folders, the users CSV and the TFDS cache tag."""
    data = config.data
    if data.source == "toy":
        world, sources, users_csv = _toy_splits(config, root)
        return world, sources, users_csv, os.path.basename(world)
    world = os.path.abspath(os.path.expanduser(data.source))
    sources = sage.find_splits(world, data.train_split)
    return world, sources, data.users_csv, f"src-{_key(world)}"


def prepare_data(config: Any, models: Any, *, build_splits: bool = True) -> Splits:
    """Build (or reuse) the TFDS splits, embeddings and tokenizer a run needs.

    ``build_splits=False``: the embeddings and tokenizer only (``data_dirs`` empty), for what
    reads no training examples (sampling); nothing is built or checked for the TFDS splits."""
    root = cache_root(config)
    data = config.data
    if not data.source or not data.embeddings:
        raise ValueError(
            "set --config.data.source (a Sage-format folder, or 'toy') and "
            "--config.data.embeddings (an embed-profiles folder, 'minilm' or 'npy:DIR')"
        )
    _require_local_inputs(data)
    resolution = data.resolution
    wanted = [data.train_split] + ([data.eval_split] if data.eval_split else [])
    world, sources, users_csv, tag = _sources(config, root)
    data_dirs = {}
    for split in wanted if build_splits else ():
        if split not in sources:
            raise FileNotFoundError(f"split {split!r} not in {world} (has {sorted(sources)})")
        out = os.path.join(root, "tfds", tag, f"{split}-r{resolution}")
        data_dirs[split] = process_zero_first(
            lambda s=sources[split], o=out, n=split: _build(s, o, n, resolution, data.skip_bad),
            f"build:{split}",
        )
    embeddings = _embeddings(config, root, users_csv)
    tokenizer = _tokenizer(config, models, root, sources)
    return Splits(data_dirs, embeddings, tokenizer, resolution, users_csv or None)


def prepare_tokenizer(config: Any, models: Any) -> Any:
    """The tokenizer :func:`prepare_data` gives a run (its base's, else the word tokenizer of
    its world's captions), without the splits or embeddings (a base pipeline's export)."""
    if models.tokenizer is not None:
        return models.tokenizer
    root = cache_root(config)
    return _tokenizer(config, models, root, _sources(config, root)[1])


def _tokenizer(config: Any, models: Any, root: str, sources: dict[str, str]) -> Any:
    if models.tokenizer is not None:
        return models.tokenizer
    return process_zero_first(lambda: _toy_tokenizer(config, root, sources), "tok")


def _embeddings(config: Any, root: str, users_csv: str | None) -> dict[str, np.ndarray]:
    """``data.embeddings``: an embed-profiles folder as it is, or ``"minilm"`` / ``"npy:DIR"``
    (PSAlign's ``<id>.npy`` files) made into one for ``data.users_csv`` under the cache root,
    keyed by the users file (and the ``.npy`` files' names and bytes) and reused."""
    spec = config.data.embeddings
    npy = spec.startswith("npy:")
    if spec != "minilm" and not npy:
        return embed.load_embeddings(os.path.expanduser(spec))
    if not users_csv:
        raise ValueError(f"data.embeddings={spec!r} needs data.users_csv (the users to embed)")
    h = hashlib.sha256()
    with open(users_csv, "rb") as f:
        h.update(f.read())
    if npy:
        folder = os.path.abspath(os.path.expanduser(spec[len("npy:") :]))
        spec = f"npy:{folder}"
        names = os.listdir(folder) if os.path.isdir(folder) else []  # else: named by npy:
        for name in sorted(n for n in names if n.endswith(".npy")):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"|" + f.read())
    out = os.path.join(root, "embeddings", f"{'npy' if npy else 'minilm'}-{h.hexdigest()[:12]}")

    def make() -> None:
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            embed.embed_profiles(users_csv, spec, out)

    process_zero_first(make, "embeddings")
    return embed.load_embeddings(out)


def open_tokenizer(path: str | os.PathLike) -> Any:
    """:func:`~psa_jax.data.tokenizer.load_tokenizer` (a tokenizer folder, or a pipeline folder
    holding ``tokenizer/``), the same object, but a plain ``tokenizer.json`` tokenizer (class
    ``PreTrainedTokenizerFast``/``TokenizersBackend``: the toy world's word tokenizer, the tiny
    base's) is opened with that class directly: ``AutoTokenizer`` first reads a model config, and
    that import pulls in torch (1-2 s of every ``sample``). Any other folder (CLIP's BPE, a
    model config or custom code beside it) goes through ``load_tokenizer`` as before."""
    folder = os.fspath(path)
    nested = os.path.join(folder, "tokenizer")
    if os.path.isdir(nested) and not _tokenizer_files(folder):  # the folder load_tokenizer picks
        folder = nested
    if _plain_tokenizer(folder):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return load_tokenizer(path)


def _has(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name))


def _tokenizer_files(folder: str) -> bool:
    return _has(folder, "tokenizer.json") or (
        _has(folder, "vocab.json") and _has(folder, "merges.txt")
    )


def _plain_tokenizer(folder: str) -> bool:
    """``tokenizer.json`` whose ``tokenizer_config.json`` names the plain fast class, with no
    model config or custom code beside it: what ``AutoTokenizer`` opens as that class."""
    if not (_has(folder, "tokenizer.json") and _has(folder, "tokenizer_config.json")):
        return False
    if _has(folder, "config.json"):
        return False
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError:  # load_tokenizer reports a broken file its own way
        return False
    from transformers import PreTrainedTokenizerFast

    plain = {"PreTrainedTokenizerFast", PreTrainedTokenizerFast.__name__}  # v5: an alias
    return isinstance(cfg, dict) and cfg.get("tokenizer_class") in plain and "auto_map" not in cfg


def _toy_tokenizer(config: Any, root: str, sources: dict[str, str]) -> Any:
    """Word tokenizer over every caption of the world (train and held-out prompts)."""
    captions = set()
    for folder in sources.values():
        with open(os.path.join(folder, sage.METADATA), encoding="utf-8") as f:
            captions.update(json.loads(line)["caption"] for line in f if line.strip())
    length = int(config.model.text_encoder.max_position_embeddings)
    out = os.path.join(root, "tokenizers", f"words-{_key(sorted(captions), length)}")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return open_tokenizer(out)
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
    return open_tokenizer(out)


def open_caches(config: Any, models: Any, splits: Splits, split: str, with_vae: bool = True):
    """Encoder caches of one split (built on first use, reused after); ``with_vae=False``:
    text only (the loader then decodes pixels).

    SDXL (``models.text_encoder_2`` set): both encoders' states, encoder 2's pooled text and the
    size ``time_ids``; the empty prompt that caption dropout uses is all zeros when the base
    folder says ``force_zeros_for_empty_prompt`` (SDXL base 1.0 does), as the sampler's
    unconditional branch and as SDXL itself was trained (its conditioner zeroes a dropped
    embedding), not the encoded ``""`` of PSAlign's and diffusers' SDXL training scripts."""
    layer = config.model.text_layer
    text_2 = models.text_encoder_2
    zeros = text_2 is not None and models.force_zeros_for_empty_prompt

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
            text_encoder_2=text_2,
            tokenizer_2=models.tokenizer_2 if text_2 is not None else None,
            empty_prompt="zeros" if zeros else "encoded",
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
        flip=data.flip,
        flip_pair=data.flip_pair,
        caption_dropout=data.caption_dropout,
        shuffle=shuffle,
        num_epochs=num_epochs,
        num_threads=data.num_threads,
        caches=caches,
        decode_pixels=caches.moments is None,
    )
