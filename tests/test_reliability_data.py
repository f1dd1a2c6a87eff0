"""Issue 17: bad users files and embedding folders fail by name, fast, and change nothing.

Each failure is checked through ``psa-jax`` itself: exit code 2, one stderr line that names the
file, user or folder, and every file that existed before byte-identical afterwards. The time to
fail is printed (``pytest -s`` shows it), not asserted. Vectors come from a hash "encoder"
registered for the test, or from ``.npy`` files (``npy:DIR``), so no model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
from snapshots import tree_digest

from psa_jax.cli import main
from psa_jax.data import embed, encoders
from psa_jax.data.embed import embed_profiles, load_embeddings
from psa_jax.data.embed_format import FORMAT, EmbeddingError, EmbeddingFileError
from psa_jax.data.profiles import ProfileError, embed_prompt, packaged_users_csv, read_users

DIM = 8
PACKAGED = packaged_users_csv()
with open(PACKAGED, encoding="utf-8") as _f:
    PACKAGED_LINES = _f.read().splitlines()  # [header, user 1, user 2, ...]


class HashEncoder:
    """A text encoder without a model: the first DIM bytes of the text's sha256."""

    name, dim, pooling = "hash", DIM, "sha256 bytes"
    checksum = "sha256:" + "0" * 64

    def encode(self, texts, batch_size: int = 8) -> np.ndarray:
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:DIM], np.uint8) for t in texts]
        return (np.stack(rows) / 255.0).astype(np.float32).reshape(len(texts), DIM)


@pytest.fixture(autouse=True)
def hash_encoder(monkeypatch):
    """``--encoder hash`` on the command line."""
    monkeypatch.setitem(encoders.ENCODERS, "hash", (False, lambda _arg, _dev, _dt: HashEncoder()))


def users_file(path, rows: dict[int, int] | list[int], with_ids: bool = True) -> str:
    """A users CSV of packaged rows: ``{user id: packaged row}`` (or a list: id == row)."""
    rows = dict(zip(rows, rows)) if isinstance(rows, list) else rows
    header = PACKAGED_LINES[0] + (",User_ID" if with_ids else "")
    body = [PACKAGED_LINES[r] + (f",{uid:07d}" if with_ids else "") for uid, r in rows.items()]
    path.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
    return str(path)


def npy_folder(path, sizes: dict[int, int]) -> str:
    """``<id>.npy`` float32 vectors of the given sizes (PSAlign's layout, no manifest)."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for uid, n in sizes.items():
        np.save(path / f"{uid:07d}.npy", rng.standard_normal(n).astype(np.float32))
    return str(path)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``psa-jax ARGV``: (exit code, stdout, stderr); prints how long it took."""
    capsys.readouterr()
    start = time.perf_counter()
    rc = main([*argv])
    took = time.perf_counter() - start
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(f"\n  psa-jax {argv[0]} -> exit {rc} in {took * 1000:.1f} ms")
    return rc, out, err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"psa-jax {command}: error: "), lines[0]
    return lines[0]


def embed_cli(capsys, users: str, out, encoder: str = "hash", *extra: str):
    return cli(capsys, "embed-profiles", "--users", users, "--encoder", encoder,
               "--out", str(out), *extra)  # fmt: skip


def existing_folder(tmp_path, ids=(1, 2)) -> tuple[str, dict[str, str]]:
    """An embeddings folder of users ``ids`` (hash encoder) and the sha256 of its files."""
    out = tmp_path / "emb"
    embed_profiles(users_file(tmp_path / "first.csv", list(ids)), HashEncoder(), out)
    return str(out), tree_digest(out)


# ----------------------------------------------------------------------------- users files


def test_users_csv_without_user_id_is_refused_by_name(tmp_path, capsys):
    users = users_file(tmp_path / "cut.csv", [1, 2, 3], with_ids=False)
    rc, out, err = embed_cli(capsys, users, tmp_path / "emb")
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and out == ""
    assert users in line and "User_ID" in line and "--ids-from-row-order" in line
    assert not (tmp_path / "emb").exists()
    rc, _, err = cli(capsys, "make-toy-data", "--out", str(tmp_path / "world"), "--users", users)
    line = one_error_line(err, "make-toy-data")
    assert rc == 2 and users in line and "--ids-from-row-order" in line
    assert not (tmp_path / "world").exists()
    with pytest.raises(ProfileError, match="no User_ID column"):
        read_users(users)


