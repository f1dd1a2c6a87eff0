"""Fréchet distances between feature statistics, cached reference statistics, and the ``fid``
feature map (Inception-v3 pool features from a local TorchScript file).

The statistics are plain numpy (float64) so that any :class:`~psa_jax.eval.scorers.FeatureMap`
(the Inception network here, the toy world's VAE elsewhere) shares the maths and the cache.
Covariances use ``ddof=1`` like pytorch-fid (PSAlign's ``evaluation/eval.py``) and clean-fid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from psa_jax.eval.scorers import (
    MissingScorerWeightsError,
    ScorerContext,
    ScorerError,
    as_uint8_images,
    register,
)

_STATS_FORMAT = 1  # bump when the .npz layout changes


class FingerprintMismatchError(ScorerError):
    """Statistics on disk were computed by another feature map than the one asked for."""

    def __init__(self, path: str, stored: str, expected: str):
        super().__init__(
            f"{path}: statistics were computed by feature map {stored!r}, not {expected!r}; "
            "recompute them (or delete the file)"
        )
        self.path, self.stored, self.expected = path, stored, expected


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean ``mu`` ``[F]`` and covariance ``sigma`` ``[F, F]`` (float64) of ``n`` feature rows;
    ``fingerprint`` names the feature map that produced them ("" = unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    fingerprint: str = ""

    def __post_init__(self):
        mu = np.asarray(self.mu, np.float64)
        sigma = np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} do not match")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", int(self.n))

    @classmethod
    def from_features(cls, feats: Any, fingerprint: str = "") -> FeatureStats:
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, F]; got {feats.shape}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0], fingerprint)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``.npz`` atomically (temp file in the same folder + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    mu=self.mu,
                    sigma=self.sigma,
                    n=np.int64(self.n),
                    fingerprint=np.str_(self.fingerprint),
                    format=np.int64(_STATS_FORMAT),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None) -> FeatureStats:
        """Read :meth:`save`'s file; with ``fingerprint`` given, a different stored one raises
        :class:`FingerprintMismatchError` (statistics of another network are meaningless)."""
        with np.load(path, allow_pickle=False) as z:
            stats = cls(z["mu"], z["sigma"], int(z["n"]), str(z["fingerprint"]))
        if fingerprint is not None and stats.fingerprint != fingerprint:
            raise FingerprintMismatchError(str(path), stats.fingerprint, fingerprint)
        return stats


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))``.

    ``Tr sqrtm(S_a S_b)`` is taken as the sum of the square roots of the eigenvalues of the
    symmetric PSD ``sqrt(S_a) S_b sqrt(S_a)`` (similar to ``S_a S_b``), which avoids the
    complex/ill-conditioned ``scipy.linalg.sqrtm`` of a non-symmetric product. Tiny negative
    eigenvalues from rounding are clipped to 0.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape} vs {b.mu.shape}")
    s1 = (a.sigma + a.sigma.T) / 2
    s2 = (b.sigma + b.sigma.T) / 2
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = a.mu - b.mu
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    return float(max(fid, 0.0))


class _Moments:
    """Streaming mean/scatter (Chan et al.'s merge), so no feature matrix is kept in memory."""

    def __init__(self):
        self.n, self.mean, self.scatter = 0, None, None

    def add(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, np.float64)
        k = feats.shape[0]
        if k == 0:
            return
        mean = feats.mean(0)
        centred = feats - mean
        scatter = centred.T @ centred
        if self.n == 0:
            self.n, self.mean, self.scatter = k, mean, scatter
            return
        n = self.n + k
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.n * k / n)
        self.mean = self.mean + delta * (k / n)
        self.n = n

    def stats(self, fingerprint: str) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for feature statistics; got {self.n}")
        return FeatureStats(self.mean, self.scatter / (self.n - 1), self.n, fingerprint)


def _batches(images_or_loader: Any, batch_size: int) -> Iterable[np.ndarray]:
    if callable(images_or_loader):  # a zero-argument loader factory: only called when needed
        images_or_loader = images_or_loader()
    if isinstance(images_or_loader, np.ndarray):
        for i in range(0, len(images_or_loader), batch_size):
            yield images_or_loader[i : i + batch_size]
    else:
        for batch in images_or_loader:
            yield np.asarray(batch)


def feature_stats(feature_map: Any, images: Any, batch_size: int = 64) -> FeatureStats:
    """Statistics of ``feature_map.features`` over uint8 ``[N, H, W, 3]`` images, an iterable of
    such batches, or a zero-argument callable returning either."""
    moments = _Moments()
    for batch in _batches(images, batch_size):
        feats = np.asarray(feature_map.features(as_uint8_images(batch)))
        if feats.ndim != 2 or feats.shape[0] != len(batch):
            raise ValueError(f"{feature_map.name}: features {feats.shape} for {len(batch)} images")
        moments.add(feats)
    return moments.stats(feature_map.fingerprint)


