"""Fréchet distance maths, reference-statistics cache, and the ``fid`` TorchScript feature map."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg

from psa_jax.eval import fid
from psa_jax.eval.fid import FeatureStats, FingerprintMismatchError, frechet_distance
from psa_jax.eval.scorers import SCORERS, MissingScorerWeightsError, ScorerContext, ScorerError

# Scripting the stand-in network uses torch.jit, which torch 2.x marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")


def _random_stats(rng, f=24, n=1000, shift=0.0):
    a = rng.normal(size=(f, f)) / np.sqrt(f)
    sigma = a @ a.T + 0.5 * np.eye(f)  # well conditioned
    return FeatureStats(rng.normal(size=f) + shift, sigma, n)


def _scipy_fid(a, b):
    s = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    d = a.mu - b.mu
    return float(np.real(d @ d + np.trace(a.sigma + b.sigma - 2 * s)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    a, b = _random_stats(rng), _random_stats(rng)
    ours, ref = frechet_distance(a, b), _scipy_fid(a, b)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_frechet_properties():
    rng = np.random.default_rng(3)
    a, b = _random_stats(rng, f=64), _random_stats(rng, f=64)
    assert abs(frechet_distance(a, a)) <= 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    d = rng.normal(size=64)
    shifted = FeatureStats(a.mu + d, a.sigma, a.n)
    assert frechet_distance(a, shifted) == pytest.approx(d @ d, rel=1e-8, abs=1e-8)
    base = frechet_distance(a, b)
    b_shift = FeatureStats(b.mu + d, b.sigma, b.n)
    expected = base + 2 * (b.mu - a.mu) @ d + d @ d  # |mu_b + d - mu_a|^2 expands
    assert frechet_distance(a, b_shift) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(a, _random_stats(rng, f=8))


def test_singular_covariance_is_finite():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(5, 16))  # rank-deficient covariance (N < F)
    s = FeatureStats.from_features(feats)
    assert abs(frechet_distance(s, s)) <= 1e-8
    assert np.isfinite(frechet_distance(s, _random_stats(rng, f=16)))


def test_stats_roundtrip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(50, 7))
    s = FeatureStats.from_features(feats, fingerprint="net-A")
    assert s.mu.dtype == np.float64 and s.sigma.shape == (7, 7) and s.n == 50
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False))
    p = tmp_path / "sub" / "ref.npz"
    s.save(p)
    assert [q.name for q in p.parent.iterdir()] == ["ref.npz"]  # no temp file left behind
    t = FeatureStats.load(p, fingerprint="net-A")
    np.testing.assert_array_equal(t.mu, s.mu)
    np.testing.assert_array_equal(t.sigma, s.sigma)
    assert (t.n, t.fingerprint) == (50, "net-A")
    assert FeatureStats.load(p).fingerprint == "net-A"
    with pytest.raises(FingerprintMismatchError):
        FeatureStats.load(p, fingerprint="net-B")


class CountingMap:
    """A features-kind map: per-channel means and stds, counting the images it sees."""

    name, kind = "counting", "features"

    def __init__(self, fingerprint="count-v1"):
        self.fingerprint, self.calls, self.images = fingerprint, 0, 0

    def features(self, images):
        self.calls += 1
        self.images += len(images)
        x = images.astype(np.float64) / 255
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def test_feature_stats_streaming_matches_batch():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(37, 8, 8, 3), dtype=np.uint8)
    fmap = CountingMap()
    s = fid.feature_stats(fmap, images, batch_size=5)
    ref = FeatureStats.from_features(fmap.features(images))
    assert fmap.calls == 9  # 8 batches of <= 5, plus the reference call
    np.testing.assert_allclose(s.mu, ref.mu, rtol=1e-12)
    np.testing.assert_allclose(s.sigma, ref.sigma, rtol=1e-9, atol=1e-14)
    assert s.n == 37 and s.fingerprint == "count-v1"
    batches = [images[:10], images[10:11], images[11:]]  # an iterable loader works too
    s2 = fid.feature_stats(CountingMap(), batches)
    np.testing.assert_allclose(s2.sigma, ref.sigma, rtol=1e-9, atol=1e-14)


def test_reference_cache_reused_and_invalidated(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    loads = []

    def loader():
        loads.append(1)
        return images

    fmap = CountingMap("count-v1")
    s1 = fid.cached_reference_stats(fmap, loader, tmp_path, "coco-10k", batch_size=8)
    assert (fmap.calls, len(loads)) == (3, 1)
    s2 = fid.cached_reference_stats(fmap, loader, tmp_path, "coco-10k", batch_size=8)
    assert (fmap.calls, len(loads)) == (3, 1)  # cache hit: neither features nor loader ran
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    fid.cached_reference_stats(fmap, loader, tmp_path, "other-key", batch_size=8)
    assert fmap.calls == 6  # another key: recomputed
    fmap2 = CountingMap("count-v2")  # new weights/preprocessing: cache invalidated
    s3 = fid.cached_reference_stats(fmap2, loader, tmp_path, "coco-10k", batch_size=8)
    assert fmap2.calls == 3 and s3.fingerprint == "count-v2"
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------ fid scorer


def _tiny_inception(path, out=2048):
    """A TorchScript module with the inception-2015-12-05.pt signature."""
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, out, 3, stride=2)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(x.to(torch.float32), size=(32, 32))
            f = self.conv((x - 128) / 128).mean(dim=(2, 3))
            return f if return_features else torch.softmax(f, dim=1)

    torch.jit.save(torch.jit.script(Tiny()), str(path))
    return Tiny


def test_fid_scorer_on_torchscript(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    _tiny_inception(path)
    ctx = ScorerContext(fid_weights=str(path), batch_size=3)
    fmap = SCORERS["fid"].build(ctx)
    assert (fmap.name, fmap.kind, SCORERS["fid"].kind) == ("fid", "features", "features")
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, size=(7, 40, 48, 3), dtype=np.uint8)
    feats = fmap.features(images)
    assert feats.shape == (7, 2048) and np.isfinite(feats).all()
    np.testing.assert_allclose(fmap.features(images[:2]), feats[:2], rtol=1e-5, atol=1e-6)
    assert fmap.fingerprint.endswith(fid.file_sha256(path))
    assert SCORERS["fid"].build(ctx).fingerprint == fmap.fingerprint
    ref = fid.cached_reference_stats(fmap, images, tmp_path / "cache", "ref", batch_size=4)
    other = rng.integers(0, 128, size=(7, 40, 48, 3), dtype=np.uint8)
    assert fid.fid_from_images(fmap, images, ref) <= 1e-6
    assert fid.fid_from_images(fmap, other, ref) > 1e-3
    with pytest.raises(ValueError):
        fmap.features(images.astype(np.float32))


def test_fid_fingerprint_follows_file(tmp_path):
    torch = pytest.importorskip("torch")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    tiny = _tiny_inception(a)
    m = torch.jit.script(tiny())
    with torch.no_grad():
        m.conv.weight.mul_(2)
    torch.jit.save(m, str(b))
    fa = SCORERS["fid"].build(ScorerContext(fid_weights=str(a))).fingerprint
    fb = SCORERS["fid"].build(ScorerContext(fid_weights=str(b))).fingerprint
    assert fa != fb


def test_fid_missing_weights(tmp_path):
    with pytest.raises(MissingScorerWeightsError) as e:
        SCORERS["fid"].build(ScorerContext())
    assert "--fid-weights" in str(e.value) and "inception-2015-12-05.pt" in str(e.value)
    assert e.value.scorer == "fid"
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(MissingScorerWeightsError) as e:
        SCORERS["fid"].build(ScorerContext(fid_weights=missing))
    assert e.value.path == missing


def test_fid_rejects_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "inception.pkl"
    p.write_bytes(pickle.dumps({"not": "torchscript"}))
    with pytest.raises(ScorerError, match="TorchScript"):
        SCORERS["fid"].build(ScorerContext(fid_weights=str(p)))
    q = tmp_path / "module.pt"
    torch.save(torch.nn.Conv2d(3, 4, 1), str(q))  # an eager-module pickle, not TorchScript
    with pytest.raises(ScorerError, match="TorchScript"):
        SCORERS["fid"].build(ScorerContext(fid_weights=str(q)))
