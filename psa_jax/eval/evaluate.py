"""Generate, score and summarise: the work behind ``psa-jax eval`` (and SPQR's measurements).

An evaluation is a list of :class:`EvalItem` -- (caption, seed, user, group) -- drawn for the
PSA model with each item's user and, on the same caption and seed, for the base model (adapter
off), so every PSA image has a paired base image. Groups:

* ``level-0`` .. ``level-5``: PSAlign's strictness-level users (``gen_psa.py``) over one prompt
  set, ``draws`` seeds per prompt;
* ``seen`` / ``unseen``: prompt rows that name their own user (PSAlign's ``sage_seen.csv`` /
  ``sage_unseen.csv``; the toy world's ``test_seen`` / ``test_unseen`` prompts);
* ``users``: given users crossed with every prompt.

Scores come from the registered scorers (:mod:`psa_jax.eval.scorers`); the summary per group
uses :mod:`psa_jax.eval.metrics`. Category-level metrics (banned / allowed marker rates, pass
rates) need a scorer that names the 7 categories (``toy-oracle``); Q16 and NudeNet give IP only.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from psa_jax.data.profiles import CATEGORIES, format_user_id, read_users
from psa_jax.eval import metrics as M
from psa_jax.eval.scorers import SafetyScores

BASE = "base"
PSA = "psa"
PASS_ADHERENCE = "toy-adherence"  # the allowed-content check of the toy world's pass rate


class PromptsError(ValueError):
    """A prompts file that cannot be evaluated (the message names the file and the column)."""


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One image to draw: ``user`` None draws the base model only."""

    caption: str
    seed: int
    group: str
    user: str | None
    category: str | None = None  # the prompt's harm category, if known
    banned: tuple[str, ...] | None = None  # the user's banned categories, if known


# -- plans -----------------------------------------------------------------------------------


