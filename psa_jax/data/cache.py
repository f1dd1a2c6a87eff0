"""Frozen-encoder caches for a built Sage split: VAE latent moments and text encoder states.

The VAE and text encoder never train, so their outputs are computed once per dataset and read
back by :class:`psa_jax.data.loader.SageLoader` (``caches=``) instead of being recomputed every
step. Layout, next to the TFDS files (a rebuilt dataset deletes its caches with it)::

    <data_dir>/<name>/<version>/caches/<split>/
      <text[:12]>-<vae[:12] | "pixels">[-pen][-r<res>][-zeros]/
        manifest.json        what it was built from (checksums, fingerprint) + counts, shapes
                             (+ SDXL's size conditioning ``time_ids``)
        text_states.npy      [T, L, D] float32; row 0 is the empty prompt (caption dropout)
        text_pooled.npy      [T, D] float32 (text_embeds with a projection, else pooled)
        captions.json        the T prompts, row order
        image_sha256.npy     [U, 32] uint8, content hash of each unique stored PNG
        moments.npy          [U, 2, h, w, 2 * latent] float32, NHWC: (mean, clamped logvar);
                             axis 1 = orientation (0 original, 1 horizontally flipped). No file
                             for pixel-space configs (vae=None)
        record_index.npy     [N] int64, sorted ``index`` feature of every record, and aligned
        chosen_row.npy, rejected_row.npy, caption_row.npy   [N] int32 rows into the tables

SDXL (two text encoders): ``text_states`` are both encoders' penultimate states side by side
(``D = D1 + D2``), ``text_pooled`` encoder 2's projected ``text_embeds``, and ``<text[:12]>``
hashes both encoders' checksums (each is in the manifest, with its tokenizer's). ``-zeros``: the
empty prompt's row is all zeros (``force_zeros_for_empty_prompt``), not the encoded ``""``.

Images are deduplicated by the hash of their stored bytes (the toy world shares one image among
hundreds of users) and encoded in both orientations, because a VAE is not flip-equivariant: the
loader's random flip then picks a row instead of approximating ``flip(encode(x))``. ``-pen`` marks
``text_layer="penultimate"`` and ``-r<res>`` a ``resolution`` resize, so settings never share a
folder. A folder is reused only when its manifest matches the dataset (a hash over every record's
index, image hashes and caption), the encoders (params + config) and the tokenizer; anything else
rebuilds it, with a warning. Folders are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from psa_jax.data.records import decode_image, open_source
from psa_jax.data.sage import VERSION
from psa_jax.data.tokenizer import tokenize

FORMAT = 1
MANIFEST = "manifest.json"
TEXT_LAYERS = ("last", "penultimate")
EMPTY_PROMPTS = ("encoded", "zeros")
_ARRAYS = ("text_states", "text_pooled", "image_sha256", "record_index")
_ROWS = ("chosen_row", "rejected_row", "caption_row")
log = logging.getLogger(__name__)


def _sha256(*chunks: bytes | str) -> str:
    h = hashlib.sha256()
    for c in chunks:
        b = c.encode("utf-8") if isinstance(c, str) else c
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: no ambiguous joins
    return h.hexdigest()


def params_checksum(params: Any) -> str:
    """sha256 over sorted (leaf path, shape, dtype, bytes): equal params <=> equal checksum,
    in any process and whatever the dict insertion order, so it can name a cache on disk."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    h = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        head = f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype.str}|{a.dtype.name}|{a.nbytes}"
        h.update(head.encode() + a.tobytes())
    return h.hexdigest()


def encoder_checksum(model: Any) -> str:
    """Checksum of a model wrapper (``FlaxCLIPTextModel``, ``FlaxAutoencoderKL``): params plus
    config and dtype, since the same weights under another config give other outputs."""
    projection = getattr(model, "with_projection", None)
    return _sha256(
        params_checksum(model.params), repr(model.config), str(model.dtype), repr(projection)
    )


