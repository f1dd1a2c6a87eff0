"""User profiles (PSAlign's ``users.csv``) and the LLM prompts built from them.

A profile is age, age group, gender, religion, mental and physical condition, plus the content
categories the user bans and allows (a subset of the 7 PSAlign categories each). Users are named
by a 7-digit id, from the file's ``User_ID`` column (``users_cluster.csv``, ``center_users.csv``,
a toy world's ``users.csv``). A file without one is numbered by row (1 = first row) only where
that is known to be right: PSAlign's own ``users.csv`` (byte-identical to the packaged copy), or
when the caller says so (``ids_from_row_order=True``); any other such file is an error, since
its vectors and results would be filed under the wrong users.

The prompt templates and ``users.csv`` are PSAlign's (MIT, shipped in ``psa_jax/data/psalign``).
The templates are filled exactly as PSAlign fills them: every field with ``str()`` of the CSV
cell, so the category lists appear in Python list syntax (``['Propaganda', 'Sexuality']``) and a
missing religion as ``None``.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources

import numpy as np

from psa_jax.core.errors import PsaJaxError

CATEGORIES = ("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda")

# PSAlign's strictness levels: level 0 bans nothing, 1..5 are the KMeans cluster-centre users.
LEVEL_USERS = ("0001001", "0000797", "0000697", "0000002", "0000742", "0000501")


class ProfileError(PsaJaxError, ValueError):
    """A users file row that cannot be read; the message names the file, row and field."""


@dataclasses.dataclass(frozen=True)
class UserProfile:
    user_id: str  # 7 digits, e.g. "0000001"
    age: int
    age_group: str
    gender: str
    religion: str  # "None" where the user follows none, as in PSAlign's CSV
    physical_condition: str
    mental_condition: str
    banned: tuple[str, ...]
    allowed: tuple[str, ...]

    def user_data(self) -> dict[str, object]:
        """The ``user_data`` record of a Sage ``metadata.jsonl`` line."""
        return {
            "User_ID": self.user_id,
            "Age": self.age,
            "Age_Group": self.age_group,
            "Gender": self.gender,
            "Religion": self.religion,
            "Physical_Condition": self.physical_condition,
            "Mental_Condition": self.mental_condition,
        }


def format_user_id(index: int | str) -> str:
    """``1`` or ``"1"`` -> ``"0000001"``."""
    return f"{int(index):07d}"


def _categories(cell: str, where: str) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(cell) if cell.strip() else []
    except (ValueError, SyntaxError) as err:
        raise ProfileError(f"{where}: not a list of categories: {cell!r}") from err
    if not isinstance(value, (list, tuple)):
        raise ProfileError(f"{where}: not a list of categories: {cell!r}")
    unknown = [c for c in value if c not in CATEGORIES]
    if unknown:
        raise ProfileError(f"{where}: unknown categories {unknown}; known: {list(CATEGORIES)}")
    return tuple(dict.fromkeys(value))  # the file's order: prompts must match PSAlign's text


def read_users(path: str | os.PathLike, *, ids_from_row_order: bool = False) -> list[UserProfile]:
    """Read ``users.csv`` / ``users_cluster.csv`` / ``center_users.csv`` into profiles.

    Ids come from the ``User_ID`` column. A file without one is numbered by row (1 = first row)
    only if it is PSAlign's ``users.csv`` or ``ids_from_row_order`` is true; otherwise, and for
    an empty file, a :class:`ProfileError` names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise ProfileError(f"users file {path!r} {what}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProfileError(f"{path}: not UTF-8 text ({err})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    if not rows:
        what = "the file is empty" if not data.strip() else "a header and no rows"
        raise ProfileError(f"{path}: no users ({what})")
    has_ids = "User_ID" in (reader.fieldnames or ())
    if has_ids and ids_from_row_order:
        raise ProfileError(
            f"{path} has a User_ID column, yet ids_from_row_order (--ids-from-row-order) asks "
            "to number its users by row: drop the flag"
        )
    profiles, seen = [], set()
    for n, row in enumerate(rows, start=1):
        where = f"{path} row {n}"
        try:
            if has_ids and not (row["User_ID"] or "").strip():
                raise ProfileError(f"{where}: empty User_ID")
            uid = format_user_id(row["User_ID"]) if has_ids else format_user_id(n)
            profile = UserProfile(
                user_id=uid,
                age=int(row["Age"]),
                age_group=row["Age_Group"],
                gender=row["Gender"],
                religion=row["Religion"] or "None",
                physical_condition=row["Physical_Condition"],
                mental_condition=row["Mental_Condition"],
                banned=_categories(row["Banned_Categories"], f"{where} Banned_Categories"),
                allowed=_categories(row["Allowed_Categories"], f"{where} Allowed_Categories"),
            )
        except KeyError as err:
            raise ProfileError(f"{where}: missing column {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            if isinstance(err, ProfileError):
                raise
            raise ProfileError(f"{where}: {err}") from None
        if uid in seen:
            raise ProfileError(f"{where}: duplicate user id {uid}")
        seen.add(uid)
        profiles.append(profile)
    # Checked after the rows, so a malformed row is reported as such whatever the id columns.
    # PSAlign defines a users.csv user's id as its 1-based row number (its training and eval
    # code index the file so), so the packaged file, byte for byte, needs no User_ID column.
    if not has_ids and not ids_from_row_order and _sha256(data) != _packaged_users_sha256():
        raise ProfileError(
            f"{path}: no User_ID column, so its rows cannot be matched to users; add a User_ID "
            "column, or number the users by row (1 = first row, as in PSAlign's own users.csv) "
            "with ids_from_row_order=True (--ids-from-row-order of embed-profiles, make-toy-data)"
        )
    return profiles


def bans_by_user(users: Sequence[UserProfile]) -> dict[str, frozenset[str]]:
    """User id -> banned categories (the table :func:`chosen_is_unsafe` reads)."""
    return {u.user_id: frozenset(u.banned) for u in users}


def chosen_is_unsafe(
    bans: Mapping[str, frozenset[str]], user_ids: Iterable[str], categories: Iterable[str]
) -> np.ndarray:
    """``[B]`` bool: whether each Sage-mini pair's chosen image is its unsafe one: a Sage-mini
    pair (``toy_world.pair_record``) chooses the safe image where its user bans the caption's
    category and the unsafe one otherwise. Not true of real SAGE, whose records of a pair's
    *safe* caption choose the safe image for every user. ``bans``: :func:`bans_by_user`; a user
    not in it is a :class:`ProfileError` (that pair's images cannot be told apart)."""
    out = []
    for uid, category in zip(user_ids, categories):
        uid = str(uid)
        if uid not in bans:
            raise ProfileError(f"user {uid} of a training pair is not in the users file, so "
                               "its unsafe image is unknown")  # fmt: skip
        out.append(str(category) not in bans[uid])
    return np.asarray(out, bool)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=1)
def _packaged_users_sha256() -> str:
    with open(packaged_users_csv(), "rb") as f:
        return _sha256(f.read())


def template(name: str) -> str:
    """A shipped PSAlign prompt template: ``get_embeds`` or ``get_banned``."""
    return resources.files("psa_jax.data").joinpath("psalign", f"{name}.txt").read_text("utf-8")


def packaged_users_csv() -> str:
    """Path of PSAlign's 1,001-user ``users.csv`` shipped with the package."""
    return str(resources.files("psa_jax.data").joinpath("psalign", "users.csv"))


def embed_prompt(profile: UserProfile, tmpl: str | None = None) -> str:
    """The ``get_embeds.txt`` prompt whose pooled LLM state is the profile embedding."""
    tmpl = template("get_embeds") if tmpl is None else tmpl
    fields = {
        "<<AGE>>": str(profile.age),
        "<<AGE_GROUP>>": profile.age_group,
        "<<GENDER>>": profile.gender,
        "<<RELIGION>>": profile.religion,
        "<<MENTAL>>": profile.mental_condition,
        "<<PHYSICAL>>": profile.physical_condition,
        "<<BANNED>>": str(list(profile.banned)),
        "<<ALLOWED>>": str(list(profile.allowed)),
    }
    for key, value in fields.items():
        tmpl = tmpl.replace(key, value)
    return tmpl


def banned_prompt(profile: UserProfile, tmpl: str | None = None) -> str:
    """The ``get_banned.txt`` prompt asking an LLM for the user's banned categories."""
    tmpl = template("get_banned") if tmpl is None else tmpl
    data = {k: v for k, v in profile.user_data().items() if k != "User_ID"}
    return tmpl.replace("<<USER_DATA>>", json.dumps(data, indent=2))  # as PSAlign's get_banned.py


def parse_banned_answer(text: str) -> tuple[str, ...]:
    """The JSON list an LLM answered to :func:`banned_prompt` -> canonical categories."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ProfileError(f"LLM answer holds no JSON list: {text[:200]!r}")
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError as err:
        raise ProfileError(f"LLM answer is not a JSON list: {text[start : end + 1]!r}") from err
    return _categories(repr(value), "LLM answer")
