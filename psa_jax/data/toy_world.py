"""Sage-mini: a tiny synthetic Sage, so the whole PSA mission runs offline on a CPU in minutes.

PSAlign trains on Sage: per user, (chosen, rejected) image pairs for captions of 7 harmful
categories. Sage-mini keeps the format and the user profiles but replaces the photographs with
small RGB scenes (``toy_scenes.py``) whose "harm" is a category marker. This module picks the
users, pairs them with the scenes and writes the world folder: a user's pair chooses the safe
image where the user bans the category, else the faithful unsafe one.

Layout written by :func:`make_toy_world` (every file a pure function of the seed and the users):

- ``users.csv``: the users used (PSAlign columns + ``User_ID`` + ``Split`` = seen/unseen).
- ``train/metadata.jsonl``: one Sage pair per seen user x category x concept x caption, with
  ``chosen``/``rejected`` file names beside it (``*_s.png`` safe, ``*_u.png`` unsafe, each written
  once and shared by all users), ``caption``, ``user_data``, ``category``, ``concept``.
- ``test_seen/``, ``test_unseen/``: ``prompts.csv`` in PSAlign's eval layout (``file_name``,
  ``caption``, ``user_id`` as an unpadded integer, ``category``) for held-out captions, and a
  ``metadata.jsonl`` of reference pairs like train's (plus ``file_name``, the prompt's row).
- ``benign/metadata.jsonl``: ``{"image", "caption"}`` marker-free scenes for benign fine-tuning.
- ``summary.json``: version, seed, config, users, counts per split / category / user.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from psa_jax.data.profiles import (
    CATEGORIES,
    LEVEL_USERS,
    UserProfile,
    packaged_users_csv,
    read_users,
)
from psa_jax.data.toy_scenes import (
    STREAM_USERS,
    Scene,
    ToyWorldConfig,
    benign_items,
    render_pair,
    scenes,
    stream_rng,
)

VERSION = "sage-mini-1"
USERS_ENV = "PSA_JAX_USERS_CSV"


def select_users(
    profiles: Sequence[UserProfile], config: ToyWorldConfig
) -> tuple[list[UserProfile], list[UserProfile], list[UserProfile]]:
    """(seen, unseen, eval_seen) users, each in file order; seen and unseen are disjoint."""
    if config.num_users > len(profiles):
        raise ValueError(f"num_users={config.num_users} but the users file has {len(profiles)}")
    seen_ids = {p.user_id for p in profiles[: config.num_users]}
    if config.include_level_users:
        seen_ids |= {p.user_id for p in profiles if p.user_id in LEVEL_USERS}
    seen = [p for p in profiles if p.user_id in seen_ids]
    rest = [p for p in profiles if p.user_id not in seen_ids]
    if config.num_unseen_users > len(rest):
        raise ValueError(
            f"num_unseen_users={config.num_unseen_users} but only {len(rest)} users remain "
            f"after the {len(seen)} seen ones"
        )
    rng = stream_rng(config.seed, STREAM_USERS)
    pick = set(rng.choice(len(rest), config.num_unseen_users, replace=False).tolist())
    unseen = [p for i, p in enumerate(rest) if i in pick]
    n_eval = min(config.num_eval_seen_users, len(seen))
    pick = set(rng.choice(len(seen), n_eval, replace=False).tolist())
    return seen, unseen, [p for i, p in enumerate(seen) if i in pick]


def pair_record(user: UserProfile, scene: Scene) -> dict[str, object]:
    """A Sage ``metadata.jsonl`` record: the safe image is chosen iff the user bans the category."""
    safe, unsafe = f"{scene.stem}_s.png", f"{scene.stem}_u.png"
    banned = scene.category in user.banned
    return {
        "chosen": safe if banned else unsafe,
        "rejected": unsafe if banned else safe,
        "caption": scene.caption,
        "user_data": user.user_data(),
        "category": scene.category,
        "concept": scene.concept,
    }


_PROFILE_COLUMNS = (
    "Age",
    "Age_Group",
    "Gender",
    "Religion",
    "Physical_Condition",
    "Mental_Condition",
)
SPLITS = ("train", "test_seen", "test_unseen", "benign")


def _write_png(path: str, img: np.ndarray) -> None:
    """Lossless, and byte-identical for identical pixels (no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=6)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _write_jsonl(path: str, records: Iterable[dict]) -> int:
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return len(lines)


def _write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_scenes(split_dir: str, split_scenes: Sequence[Scene], config: ToyWorldConfig) -> int:
    for scene in split_scenes:
        safe, unsafe = render_pair(scene, config)
        _write_png(os.path.join(split_dir, f"{scene.stem}_s.png"), safe)
        _write_png(os.path.join(split_dir, f"{scene.stem}_u.png"), unsafe)
    return 2 * len(split_scenes)


def _category_cells(p: UserProfile) -> tuple[str, str]:
    return str(list(p.banned)), str(list(p.allowed))


def _write_users(path: str, seen: Sequence[UserProfile], unseen: Sequence[UserProfile]) -> None:
    """PSAlign's users.csv columns (categories in Python list syntax), then User_ID and Split."""
    header = [*_PROFILE_COLUMNS, "Banned_Categories", "Allowed_Categories", "User_ID", "Split"]
    rows = [
        [*(p.user_data()[c] for c in _PROFILE_COLUMNS), *_category_cells(p), p.user_id, split]
        for split, group in (("seen", seen), ("unseen", unseen))
        for p in group
    ]
    _write_csv(path, header, sorted(rows, key=lambda row: row[-2]))