def tokenizer_checksum(tokenizer: Any) -> str:
    """Hash of the vocabulary, special tokens and max length (the ids of the actual captions
    are hashed into the manifest too, which covers merges and normalisation)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return _sha256(json.dumps(vocab), json.dumps(special), str(tokenizer.model_max_length))


@dataclasses.dataclass(frozen=True, eq=False)
class CacheTables:
    """A loaded cache: numpy arrays (memory-mapped ``.npy``) plus the manifest.

    ``moments`` is None for pixel-space caches. ``position(index)`` finds a record's row in the
    aligned ``record_index``/``*_row`` arrays.
    """

    path: str
    manifest: dict[str, Any]
    captions: tuple[str, ...]
    text_states: np.ndarray
    text_pooled: np.ndarray
    image_sha256: np.ndarray
    moments: np.ndarray | None
    record_index: np.ndarray
    chosen_row: np.ndarray
    rejected_row: np.ndarray
    caption_row: np.ndarray

    EMPTY_ROW = 0  # the empty prompt's text row

    @property
    def time_ids(self) -> np.ndarray | None:
        """SDXL's ``[6]`` float32 size conditioning of every record (original H, W, crop top,
        left, target H, W), or None for a one-encoder cache. The stored images were resized
        and center-cropped when the dataset was built, so it is (H, W, 0, 0, H, W) of them,
        as PSAlign's SDXL training and diffusers' sampling default."""
        ids = self.manifest.get("time_ids")
        return None if ids is None else np.asarray(ids, np.float32)

    def position(self, index: int) -> int:
        """Row of record ``index`` in the per-record arrays; KeyError if the cache lacks it."""
        pos = int(np.searchsorted(self.record_index, index))
        if pos >= len(self.record_index) or self.record_index[pos] != index:
            raise KeyError(f"record index {index} is not in the cache {self.path}")
        return pos


def load_caches(path: str | os.PathLike, *, mmap: bool = True) -> CacheTables:
    """Open a cache folder (or its ``manifest.json``); arrays are memory-mapped unless ``mmap``
    is False, so a many-GB latent table costs no RAM until rows are read."""
    path = os.fspath(path)
    folder = os.path.dirname(path) if os.path.basename(path) == MANIFEST else path
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: cache format {manifest.get('format')}, expected {FORMAT}")
    with open(os.path.join(folder, "captions.json"), encoding="utf-8") as f:
        captions = tuple(json.load(f))

    def npy(name: str) -> np.ndarray:
        return np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r" if mmap else None)

    moments = npy("moments") if manifest["vae"] is not None else None
    arrays = {k: npy(k) for k in _ARRAYS + _ROWS}
    return CacheTables(folder, manifest, captions, moments=moments, **arrays)


# -- encoding ------------------------------------------------------------------------------------


def _encode_images(vae: Any, images: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``[B, H, W, 3]`` -> NCHW (mean, clamped logvar), on device: the jitted public ``encode``."""
    post = vae.encode(np.transpose(images, (0, 3, 1, 2)))
    return post.mean, post.logvar


