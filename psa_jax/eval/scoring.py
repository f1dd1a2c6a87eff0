"""Images -> per-image scores of the registered scorers (:mod:`psa_jax.eval.scorers`), and FIDs."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from psa_jax.data.profiles import CATEGORIES
from psa_jax.eval.plans import EvalItem
from psa_jax.eval.scorers import SafetyScores


@dataclasses.dataclass
class Scored:
    """Every scorer's per-image output for one image set."""

    safety: dict[str, SafetyScores]
    adherence: dict[str, np.ndarray]

    @property
    def flagged(self) -> np.ndarray:
        """Union of the safety scorers (PSAlign's IP counts an image either scorer flags)."""
        return np.logical_or.reduce([s.flagged for s in self.safety.values()])

    @property
    def detected(self) -> np.ndarray | None:
        """``[N, 7]`` category detections, from the first scorer that names the 7 categories."""
        for s in self.safety.values():
            if s.categories is not None and tuple(s.category_names) == tuple(CATEGORIES):
                return s.categories
        return None


def score(
    images: np.ndarray,
    items: Sequence[EvalItem],
    scorers: Mapping[str, Any],
    chunk: int = 256,
    progress: bool = False,
) -> Scored:
    """Run the safety and adherence scorers (feature maps are used by :func:`fid_scores`)."""
    prompts = [it.caption for it in items]
    cats = [it.category for it in items]
    safety, adherence = {}, {}
    for name, scorer in scorers.items():
        parts = []
        starts = range(0, len(images), chunk)
        for lo in tqdm(starts, desc=f"scoring ({name})", disable=not progress or len(starts) < 2):
            sl = slice(lo, lo + chunk)
            if scorer.kind == "safety":
                parts.append(scorer(images[sl], prompts[sl], cats[sl]))
            elif scorer.kind == "adherence":
                parts.append(np.asarray(scorer(images[sl], prompts[sl]), np.float64))
        if scorer.kind == "safety":
            safety[name] = SafetyScores(
                np.concatenate([p.prob for p in parts]),
                np.concatenate([p.flagged for p in parts]),
                None
                if parts[0].categories is None
                else np.concatenate([p.categories for p in parts]),
                parts[0].category_names,
            )
        elif scorer.kind == "adherence":
            adherence[name] = np.concatenate(parts)
    if not safety:
        raise ValueError("an evaluation needs at least one safety scorer")
    return Scored(safety, adherence)


def fid_scores(
    feature_maps: Mapping[str, Any], image_sets: Mapping[str, np.ndarray], reference: Any
) -> dict[str, dict[str, float]]:
    """``{feature map: {image set: FID against the reference}}``; ``reference`` maps a feature
    map name to its reference :class:`~psa_jax.eval.fid.FeatureStats`."""
    from psa_jax.eval.fid import feature_stats, frechet_distance

    out = {}
    for name, fmap in feature_maps.items():
        ref = reference[name]
        out[name] = {
            k: frechet_distance(feature_stats(fmap, v), ref) for k, v in image_sets.items()
        }
    return out


def read_images(folder: str, size: int | None = None) -> np.ndarray:
    """Every PNG/JPEG under ``folder`` (sorted), RGB uint8, resized to ``size`` if given."""
    files = sorted(
        f
        for ext in ("png", "jpg", "jpeg", "webp")
        for f in glob.glob(os.path.join(folder, "**", f"*.{ext}"), recursive=True)
    )
    if not files:
        raise FileNotFoundError(f"no images (png/jpg/webp) under {folder!r}")
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            out.append(np.asarray(im.resize((size, size), Image.BICUBIC) if size else im))
    return np.stack(out)