def test_ids_from_row_order_numbers_users_by_row(tmp_path, capsys):
    users = users_file(tmp_path / "cut.csv", [1, 2, 3], with_ids=False)
    rc, out, _ = embed_cli(capsys, users, tmp_path / "emb", "hash", "--ids-from-row-order")
    assert rc == 0 and json.loads(out)["num_users"] == 3
    vecs = load_embeddings(tmp_path / "emb")
    by_row = {p.user_id: p for p in read_users(PACKAGED)}
    assert list(vecs) == ["0000001", "0000002", "0000003"]
    for uid, vec in vecs.items():  # row i is the packaged file's user i
        want = HashEncoder().encode([embed_prompt(by_row[uid])])[0]
        np.testing.assert_array_equal(vec, want)
    rows = {i: i for i in range(1, 31)}
    users30 = users_file(tmp_path / "cut30.csv", rows, with_ids=False)
    argv = ["--num-users", "8", "--num-unseen-users", "3", "--users", users30]
    rc, _, _ = cli(capsys, "make-toy-data", "--out", str(tmp_path / "w"), *argv,
                   "--ids-from-row-order")  # fmt: skip
    assert rc == 0
    written = read_users(tmp_path / "w" / "users.csv")  # the toy world writes User_ID
    assert all(by_row[p.user_id] == p for p in written)
    # A file that names its users and the flag contradict each other: refused, by name.
    named = users_file(tmp_path / "named.csv", [1, 2])
    rc, _, err = embed_cli(capsys, named, tmp_path / "emb2", "hash", "--ids-from-row-order")
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and named in line and "User_ID" in line
    assert not (tmp_path / "emb2").exists()


def test_packaged_users_csv_needs_no_flag(tmp_path, capsys):
    users = read_users(PACKAGED)
    assert len(users) == 1001 and [u.user_id for u in users[:2]] == ["0000001", "0000002"]
    copy = tmp_path / "users.csv"
    copy.write_bytes(open(PACKAGED, "rb").read())  # byte-identical copy: also PSAlign's file
    rc, out, _ = embed_cli(capsys, str(copy), tmp_path / "emb")
    assert rc == 0 and json.loads(out)["num_users"] == 1001
    assert (tmp_path / "emb" / "0001001.npy").is_file()
    # One byte changed (CRLF line ends) and it is no longer known to be PSAlign's table.
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(open(PACKAGED, "rb").read().replace(b"\n", b"\r\n"))
    rc, _, err = embed_cli(capsys, str(crlf), tmp_path / "emb_crlf")
    assert rc == 2 and str(crlf) in one_error_line(err, "embed-profiles")