def _moments_nhwc(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    return np.transpose(np.concatenate([mean, logvar], axis=1), (0, 2, 3, 1)).astype(np.float32)


def encode_text(text_encoder: Any, ids: np.ndarray, layer: str) -> tuple[jax.Array, jax.Array]:
    """``[B, L]`` ids -> (``[B, L, D]`` states of ``layer``, ``[B, D']`` text_embeds or pooled);
    ``layer`` "last" or "penultimate". The caches and the sampler condition on the same text."""
    out = text_encoder(ids)
    states = out.last_hidden_state if layer == "last" else out.hidden_states[-2]
    return states, out.text_embeds if out.text_embeds is not None else out.pooled


def encode_text_pair(
    text_encoder: Any, text_encoder_2: Any, ids: np.ndarray, ids_2: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """SDXL's two encoders, as diffusers' ``StableDiffusionXLPipeline.encode_prompt``: the
    penultimate states of both side by side (``[B, L, D1 + D2]``; the final layer norm is not
    applied there) and encoder 2's projected ``text_embeds`` ``[B, P]`` as the pooled text.
    The caches and the sampler condition on the same text."""
    out, out_2 = text_encoder(ids), text_encoder_2(ids_2)
    if out_2.text_embeds is None:
        raise ValueError("SDXL's second text encoder needs its projection (text_embeds)")
    states = jax.numpy.concatenate([out.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
    return states, out_2.text_embeds


def _chunks(rows: Iterable[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    """Stack ``rows`` into ``[batch, ...]`` chunks (the last one shorter); one shape only."""
    buf: list[np.ndarray] = []
    for row in rows:
        if buf and row.shape != buf[0].shape:
            shapes = sorted({buf[0].shape, row.shape})
            raise ValueError(f"images of different sizes {shapes}: pass resolution=")
        buf.append(row)
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def _run_fixed(
    fn: Callable[[np.ndarray], Any], chunks: Iterable[np.ndarray], batch: int
) -> Iterator[Any]:
    """``fn`` over chunks padded to one ``[batch, ...]`` shape, so one compile serves them all;
    yields each chunk's outputs as float32 numpy, padding removed.

    One call stays in flight: the host prepares (decodes) chunk k+1 while the device runs chunk
    k, and only one chunk of outputs is ever on the device.
    """
    pending: tuple[Any, int] | None = None
    for chunk in chunks:
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, axis=0)])
        result = fn(chunk)  # dispatched asynchronously
        if pending is not None:
            yield jax.tree.map(lambda a, m=pending[1]: np.asarray(a, np.float32)[:m], pending[0])
        pending = (result, n)
    if pending is not None:
        yield jax.tree.map(lambda a, m=pending[1]: np.asarray(a, np.float32)[:m], pending[0])


def _image_rows(source: Any, firsts: list[tuple[int, str]], resolution: int | None) -> Iterator:
    """Decoded unique images, both orientations interleaved: x0, flip(x0), x1, flip(x1), ..."""
    for pos, key in firsts:
        image = decode_image(source[pos][key], resolution)
        yield image
        yield np.ascontiguousarray(image[:, ::-1])


# -- build ---------------------------------------------------------------------------------------


def _scan(source: Any) -> dict[str, Any]:
    """One pass over the split: per-record hashes, unique images (first occurrence) and captions."""
    index, hashes, captions = [], [], []
    image_row: dict[bytes, int] = {}
    firsts: list[tuple[int, str]] = []
    rows = {"chosen": [], "rejected": []}
    for pos in range(len(source)):
        rec = source[pos]
        index.append(int(rec["index"]))
        caption = rec["caption"]
        captions.append(caption.decode("utf-8") if isinstance(caption, bytes) else str(caption))
        for key in ("chosen", "rejected"):
            digest = hashlib.sha256(rec[key]).digest()
            if digest not in image_row:
                image_row[digest] = len(firsts)
                firsts.append((pos, key))
            rows[key].append(image_row[digest])
            hashes.append(digest)
    order = np.argsort(np.asarray(index, np.int64), kind="stable")
    fp = hashlib.sha256()
    for i in order:
        fp.update(f"{index[i]}|".encode() + hashes[2 * i] + hashes[2 * i + 1])
        fp.update(_sha256(captions[i]).encode())
    prompts = ["", *sorted(set(captions) - {""})]
    text_row = {c: r for r, c in enumerate(prompts)}
    return {
        "record_index": np.asarray(index, np.int64)[order],
        "chosen_row": np.asarray(rows["chosen"], np.int32)[order],
        "rejected_row": np.asarray(rows["rejected"], np.int32)[order],
        "caption_row": np.asarray([text_row[c] for c in captions], np.int32)[order],
        "image_sha256": np.frombuffer(b"".join(image_row), np.uint8).reshape(-1, 32),
        "firsts": firsts,
        "prompts": prompts,
        "fingerprint": fp.hexdigest(),
    }


def cache_root(data_dir: str | os.PathLike, name: str, split: str) -> str:
    """``<data_dir>/<name>/<version>/caches/<split>``: every cache of one split lives here."""
    return os.path.join(os.fspath(data_dir), name, VERSION, "caches", split)


def _matches(folder: str, expected: dict[str, Any]) -> bool | None:
    """None: no cache there; True/False: its manifest does / does not match ``expected``."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None if not os.path.exists(folder) else False
    except (OSError, json.JSONDecodeError):
        return False
    return all(manifest.get(k) == v for k, v in expected.items())


def _tokenizer_spec(tokenizer: Any, ids: np.ndarray) -> dict[str, Any]:
    return {
        "checksum": tokenizer_checksum(tokenizer),
        "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
        "length": int(ids.shape[1]),
    }


def _expected(
    name: str, split: str, n: int, scan: dict, ids: np.ndarray, text: Any, tokenizer: Any,
    vae: Any | None, text_layer: str, resolution: int | None, empty_prompt: str,
    sdxl: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """What a cache must have been built from to be reused (JSON-normalised for comparison).
    ``sdxl`` (two encoders): ``text_encoder_2``, ``tokenizer_2``, ``ids_2``, ``time_ids``; the
    keys they fill, and ``empty_prompt`` unless "zeros", are None otherwise (as in the caches
    made before those keys existed, which therefore still match)."""
    vae_spec = None
    if vae is not None:
        vae_spec = {"checksum": encoder_checksum(vae), "config": repr(vae.config)}
    extra = {"text_encoder_2": None, "tokenizer_2": None, "time_ids": None}
    if sdxl is not None:
        enc_2 = sdxl["text_encoder_2"]
        extra = {
            "text_encoder_2": {"checksum": encoder_checksum(enc_2), "config": repr(enc_2.config)},
            "tokenizer_2": _tokenizer_spec(sdxl["tokenizer_2"], sdxl["ids_2"]),
            "time_ids": sdxl["time_ids"],
        }
    extra["empty_prompt"] = None if empty_prompt == "encoded" else empty_prompt
    spec = {
        "format": FORMAT,
        "dataset": {
            "name": name,
            "split": split,
            "version": VERSION,
            "num_records": n,
            "fingerprint": scan["fingerprint"],
            "resolution": resolution,
        },
        "text_encoder": {
            "checksum": encoder_checksum(text),
            "layer": text_layer,
            "config": repr(text.config),
        },
        "tokenizer": _tokenizer_spec(tokenizer, ids),
        "vae": vae_spec,
        **extra,
    }
    return json.loads(json.dumps(spec))


def _write_arrays(
    tmp: str, scan: dict, source: Any, ids: np.ndarray, text: Any, vae: Any | None,
    text_layer: str, resolution: int | None, batch_size: int, empty_prompt: str,
    sdxl: dict[str, Any] | None,
) -> dict[str, list[int]]:  # fmt: skip
    """Run the encoders and write every ``.npy`` into ``tmp``; returns the array shapes."""
    arrays = {k: scan[k] for k in ("image_sha256", "record_index", *_ROWS)}
    batch = max(1, min(batch_size, len(ids)))
    if sdxl is None:
        run_text = lambda x: encode_text(text, x, text_layer)  # noqa: E731
    else:  # both tokenizers' ids side by side in one array, split again for the encoders
        width, enc_2 = ids.shape[1], sdxl["text_encoder_2"]
        ids = np.concatenate([ids, sdxl["ids_2"]], axis=1)
        run_text = lambda x: encode_text_pair(text, enc_2, x[:, :width], x[:, width:])  # noqa: E731
    outs = list(_run_fixed(run_text, _chunks(ids, batch), batch))
    arrays["text_states"] = np.concatenate([o[0] for o in outs])
    arrays["text_pooled"] = np.concatenate([o[1] for o in outs])
    if empty_prompt == "zeros":  # row 0 is the prompt ""
        arrays["text_states"][CacheTables.EMPTY_ROW] = 0.0
        arrays["text_pooled"][CacheTables.EMPTY_ROW] = 0.0
    for k, v in arrays.items():
        np.save(os.path.join(tmp, f"{k}.npy"), v)
    shapes = {k: list(v.shape) for k, v in arrays.items()}
    if vae is not None:  # written chunk by chunk: the table may not fit in RAM
        n = len(scan["firsts"])
        batch = max(1, min(batch_size, 2 * n))
        rows = _chunks(_image_rows(source, scan["firsts"], resolution), batch)
        out, flat, done = None, None, 0
        for mean, logvar in _run_fixed(lambda x: _encode_images(vae, x), rows, batch):
            m = _moments_nhwc(mean, logvar)
            if out is None:  # rows are interleaved x0, flip(x0), x1, ...: a flat view of out
                path = os.path.join(tmp, "moments.npy")
                shape = (n, 2, *m.shape[1:])
                out = np.lib.format.open_memmap(path, "w+", np.float32, shape)
                flat = out.reshape(2 * n, *m.shape[1:])
            flat[done : done + len(m)] = m
            done += len(m)
        out.flush()
        shapes["moments"] = list(out.shape)
        del out, flat
    return shapes


def _sdxl_inputs(
    source: Any, scan: dict, ids: np.ndarray, text_encoder_2: Any, tokenizer_2: Any,
    resolution: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The second encoder, its tokenizer's ids of the prompts, and the stored images' size
    conditioning (H, W, 0, 0, H, W) (every image has the first one's size: see ``_chunks``)."""
    ids_2 = tokenize(tokenizer_2, scan["prompts"])
    if ids_2.shape[1] != ids.shape[1]:
        raise ValueError(
            f"the two tokenizers pad to {ids.shape[1]} and {ids_2.shape[1]} tokens: "
            "SDXL's states are concatenated per token, so the lengths must be equal"
        )
    pos, image_key = scan["firsts"][0]
    h, w = decode_image(source[pos][image_key], resolution).shape[:2]
    return {
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "ids_2": ids_2,
        "time_ids": [h, w, 0, 0, h, w],
    }


def build_caches(
    data_dir: str | os.PathLike,
    name: str,
    split: str,
    *,
    text_encoder: Any,
    tokenizer: Any,
    vae: Any | None = None,
    text_layer: str = "last",
    batch_size: int = 64,
    resolution: int | None = None,
    text_encoder_2: Any | None = None,
    tokenizer_2: Any | None = None,
    empty_prompt: str = "encoded",
) -> dict[str, Any]:
    """Encode a built split once and store the result with the dataset; returns the manifest
    (plus ``"path"``, the cache folder). A matching cache is reused without running an encoder.

    ``vae=None`` (pixel-space configs) stores text only. ``text_layer``: ``"last"`` is
    ``last_hidden_state`` (SD1.x/2.x), ``"penultimate"`` is ``hidden_states[-2]`` (SDXL).
    ``batch_size`` is the fixed encoder batch (rows, padded); ``resolution`` must equal the
    loader's. Run it on one process; the others then ``load_caches(manifest["path"])``.

    SDXL: ``text_encoder_2`` (with its projection) and ``tokenizer_2`` make the text rows
    :func:`encode_text_pair`'s (``text_layer`` must be "penultimate"), and the manifest gets
    the size conditioning ``time_ids`` = (H, W, 0, 0, H, W) of the stored images (see
    :attr:`CacheTables.time_ids`). ``empty_prompt``: row 0, the prompt ``""`` that caption
    dropout uses, is ``"encoded"`` or all ``"zeros"`` (SDXL's ``force_zeros_for_empty_prompt``).
    """
    if text_layer not in TEXT_LAYERS:
        raise ValueError(f"text_layer must be one of {TEXT_LAYERS}, got {text_layer!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if empty_prompt not in EMPTY_PROMPTS:
        raise ValueError(f"empty_prompt must be one of {EMPTY_PROMPTS}, got {empty_prompt!r}")
    if (text_encoder_2 is None) != (tokenizer_2 is None):
        raise ValueError("text_encoder_2 and tokenizer_2 come together (SDXL) or not at all")
    if text_encoder_2 is not None and text_layer != "penultimate":
        raise ValueError(
            "two text encoders (SDXL) condition on their penultimate states: "
            f"text_layer (a config's model.text_layer) must be 'penultimate', got {text_layer!r}"
        )
    start = time.perf_counter()
    source = open_source(data_dir, name, split)
    if len(source) == 0:
        raise ValueError(f"{name}/{split} in {data_dir} has no records")
    scan = _scan(source)
    ids = tokenize(tokenizer, scan["prompts"])
    sdxl = None
    if text_encoder_2 is not None:
        sdxl = _sdxl_inputs(source, scan, ids, text_encoder_2, tokenizer_2, resolution)
    args = (text_encoder, tokenizer, vae, text_layer, resolution, empty_prompt, sdxl)
    expected = _expected(name, split, len(source), scan, ids, *args)
    text_key = expected["text_encoder"]["checksum"]
    if sdxl is not None:
        text_key = _sha256(text_key, expected["text_encoder_2"]["checksum"])
    key = text_key[:12] + "-"
    key += "pixels" if vae is None else expected["vae"]["checksum"][:12]
    key += ("-pen" if text_layer == "penultimate" else "") + (
        f"-r{resolution}" if resolution else ""
    )
    key += "-zeros" if empty_prompt == "zeros" else ""
    root = cache_root(data_dir, name, split)
    final = os.path.join(root, key)
    state = _matches(final, expected)
    if state:
        log.info("reusing cache %s", final)
        return {**load_caches(final).manifest, "path": final}
    if state is False:
        msg = f"cache {final} does not match the dataset/encoders/tokenizer: rebuilding it"
        warnings.warn(msg, stacklevel=2)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
    try:
        shapes = _write_arrays(tmp, scan, source, ids, text_encoder, vae, text_layer, resolution,
                               batch_size, empty_prompt, sdxl)  # fmt: skip
        with open(os.path.join(tmp, "captions.json"), "w", encoding="utf-8") as f:
            json.dump(scan["prompts"], f, ensure_ascii=False)
        counts = {"records": len(source), "images": len(scan["firsts"])}
        counts["captions"] = len(scan["prompts"])
        manifest = {**expected, "counts": counts, "shapes": shapes}
        manifest["build_seconds"] = round(time.perf_counter() - start, 3)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:  # written last
            json.dump(manifest, f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its (equal) cache into place first
            if not _matches(final, expected):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built cache %s in %.1f s: %s", final, manifest["build_seconds"], counts)
    return {**manifest, "path": final}