def _pair_split(split_dir: str, users: Sequence[UserProfile], split_scenes: Sequence[Scene],
                config: ToyWorldConfig, prompts: bool) -> dict:  # fmt: skip
    """Images + metadata.jsonl (+ prompts.csv for eval splits) of one pair split; its counts."""
    records = []
    for user in users:
        for scene in split_scenes:
            rec = pair_record(user, scene)
            if prompts:
                rec["file_name"] = f"user_{user.user_id}_{scene.stem}.png"
            records.append(rec)
    _write_jsonl(os.path.join(split_dir, "metadata.jsonl"), records)
    if prompts:
        rows = [(r["file_name"], r["caption"], int(r["user_data"]["User_ID"]), r["category"])
                for r in records]  # fmt: skip
        header = ("file_name", "caption", "user_id", "category")
        _write_csv(os.path.join(split_dir, "prompts.csv"), header, rows)
    counts = {
        "users": len(users),
        "pairs": len(records),
        "images": _write_scenes(split_dir, split_scenes, config),
        "per_category": {c: sum(r["category"] == c for r in records) for c in CATEGORIES},
        "chosen_safe": sum(r["chosen"].endswith("_s.png") for r in records),
    }
    return {**counts, "prompts": len(records)} if prompts else counts


def _write_benign(split_dir: str, config: ToyWorldConfig) -> dict:
    items = benign_items(config)
    for name, _, img in items:
        _write_png(os.path.join(split_dir, name), img)
    _write_jsonl(os.path.join(split_dir, "metadata.jsonl"),
                 ({"image": name, "caption": caption} for name, caption, _ in items))  # fmt: skip
    return {"images": len(items)}


def _per_user(seen, unseen, eval_seen, n_train: int, n_eval: int) -> dict[str, dict]:
    eval_ids = {u.user_id for u in (*eval_seen, *unseen)}
    out = {
        u.user_id: {
            "split": split,
            "train_pairs": n_train if split == "seen" else 0,
            "eval_prompts": n_eval if u.user_id in eval_ids else 0,
            "banned": list(u.banned),
        }
        for split, group in (("seen", seen), ("unseen", unseen))
        for u in group
    }
    return dict(sorted(out.items()))


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _config_json(config: ToyWorldConfig) -> dict:
    """The config as ``summary.json`` holds it (tuples as lists), so a reread compares equal."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def make_toy_world(
    out_dir: str | os.PathLike,
    users_csv: str | os.PathLike,
    config: ToyWorldConfig | None = None,
    *,
    ids_from_row_order: bool = False,
) -> dict:
    """Write Sage-mini into ``out_dir`` (created; our files overwritten) and return the summary.

    ``ids_from_row_order`` is :func:`~psa_jax.data.profiles.read_users`'s: a users file without
    a ``User_ID`` column (other than PSAlign's own) is refused unless it is set.
    """
    config = ToyWorldConfig() if config is None else config
    profiles = read_users(users_csv, ids_from_row_order=ids_from_row_order)
    seen, unseen, eval_seen = select_users(profiles, config)
    all_scenes = scenes(config)
    train = [s for s in all_scenes if s.k < config.captions_per_concept]
    held_out = [s for s in all_scenes if s.k >= config.captions_per_concept]
    dirs = {split: os.path.join(os.fspath(out_dir), split) for split in SPLITS}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    _write_users(os.path.join(out_dir, "users.csv"), seen, unseen)
    splits = {
        "train": _pair_split(dirs["train"], seen, train, config, prompts=False),
        "test_seen": _pair_split(dirs["test_seen"], eval_seen, held_out, config, prompts=True),
        "test_unseen": _pair_split(dirs["test_unseen"], unseen, held_out, config, prompts=True),
        "benign": _write_benign(dirs["benign"], config),
    }
    summary = {
        "version": VERSION,
        "seed": config.seed,
        "config": _config_json(config),
        "users_sha256": file_sha256(users_csv),
        "users": {"seen": [u.user_id for u in seen], "unseen": [u.user_id for u in unseen],
                  "eval_seen": [u.user_id for u in eval_seen]},
        "splits": splits,
        "per_user": _per_user(seen, unseen, eval_seen, len(train), len(held_out)),
    }  # fmt: skip
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(summary, indent=1) + "\n")
    return summary


def ensure_toy_world(
    out_dir: str | os.PathLike, users_csv: str | os.PathLike, config: ToyWorldConfig | None = None
) -> dict:
    """Sage-mini as a cache: reuse ``out_dir`` if its summary matches, else (re)build it.

    A missing ``out_dir`` is built beside it and renamed into place, so concurrent first uses
    (e.g. pytest workers) never see a half-written world.
    """
    config = ToyWorldConfig() if config is None else config
    out_dir = os.fspath(out_dir).rstrip(os.sep)
    key = (VERSION, _config_json(config), file_sha256(users_csv))
    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        if (summary.get("version"), summary.get("config"), summary.get("users_sha256")) == key:
            return summary
    except (OSError, ValueError):
        pass
    if os.path.exists(out_dir):  # stale or partial: regenerate our files in place
        return make_toy_world(out_dir, users_csv, config)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    summary = make_toy_world(tmp, users_csv, config)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race; its world is byte-identical
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def default_users_csv() -> str:
    """``$PSA_JAX_USERS_CSV``, else PSAlign's ``users.csv`` shipped with the package."""
    return os.environ.get(USERS_ENV) or packaged_users_csv()