def reference_stats_path(fingerprint: str, cache_dir: str | os.PathLike, key: str) -> Path:
    """Cache file of ``(fingerprint, key)``: a readable key prefix plus a hash of both."""
    digest = hashlib.sha256(f"{fingerprint}\0{key}".encode()).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:48] or "ref"
    return Path(cache_dir) / f"{slug}-{digest}.npz"


def cached_reference_stats(
    feature_map: Any,
    images_or_loader: Any,
    cache_dir: str | os.PathLike,
    key: str,
    batch_size: int = 64,
) -> FeatureStats:
    """Reference statistics from ``cache_dir`` when present for this feature map's fingerprint
    and ``key``; otherwise computed (the loader is only touched then) and written atomically."""
    path = reference_stats_path(feature_map.fingerprint, cache_dir, key)
    if path.is_file():
        try:
            return FeatureStats.load(path, feature_map.fingerprint)
        except (FingerprintMismatchError, OSError, ValueError, KeyError):
            pass  # a collision or a damaged file: recompute and overwrite
    stats = feature_stats(feature_map, images_or_loader, batch_size)
    stats.save(path)
    return stats


# --------------------------------------------------------------------------- Inception (fid)

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (real path, size, mtime) so rebuilding a scorer is cheap."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


_FID_OPTION = "--fid-weights FILE (ScorerContext.fid_weights)"
_FID_EXPECTED = "an Inception-v3 TorchScript file such as inception-2015-12-05.pt"


class InceptionTorchScript:
    """Inception-v3 2048-d pool features through NVIDIA's TorchScript translation of TF's
    ``inception-2015-12-05`` graph, the network of the reference FID implementations.

    Calling convention (confirmed in NVlabs/stylegan2-ada-pytorch and NVlabs/stylegan3
    ``metrics/frechet_inception_distance.py`` + ``metric_utils.py``, and GaParmar/clean-fid
    ``cleanfid/inception_torchscript.py``): ``model(x, return_features=True)`` with ``x`` a
    uint8 ``[N, 3, H, W]`` tensor in [0, 255] returns ``[N, 2048]``; the module resizes to 299
    itself. Any ``torch.jit.save``-d module with that signature works; pickles (e.g. stylegan3's
    ``.pkl``) are refused since loading them would run arbitrary code.
    """

    name = "fid"
    kind = "features"

    def __init__(self, path: str, batch_size: int = 64, device: str | None = None):
        try:
            import torch  # lazy: only FID needs torch
        except ImportError as e:
            raise ScorerError("scorer 'fid' needs torch (pip install 'psa_jax[eval]')") from e

        self.path, self.batch_size = str(path), batch_size
        self.fingerprint = f"fid/inception-torchscript-uint8-nchw:{file_sha256(path)}"
        try:
            with warnings.catch_warnings():  # torch 2.x deprecates jit; the file *is* TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(self.path, map_location="cpu")
        except Exception as e:  # torch raises RuntimeError/ValueError/... for non-archives
            raise ScorerError(
                f"scorer 'fid' cannot load {self.path!r} as TorchScript ({type(e).__name__}); "
                f"it needs {_FID_EXPECTED} written by torch.jit.save, not a pickle or a state "
                "dict"
            ) from e
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)

    def features(self, images: np.ndarray) -> np.ndarray:
        import torch

        images = as_uint8_images(images)
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + self.batch_size]))
                x = x.permute(0, 3, 1, 2).to(self.device)
                f = self.model(x, return_features=True)
                out.append(f.reshape(x.shape[0], -1).to(torch.float64).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


@register("fid", "features", "Inception-v3 pool features from a local TorchScript file (FID)")
def build_fid(ctx: ScorerContext) -> InceptionTorchScript:
    if not ctx.fid_weights:
        raise MissingScorerWeightsError("fid", _FID_OPTION, _FID_EXPECTED)
    if not os.path.isfile(ctx.fid_weights):
        raise MissingScorerWeightsError("fid", _FID_OPTION, _FID_EXPECTED, path=ctx.fid_weights)
    return InceptionTorchScript(ctx.fid_weights, batch_size=ctx.batch_size)


def fid_from_images(
    feature_map: Any, images: Any, reference: FeatureStats, batch_size: int = 64
) -> float:
    """FID of ``images`` against ``reference`` (which must come from the same feature map)."""
    if reference.fingerprint and reference.fingerprint != feature_map.fingerprint:
        raise FingerprintMismatchError(
            "<reference>", reference.fingerprint, feature_map.fingerprint
        )
    return frechet_distance(feature_stats(feature_map, images, batch_size), reference)


__all__ = [
    "FeatureStats",
    "FingerprintMismatchError",
    "InceptionTorchScript",
    "build_fid",
    "cached_reference_stats",
    "feature_stats",
    "fid_from_images",
    "file_sha256",
    "frechet_distance",
    "reference_stats_path",
]
