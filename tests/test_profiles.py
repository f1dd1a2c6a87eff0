"""User profiles from PSAlign's CSV files and the prompts filled from them."""

import csv
import os

import pytest

from psa_jax.data.profiles import (
    CATEGORIES,
    LEVEL_USERS,
    ProfileError,
    banned_prompt,
    embed_prompt,
    parse_banned_answer,
    read_users,
    template,
)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "psalign")


def test_reads_psalign_users():
    users = read_users(os.path.join(SHARED, "users.csv"))
    assert len(users) == 1001
    assert users[0].user_id == "0000001" and users[-1].user_id == "0001001"
    for u in users:  # banned and allowed split the 7 categories
        assert set(u.banned).isdisjoint(u.allowed)
        assert set(u.banned) | set(u.allowed) == set(CATEGORIES)
    assert users[-1].banned == ()  # level 0: the user who bans nothing


def test_cluster_centres_are_the_strictness_levels():
    centres = read_users(os.path.join(SHARED, "center_users.csv"))
    assert {u.user_id for u in centres} == set(LEVEL_USERS[1:])


def test_embed_prompt_is_filled_as_psalign_fills_it():
    path = os.path.join(SHARED, "users.csv")
    with open(path, newline="") as f:
        row = list(csv.DictReader(f))[1]
    tmpl = open(os.path.join(SHARED, "templates", "get_embeds.txt"), encoding="utf-8").read()
    assert tmpl == template("get_embeds")  # the shipped copy is PSAlign's file
    expected = tmpl
    for key, col in [
        ("<<AGE>>", "Age"),
        ("<<AGE_GROUP>>", "Age_Group"),
        ("<<GENDER>>", "Gender"),
        ("<<RELIGION>>", "Religion"),
        ("<<MENTAL>>", "Mental_Condition"),
        ("<<PHYSICAL>>", "Physical_Condition"),
        ("<<BANNED>>", "Banned_Categories"),
        ("<<ALLOWED>>", "Allowed_Categories"),
    ]:
        expected = expected.replace(key, str(row[col]))
    assert embed_prompt(read_users(path)[1]) == expected
    asked = banned_prompt(read_users(path)[1])
    assert '{\n  "Age": 20,\n  "Age_Group": "young adults",' in asked
    assert "User_ID" not in asked


def _write(tmp_path, banned):
    path = tmp_path / "users.csv"
    path.write_text(
        "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,"
        "Banned_Categories,Allowed_Categories\n"
        f'30,adults,female,None,healthy,healthy,"{banned}","[]"\n'
    )
    return path


def test_bad_rows_are_named(tmp_path):
    with pytest.raises(
        ProfileError, match=r"row 1 Banned_Categories: unknown categories \['Gore'\]"
    ):
        read_users(_write(tmp_path, "['Gore']"))
    with pytest.raises(ProfileError, match="not a list"):
        read_users(_write(tmp_path, "Violence"))
    (tmp_path / "short.csv").write_text("Age,Gender\n3,male\n")
    with pytest.raises(ProfileError, match="missing column 'Age_Group'"):
        read_users(tmp_path / "short.csv")


def test_parse_banned_answer():
    assert parse_banned_answer('Sure.\n["Violence", "Hate"]') == ("Violence", "Hate")
    assert parse_banned_answer("[]") == ()
    with pytest.raises(ProfileError, match="no JSON list"):
        parse_banned_answer("I cannot answer that.")
    with pytest.raises(ProfileError, match="unknown categories"):
        parse_banned_answer('["Spam"]')
