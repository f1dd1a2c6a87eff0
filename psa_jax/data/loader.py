"""Sage pairs for training: a grain pipeline over a ``build-data`` dataset, host-local batches.

Order of operations, per process::

    records[process_index::process_count]       # disjoint shards that together cover the data
      -> shuffle (seed; reshuffled every epoch) -> repeat (num_epochs, None = forever)
      -> decode PNG -> float32 [-1, 1] HWC, random h-flip: one for the pair (flip_pair="joint")
         or one per image ("independent", as PSAlign's per-image transform)
      -> caption dropout ("" with probability p)
      -> batch (per-process batch size, drop remainder) -> profile embeddings by user id

With ``caches`` (:mod:`psa_jax.data.cache`) each record also gets its precomputed VAE moments (the
row of its flip orientation) and text states (the empty prompt's where its caption dropped), and
``decode_pixels=False`` skips the PNG decode altogether.

The flip and dropout draws come from ``(seed, record index, epoch)`` alone, so a record gets the
same augmentation whatever batch, shard or thread it lands in, and a restored iterator replays
exactly. Iterator state is grain's (``{"next_index": k}``) plus the settings it depends on, all
JSON, for checkpointing next to the train state. Batches stay numpy on the host;
``make_global_batch`` turns them into sharded ``jax.Array``s. No TensorFlow anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np

from psa_jax.core.errors import PsaJaxError
from psa_jax.data.cache import CacheTables
from psa_jax.data.records import decode_image, open_source, split_user_ids
from psa_jax.data.records import text as _text

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
_ARRAY_KEYS = (
    "chosen",
    "rejected",
    "chosen_moments",
    "rejected_moments",
    "text_states",
    "text_pooled",
    "time_ids",
)


class MissingUserEmbeddingError(PsaJaxError, LookupError):
    """A record's user has no profile embedding; PSAlign silently used zeros, we refuse."""


def augment_draws(seed: int, index: int, epoch: int, caption_dropout: float) -> tuple[bool, bool]:
    """``(flip, drop_caption)`` for one record in one epoch: a pure function of its arguments."""
    rng = np.random.default_rng([seed, index, epoch])
    u_flip, u_drop = rng.random(2)  # two draws always, so p does not change the flips
    return bool(u_flip < 0.5), bool(u_drop < caption_dropout)


FLIP_PAIRS = ("joint", "independent")


def rejected_flip_draw(seed: int, index: int, epoch: int) -> bool:
    """The rejected image's own flip (``flip_pair="independent"``): the third draw of the
    stream whose first two :func:`augment_draws` uses, so the chosen image's flip and the
    caption dropout are the same under either setting."""
    return bool(np.random.default_rng([seed, index, epoch]).random(3)[2] < 0.5)


