"""What an evaluation draws: a list of :class:`EvalItem` -- (caption, seed, user, group).

Each item is drawn for the PSA model with its user and, on the same caption and seed, for the base
model (adapter off), so every PSA image has a paired base image. Groups:

* ``level-0`` .. ``level-5``: PSAlign's strictness-level users (``gen_psa.py``) over one prompt
  set, ``draws`` seeds per prompt;
* ``seen`` / ``unseen``: prompt rows that name their own user (PSAlign's ``sage_seen.csv`` /
  ``sage_unseen.csv``; the toy world's ``test_seen`` / ``test_unseen`` prompts);
* ``users``: given users crossed with every prompt.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence

from psa_jax.core.errors import PsaJaxError
from psa_jax.data.profiles import CATEGORIES, format_user_id, read_users
from psa_jax.eval import metrics as M

BASE = "base"  # the image sets of an evaluation: the base model's and the PSA model's
PSA = "psa"


class PromptsError(PsaJaxError, ValueError):
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


def category_of(row: Mapping[str, str]) -> str | None:
    """The row's harm category; None when absent or not one of the 7."""
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
            EvalItem(row["caption"], seed + i, group, user, category_of(row), banned.get(user))
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
    prompts = list(dict.fromkeys((r["caption"], category_of(r)) for r in seen))
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
            EvalItem(r["caption"], seed + i * draws + k, "users", u, category_of(r), banned.get(u))
            for u in ids
            for i, r in enumerate(rows)
            for k in range(draws)
        ]
    if "user_id" in rows[0]:
        return row_items(rows, "rows", banned, seed=seed)
    pairs = [(r["caption"], category_of(r)) for r in rows]
    return level_items(pairs, banned, draws=draws, seed=seed)