@pytest.mark.parametrize("content", ["", PACKAGED_LINES[0] + "\n"], ids=["0-bytes", "header"])
def test_empty_users_csv_into_existing_folder_changes_nothing(tmp_path, capsys, content):
    out, before = existing_folder(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text(content, encoding="utf-8")
    rc, stdout, err = embed_cli(capsys, str(empty), out)
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and stdout == ""
    assert str(empty) in line and "no users" in line
    assert tree_digest(out) == before
    assert list(load_embeddings(out)) == ["0000001", "0000002"]


# ----------------------------------------------------------------------------- merging


def test_merge_same_encoder_keeps_old_vectors(tmp_path, capsys):
    out, before = existing_folder(tmp_path, ids=(1, 2))
    more = users_file(tmp_path / "more.csv", [2, 3, 4])  # user 2 again, same profile
    rc, stdout, err = embed_cli(capsys, more, out)
    assert rc == 0, err
    assert json.loads(stdout)["num_users"] == 4
    after = tree_digest(out)
    assert {k: after[k] for k in before if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }  # every old vector byte-identical
    assert sorted(after) == sorted([*before, "0000003.npy", "0000004.npy"])  # no temp files
    manifest = json.loads(open(os.path.join(out, "manifest.json"), encoding="utf-8").read())
    assert manifest["format"] == FORMAT and manifest["num_users"] == 4
    assert manifest["user_ids"] == ["0000001", "0000002", "0000003", "0000004"]
    assert [r["users_csv"] for r in manifest["runs"]] == ["first.csv", "more.csv"]
    assert [r["added"] for r in manifest["runs"]] == [2, 2]
    vecs = load_embeddings(out)
    stacked = np.stack([vecs[u] for u in manifest["user_ids"]])
    assert manifest["vectors_sha256"] == "sha256:" + hashlib.sha256(stacked.tobytes()).hexdigest()
    # The same users once more: nothing to add, nothing rewritten.
    again = tree_digest(out)
    assert embed_cli(capsys, more, out)[0] == 0 and tree_digest(out) == again


def test_same_user_with_another_vector_is_refused(tmp_path, capsys):
    out, before = existing_folder(tmp_path, ids=(1, 2))
    clash = users_file(tmp_path / "clash.csv", {2: 5, 3: 3})  # "user 2" with user 5's profile
    rc, stdout, err = embed_cli(capsys, clash, out)
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and stdout == ""
    assert "0000002" in line and out in line and "0000003" not in line
    assert tree_digest(out) == before


def test_different_encoder_is_refused(tmp_path, capsys):
    out, before = existing_folder(tmp_path, ids=(1, 2))
    src = npy_folder(tmp_path / "vecs", {1: DIM, 2: DIM, 3: DIM})
    users = users_file(tmp_path / "u.csv", [3])
    rc, stdout, err = embed_cli(capsys, users, out, f"npy:{src}")
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and stdout == ""
    assert out in line and "encoder hash" in line and "npy:vecs" in line
    assert tree_digest(out) == before


def test_a_crash_mid_write_leaves_the_folder_consistent(tmp_path, monkeypatch):
    out, before = existing_folder(tmp_path, ids=(1, 2))
    real_save, calls = np.save, []

    def save_then_crash(file, arr, **kw):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(file, arr, **kw)

    monkeypatch.setattr(embed.np, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        embed_profiles(users_file(tmp_path / "more.csv", [3, 4]), HashEncoder(), out)
    monkeypatch.undo()
    after = tree_digest(out)
    assert {k: after[k] for k in before} == before  # the old manifest still rules
    assert set(after) - set(before) <= {"0000003.npy"}  # a finished file, unlisted; no temp file
    assert list(load_embeddings(out)) == ["0000001", "0000002"]


# ----------------------------------------------------------------------------- .npy sizes


def test_wrong_shaped_npy_names_the_odd_file(tmp_path, capsys):
    # The odd file sorts first: taking the first file's size would blame the two good ones.
    src = npy_folder(tmp_path / "vecs", {1: 5, 2: DIM, 3: DIM})
    before = tree_digest(src)
    users = users_file(tmp_path / "u.csv", [1, 2, 3])
    rc, _, err = embed_cli(capsys, users, tmp_path / "emb", f"npy:{src}")
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and "0000001.npy" in line and "0000002.npy" not in line
    assert "(5,)" in line and f"({DIM},)" in line
    assert tree_digest(src) == before and not (tmp_path / "emb").exists()
    # An embeddings folder: the manifest's dim is the size to expect, whatever most files say.
    out, _ = existing_folder(tmp_path, ids=(1, 2, 3))
    for uid in ("0000001", "0000002"):
        np.save(os.path.join(out, f"{uid}.npy"), np.zeros(5, np.float32))
    for load in (
        lambda: load_embeddings(out),
        lambda: encoders.get_encoder(f"npy:{out}").vectors(["0000001"]),
    ):
        with pytest.raises(EmbeddingFileError) as info:
            load()
        msg = str(info.value)
        assert "0000001.npy" in msg and "(5,)" in msg and f"({DIM},)" in msg
        assert "manifest.json" in msg


def test_npy_size_tie_names_both_sizes(tmp_path, capsys):
    src = npy_folder(tmp_path / "vecs", {1: 5, 2: DIM})
    users = users_file(tmp_path / "u.csv", [1, 2])
    rc, _, err = embed_cli(capsys, users, tmp_path / "emb", f"npy:{src}")
    line = one_error_line(err, "embed-profiles")
    assert rc == 2 and src in line and "0000001.npy" in line and "0000002.npy" in line
    assert "(5,)" in line and f"({DIM},)" in line
    with pytest.raises(EmbeddingError, match="no majority"):
        encoders.get_encoder(f"npy:{src}")