def profiles_table(users_csv: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """User id -> banned categories, from a PSAlign-layout users file."""
    return {p.user_id: tuple(p.banned) for p in read_users(users_csv)}


def read_prompt_rows(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """Rows of a prompts CSV; a file without a ``caption`` column is a :class:`PromptsError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PromptsError(f"prompts file {path!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "caption" not in (reader.fieldnames or []):
            raise PromptsError(f"{path}: no 'caption' column (columns: {reader.fieldnames})")
        rows = [dict(r) for r in reader]
    if not rows:
        raise PromptsError(f"{path}: no prompt rows")
    return rows[:limit] if limit else rows


def _category(row: Mapping[str, str]) -> str | None:
    cat = (row.get("category") or "").strip()
    return cat if cat in CATEGORIES else None


def level_items(
    prompts: Sequence[tuple[str, str | None]],
    banned: Mapping[str, tuple[str, ...]],
    *,
    levels: Sequence[int] = M.LEVELS,
    draws: int = 1,
    seed: int = 0,
) -> list[EvalItem]:
    """Every (caption, category) for every level user, ``draws`` seeds each; prompt ``i``'s
    draw ``k`` has seed ``seed + i * draws + k`` for every user, so users share noise."""
    out = []
    for level in levels:
        user = M.level_user(level)
        for i, (caption, category) in enumerate(prompts):
            for k in range(draws):
                out.append(
                    EvalItem(
                        caption,
                        seed + i * draws + k,
                        f"level-{level}",
                        user,
                        category,
                        banned.get(user),
                    )
                )
    return out


def row_items(
    rows: Sequence[Mapping[str, str]],
    group: str,
    banned: Mapping[str, tuple[str, ...]],
    *,
    seed: int = 0,
    users: int | None = None,
) -> list[EvalItem]:
    """Rows that name their own ``user_id``; ``users`` keeps the first N distinct users."""
    keep: dict[str, None] = {}
    out = []
    for i, row in enumerate(rows):
        raw = (row.get("user_id") or "").strip()
        if not raw:
            raise PromptsError(f"row {i + 2} of the {group} prompts has no user_id")
        user = format_user_id(raw) if raw.isdigit() else raw
        if user not in keep and users is not None and len(keep) >= users:
            continue
        keep[user] = None
        out.append(
            EvalItem(row["caption"], seed + i, group, user, _category(row), banned.get(user))
        )
    return out


def toy_items(
    world_dir: str, *, draws: int = 2, users_per_group: int | None = 20, seed: int = 0
) -> list[EvalItem]:
    """The toy world's evaluation: level users over every held-out caption (``draws`` seeds),
    and the ``test_seen`` / ``test_unseen`` prompt rows of ``users_per_group`` users each."""
    banned = profiles_table(os.path.join(world_dir, "users.csv"))
    seen = read_prompt_rows(os.path.join(world_dir, "test_seen", "prompts.csv"))
    unseen = read_prompt_rows(os.path.join(world_dir, "test_unseen", "prompts.csv"))
    prompts = list(dict.fromkeys((r["caption"], _category(r)) for r in seen))
    # A world built without the level users (data.toy.include_level_users=False) has no
    # embeddings for them: their groups are left out, and the summary lists the levels present.
    levels = [lv for lv in M.LEVELS if M.level_user(lv) in banned]
    items = level_items(prompts, banned, levels=levels, draws=draws, seed=seed)
    items += row_items(seen, "seen", banned, seed=seed, users=users_per_group)
    items += row_items(unseen, "unseen", banned, seed=seed, users=users_per_group)
    return items


def csv_items(
    path: str,
    banned: Mapping[str, tuple[str, ...]],
    *,
    users: Sequence[str] | None = None,
    draws: int = 1,
    seed: int = 0,
    limit: int | None = None,
) -> list[EvalItem]:
    """A prompts CSV: its rows' own users (a ``user_id`` column, group ``rows``), else the given
    ``users`` (group ``users``), else the six strictness levels (PSAlign's ``gen_psa.py``)."""
    rows = read_prompt_rows(path, limit)
    if users:
        ids = [format_user_id(u) if u.isdigit() else u for u in users]
        return [
            EvalItem(r["caption"], seed + i * draws + k, "users", u, _category(r), banned.get(u))
            for u in ids
            for i, r in enumerate(rows)
            for k in range(draws)
        ]
    if "user_id" in rows[0]:
        return row_items(rows, "rows", banned, seed=seed)
    return level_items([(r["caption"], _category(r)) for r in rows], banned, draws=draws, seed=seed)


# -- generation ------------------------------------------------------------------------------


def embeddings_for(users: Sequence[str], table: Mapping[str, np.ndarray] | None) -> np.ndarray:
    from psa_jax.sample.prompts import profile_embeddings

    return profile_embeddings(list(users), dict(table) if table is not None else None)


def generate(
    pipeline: Any,
    items: Sequence[EvalItem],
    settings: Mapping[str, Any],
    *,
    chunk: int = 64,
    desc: str = "sampling",
    progress: bool = True,
    params: Any | None = None,
    base: bool = True,
) -> dict[str, np.ndarray]:
    """``{"psa": [N, H, W, 3], "base": [N, H, W, 3]}`` uint8: each item drawn with its user's
    embedding, and by the base model on the same caption and seed (each distinct (caption,
    seed) drawn once). ``params`` replaces the pipeline's UNet (a fine-tuned one); ``base=False``
    draws the PSA images only (every item then needs a user)."""
    if params is not None:
        pipeline = dataclasses.replace(pipeline, params=params)
    with_user = [i for i, it in enumerate(items) if it.user is not None]
    embeds = None
    if with_user:
        embeds = embeddings_for([items[i].user for i in with_user], pipeline.embeddings)
    keys = list(dict.fromkeys((it.caption, it.seed) for it in items)) if base else []
    if not base and len(with_user) != len(items):
        raise ValueError("base=False needs a user for every item")
    total = len(with_user) + len(keys)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)

    def draw(captions, seeds, user_embeds):
        out = []
        for lo in range(0, len(captions), chunk):
            e = None if user_embeds is None else user_embeds[lo : lo + chunk]
            out.append(pipeline(captions[lo : lo + chunk], e, seeds[lo : lo + chunk], **settings))
            bar.update(len(out[-1]))
        return np.concatenate(out) if out else None

    out = {}
    if base:
        base_imgs = draw([c for c, _ in keys], [s for _, s in keys], None)
        index = {k: j for j, k in enumerate(keys)}
        out[BASE] = base_imgs[[index[(it.caption, it.seed)] for it in items]]
    user_imgs = None
    if with_user:
        user_imgs = draw(
            [items[i].caption for i in with_user], [items[i].seed for i in with_user], embeds
        )
    if base:
        out[PSA] = out[BASE].copy()  # items without a user are the base model's images
        if with_user:
            out[PSA][with_user] = user_imgs
    else:
        out[PSA] = user_imgs
    bar.close()
    return out


# -- scoring ---------------------------------------------------------------------------------


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


# -- summaries -------------------------------------------------------------------------------


def _own_rate(detected, items, idx, allowed: bool) -> float | None:
    """Own-marker rate over ``idx``'s prompts whose category the user allows (or bans)."""
    sel = [
        i
        for i in idx
        if items[i].category is not None
        and items[i].banned is not None
        and ((items[i].category in items[i].banned) != allowed)
    ]
    if not sel:
        return None
    return float(M.shows_own(detected[sel], [items[i].category for i in sel]).mean())


def group_summary(
    items: Sequence[EvalItem], idx: Sequence[int], scored: Mapping[str, Scored]
) -> dict[str, Any]:
    """Metrics of one group for the PSA model and the base (``scored[PSA]``, ``scored[BASE]``)."""
    idx = list(idx)
    users = sorted({items[i].user for i in idx if items[i].user})
    out: dict[str, Any] = {"images": len(idx), "users": len(users)}
    if len(users) == 1:
        out["user"] = users[0]
        out["banned"] = list(items[idx[0]].banned or [])
    for model, sc in scored.items():
        out[f"ip_{model}"] = M.inappropriate_probability(sc.flagged[idx])
        for name, s in sc.safety.items():
            out[f"flagged_{model}/{name}"] = float(s.flagged[idx].mean())
        for name, a in sc.adherence.items():
            out[f"adherence_{model}/{name}"] = float(a[idx].mean())
    for name in scored[PSA].safety:
        out[f"win_rate/{name}"] = M.win_rate(
            scored[PSA].safety[name].prob[idx], scored[BASE].safety[name].prob[idx], False
        )
    for name in scored[PSA].adherence:
        out[f"win_rate/{name}"] = M.win_rate(
            scored[PSA].adherence[name][idx], scored[BASE].adherence[name][idx], True
        )
        base = out[f"adherence_{BASE}/{name}"]
        out[f"adherence_ratio/{name}"] = M.safe_ratio(out[f"adherence_{PSA}/{name}"], base)
    known = [i for i in idx if items[i].banned is not None]
    if scored[PSA].detected is None or not known:
        return out
    for model, sc in scored.items():
        det = sc.detected
        out[f"marker_rates_{model}"] = M.marker_rates(det[idx])
        banned = [items[i].banned for i in known]
        out[f"banned_rate_{model}"] = float(M.shows_banned(det[known], banned).mean())
        out[f"banned_own_rate_{model}"] = _own_rate(det, items, idx, allowed=False)
        out[f"allowed_own_rate_{model}"] = _own_rate(det, items, idx, allowed=True)
        adh = sc.adherence.get(PASS_ADHERENCE)
        ok = M.image_passes(det[known], banned, None if adh is None else adh[known])
        rates = M.per_user_rates([items[i].user for i in known], ok)
        out[f"pass_rate_{model}"] = M.mean_of_users(rates)
    out["suppression_ratio"] = M.safe_ratio(
        out[f"banned_own_rate_{PSA}"], out[f"banned_own_rate_{BASE}"]
    )
    out["allowed_retention"] = M.safe_ratio(
        out[f"allowed_own_rate_{PSA}"], out[f"allowed_own_rate_{BASE}"]
    )
    return out


def summarize(items: Sequence[EvalItem], scored: Mapping[str, Scored]) -> dict[str, Any]:
    """Per-group summaries plus the level curves PSAlign plots (levels present only)."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group, []).append(i)
    summary = {g: group_summary(items, idx, scored) for g, idx in groups.items()}
    levels = [g for g in (f"level-{lv}" for lv in M.LEVELS) if g in summary]
    curves = {}
    if levels:
        for key in (
            "ip_psa",
            "ip_base",
            "banned_rate_psa",
            "banned_rate_base",
            "banned_own_rate_psa",
            "allowed_own_rate_psa",
            "pass_rate_psa",
        ):
            curves[key] = [summary[g].get(key) for g in levels]
        if "marker_rates_psa" in summary[levels[0]]:
            curves["any_marker_psa"] = [summary[g]["marker_rates_psa"]["any"] for g in levels]
            curves["any_marker_base"] = [summary[g]["marker_rates_base"]["any"] for g in levels]
    return {"groups": summary, "levels": levels, "level_curves": curves}


def to_json(obj: Any) -> str:
    """JSON with NaN/inf refused: a metric that cannot be computed is ``null``, never NaN."""
    return json.dumps(obj, indent=1, allow_nan=False, default=_plain)


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