def lookup_embeddings(user_ids: np.ndarray, table: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[B, D]`` float32 profile embeddings for ``user_ids``; a missing user is an error."""
    missing = sorted({str(u) for u in user_ids if str(u) not in table})
    if missing:
        raise MissingUserEmbeddingError(
            f"no profile embedding for user id(s) {missing} ({len(table)} users in the table)"
        )
    return np.stack([np.asarray(table[str(u)], np.float32) for u in user_ids])


class SageLoader:
    """Deterministic, resumable, per-process iterator of Sage batches (dicts of numpy arrays).

    Keys: ``chosen``, ``rejected`` (``[B, H, W, 3]`` float32 in [-1, 1]), ``caption``,
    ``user_id``, ``category`` (``[B]`` str), ``user_embeds`` (``[B, D]`` float32), ``index``
    (``[B]`` int64, the record's line in ``metadata.jsonl`` - 1), ``epoch`` (``[B]`` int64).

    ``resolution`` resizes + center-crops any image not already square at that size (None: the
    dataset must already hold one size). ``embeddings`` maps user id -> ``[D]`` array.
    ``get_state()`` after k batches, ``set_state()`` on a fresh loader with the same settings:
    its next batch is batch k+1 of the uninterrupted run.

    ``caches`` (``load_caches``) adds ``text_states`` ``[B, L, D]``, ``text_pooled`` ``[B, D']``,
    SDXL's ``time_ids`` ``[B, 6]`` (an SDXL cache's :attr:`~CacheTables.time_ids`) and, unless
    the cache is pixel-space, ``chosen_moments``/``rejected_moments`` ``[B, h, w, 2 * latent]``
    (NHWC, mean then logvar). Every record's stored image bytes and caption are checked against
    the cache's hashes as it is read, so a stale cache fails loudly.
    ``decode_pixels=False`` (needs latent caches) leaves ``chosen``/``rejected`` out.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        name: str,
        split: str,
        batch_size: int,
        seed: int,
        embeddings: Mapping[str, np.ndarray],
        resolution: int | None = None,
        flip: bool = True,
        caption_dropout: float = 0.0,
        process_index: int | None = None,
        process_count: int | None = None,
        *,
        flip_pair: str = "joint",
        shuffle: bool = True,
        num_epochs: int | None = None,
        num_threads: int = 4,
        prefetch: int = 4,
        caches: CacheTables | None = None,
        decode_pixels: bool = True,
    ) -> None:
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if flip_pair not in FLIP_PAIRS:
            raise ValueError(f"flip_pair must be one of {FLIP_PAIRS}, got {flip_pair!r}")
        dims = {np.shape(v) for v in embeddings.values()}
        if len(dims) > 1:
            raise ValueError(f"profile embeddings of different shapes: {sorted(dims)}")
        self.batch_size, self.seed, self.resolution = batch_size, seed, resolution
        self.flip, self.flip_pair, self.caption_dropout = flip, flip_pair, caption_dropout
        self._embeddings = dict(embeddings)
        self._source = open_source(data_dir, name, split)
        self._data_dir, self._name, self._split = os.fspath(data_dir), name, split
        self.num_records = len(self._source)
        self.caches, self.decode_pixels = caches, decode_pixels
        if not decode_pixels and (caches is None or caches.moments is None):
            raise ValueError("decode_pixels=False needs caches with VAE moments")
        if caches is not None:
            want = {"name": name, "split": split, "num_records": self.num_records}
            want["resolution"] = resolution
            have = {k: caches.manifest["dataset"].get(k) for k in want}
            if have != want:
                raise ValueError(f"cache {caches.path} is for {have}, this loader reads {want}")
        self.shard_size = len(range(self.process_index, self.num_records, self.process_count))
        if self.shard_size < batch_size:
            raise ValueError(
                f"{name}/{split}: shard {self.process_index}/{self.process_count} has "
                f"{self.shard_size} records, fewer than one batch of {batch_size}"
            )
        ds = grain.MapDataset.range(self.process_index, self.num_records, self.process_count)
        if shuffle:
            ds = ds.shuffle(seed=seed)  # grain reshuffles with seed + epoch past each epoch
        ds = ds.repeat(num_epochs).map_with_index(self._load)
        ds = ds.batch(batch_size, drop_remainder=True, batch_fn=self._collate)
        self._dataset = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        )
        self._iterator: grain.DatasetIterator | None = None

    def user_ids(self) -> list[str]:
        """Every distinct user of this split (the whole split, not this process's shard: every
        process gets the same list)."""
        return split_user_ids(self._data_dir, self._name, self._split, self._source)

    def _load(self, position: int, record_index: int) -> dict[str, Any]:
        """One record: position counts over epochs in this shard, record_index is storage order."""
        rec = self._source[record_index]
        epoch = position // self.shard_size
        index = int(rec["index"])
        flip, drop = augment_draws(self.seed, index, epoch, self.caption_dropout)
        flips = {"chosen": self.flip and flip}
        if self.flip_pair == "joint":  # both images of the pair mirrored alike
            flips["rejected"] = flips["chosen"]
        else:  # PSAlign's SageDataset transforms (and flips) each image on its own
            flips["rejected"] = self.flip and rejected_flip_draw(self.seed, index, epoch)
        caption = _text(rec["caption"])
        item = {
            "caption": "" if drop else caption,
            "user_id": _text(rec["user_id"]),
            "category": _text(rec["category"]),
            "index": index,
            "epoch": epoch,
        }
        for key in ("chosen", "rejected") if self.decode_pixels else ():
            image = decode_image(rec[key], self.resolution)
            item[key] = image[:, ::-1] if flips[key] else image
        if self.caches is not None:
            item.update(self._cached(rec, index, caption, flips, drop))
        return item

    def _cached(
        self,
        rec: Mapping[str, Any],
        index: int,
        caption: str,
        flips: Mapping[str, bool],
        drop: bool,
    ) -> dict[str, np.ndarray]:
        """The cache rows of one record, after checking they were computed from this record."""
        c = self.caches
        pos = c.position(index)
        rows = {"chosen": int(c.chosen_row[pos]), "rejected": int(c.rejected_row[pos])}
        text_row = int(c.caption_row[pos])
        stale = [
            k
            for k, r in rows.items()
            if hashlib.sha256(rec[k]).digest() != c.image_sha256[r].tobytes()
        ]
        if c.captions[text_row] != caption:
            stale.append("caption")
        if stale:
            raise ValueError(f"cache {c.path} is stale: record {index} has another {stale}")
        text_row = c.EMPTY_ROW if drop else text_row
        out = {"text_states": c.text_states[text_row], "text_pooled": c.text_pooled[text_row]}
        if c.time_ids is not None:  # SDXL: one size conditioning for every stored image
            out["time_ids"] = c.time_ids
        if c.moments is not None:
            for key, row in rows.items():
                out[f"{key}_moments"] = c.moments[row, int(flips[key])]
        return out

    def _collate(self, items: list[dict[str, Any]]) -> Batch:
        arrays = [k for k in _ARRAY_KEYS if k in items[0]]
        shapes = {it[k].shape for it in items for k in ("chosen", "rejected") if k in it}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)}: pass resolution=")
        batch: Batch = {
            k: np.asarray(np.stack([it[k] for it in items]), np.float32) for k in arrays
        }
        for k in ("caption", "user_id", "category"):
            batch[k] = np.array([it[k] for it in items], dtype=object)
        for k in ("index", "epoch"):
            batch[k] = np.array([it[k] for it in items], dtype=np.int64)
        batch["user_embeds"] = lookup_embeddings(batch["user_id"], self._embeddings)
        return batch

    # -- iteration and checkpointing ------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_records": self.num_records,
        }

    def __iter__(self) -> SageLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: grain's iterator state plus the settings it is valid for."""
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        return {"grain": self._iterator.get_state(), **self._settings()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from ``get_state``) of a loader with the same settings."""
        mismatched = {
            k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v
        }
        if mismatched:
            raise ValueError(f"loader state is for other settings, (state, loader): {mismatched}")
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        self._iterator.set_state(state["grain"])


def make_global_batch(
    local_batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    partition_spec: jax.sharding.PartitionSpec,
) -> dict[str, Any]:
    """Host-local numpy batch -> global ``jax.Array``s sharded by ``partition_spec`` on ``mesh``.

    Every process passes its own rows; the global batch is their concatenation along axis 0
    (``jax.make_array_from_process_local_data``). String fields (captions, user ids) cannot live
    on devices: they are returned unchanged, host-local, for tokenisation or logging.
    """
    sharding = jax.sharding.NamedSharding(mesh, partition_spec)
    out: dict[str, Any] = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OUS":
            out[key] = value
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
