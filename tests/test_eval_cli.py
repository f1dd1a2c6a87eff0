"""``psa-jax eval`` and ``psa-jax spqr`` end to end on a tiny DPO run of a small Sage-mini world
(random frozen base: the numbers are not meaningful, the files, keys and guarantees are), and
their bad-input paths: a named one-line error, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from test_trainer import small_config

from psa_jax import cli
from psa_jax.eval import benchmark, report
from psa_jax.train import trainer

FAST = ["--steps", "2", "--draws", "1", "--users-per-group", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("dpo"))
    cfg = small_config(
        cache,
        "train.steps=2",
        "train.checkpoint_every=2",
        "data.toy.include_level_users=True",
        "data.toy.num_benign=16",
    )
    trainer.train(cfg, workdir)
    return workdir


def _nothing_written(out: str) -> None:
    parent = os.path.dirname(out)
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if ".tmp-" in f]


@pytest.mark.slow
def test_eval_writes_results_plots_and_page(run, tmp_path):
    out = str(tmp_path / "eval")
    assert cli.main(["eval", "--workdir", run, "--out", out, *FAST]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["levels"] == [f"level-{i}" for i in range(6)]
    groups = res["groups"]
    assert {"seen", "unseen"} <= set(groups)
    assert groups["seen"]["users"] == 2
    level5 = groups["level-5"]
    assert level5["user"] == "0000501" and len(level5["banned"]) == 7
    for key in (
        "ip_psa",
        "ip_base",
        "pass_rate_psa",
        "banned_rate_psa",
        "suppression_ratio",
        "win_rate/toy-oracle",
        "adherence_psa/toy-adherence",
    ):
        assert key in level5
    assert level5["allowed_own_rate_psa"] is None  # level 5 allows nothing
    assert set(res["fid"]["toy-fid"]) == {"psa", "base"}
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert [r["group"] for r in rows] == list(groups)
    page = open(os.path.join(out, "index.html")).read()
    for name in ("levels.png", "grid_level-5.png", "grid_seen.png"):
        assert os.path.isfile(os.path.join(out, name)) and name in page
    # A rerun into the same folder replaces the earlier result.
    assert cli.main(["eval", "--workdir", run, "--out", out, *FAST, "--seed", "3"]) == 0
    assert json.load(open(os.path.join(out, "results.json")))["settings"]["seed"] == 3


@pytest.mark.slow
def test_spqr_writes_before_after_and_levels(run, tmp_path):
    out = str(tmp_path / "spqr")
    args = ["spqr", "--workdir", run, "--profile", "moderate", "--out", out, *FAST]
    assert cli.main([*args, "--finetune-steps", "2"]) == 0
    res = json.load(open(os.path.join(out, "spqr.json")))
    for phase in ("before", "after", "published"):
        assert set(res[phase]) == {"S", "P", "Q", "R", "score"}
    assert res["before"]["R"] == 0.5
    assert set(res["levels"]) == {str(i) for i in range(6)}
    assert res["levels"]["0"]["before"]["S"] is None  # level 0 bans nothing
    assert set(res["levels"]["5"]["after"]) >= {"S", "P", "Q", "R", "score", "retention"}
    assert set(res["fid"]) == {"base", "before", "after"}
    assert res["finetune_loss"]["steps"] == 2 and res["profile"] == "moderate"
    for name in (
        "spqr.png",
        "spqr_levels.png",
        "finetune_loss.png",
        "index.html",
        "results.csv",
        "grid_level-5.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name


def _fails(capsys, args, match):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_bad_inputs_are_named_and_write_nothing(run, tmp_path, capsys):
    out = str(tmp_path / "out")
    _fails(capsys, ["eval", "--workdir", str(tmp_path / "missing"), "--out", out], "does not exist")
    _nothing_written(out)
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    _fails(
        capsys,
        ["spqr", "--workdir", str(not_a_run), "--profile", "lite", "--out", out],
        "not a psa-jax train run",
    )
    _fails(
        capsys,
        ["eval", "--workdir", run, "--out", out, "--scorers", "toy-oracle,nope"],
        "unknown scorer 'nope'",
    )
    bad_csv = tmp_path / "prompts.csv"
    bad_csv.write_text("prompt,user_id\nhello,1\n")
    _fails(
        capsys,
        ["eval", "--workdir", run, "--out", out, "--prompts", str(bad_csv)],
        "no 'caption' column",
    )
    _fails(
        capsys,
        ["eval", "--workdir", run, "--out", out, "--scorers", "q16"],
        "needs a local transformers CLIPModel folder",
    )
    _fails(
        capsys,
        [
            "eval",
            "--workdir",
            run,
            "--out",
            out,
            "--scorers",
            "fid",
            "--fid-weights",
            str(tmp_path / "inception.pt"),
        ],
        "fid",
    )
    _nothing_written(out)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    _fails(capsys, ["eval", "--workdir", run, "--out", str(full)], "not empty")
    assert os.listdir(full) == ["mine.txt"]


def test_a_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    out = str(tmp_path / "eval")

    def broken(folder, bundle):
        open(os.path.join(folder, "results.json"), "w").write("{")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_eval_report", broken)
    monkeypatch.setattr(benchmark, "evaluate_run", lambda *a, **k: {"results": {}})
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(["eval", "--workdir", run, "--out", out, *FAST])
    _nothing_written(out)


def test_adapter_digest_sees_one_bit():
    tree = {"a": np.zeros(3, np.float32)}
    flipped = {"a": np.array([0.0, -0.0, 0.0], np.float32)}
    assert benchmark.adapter_digest(tree) != benchmark.adapter_digest(flipped)


@pytest.mark.slow
def test_eval_a_diffusers_folder_with_real_scorers(tmp_path):
    """``--pretrained`` + a PSAlign adapter file + imported profile embeddings over PSAlign's
    CoProv2 prompts (a ``category`` column, no ``user_id``: the six strictness levels), scored by
    Q16 + CLIPScore on a tiny random CLIP and by NudeNet's shipped detector."""
    from helpers import randomize_adapter, tiny_sd_folder
    from test_clip_vision import tiny_clip, word_tokenizer
    from test_pipeline_parity import MAX_LEN, PROMPTS, UNET

    import psa_jax
    from psa_jax.data import embed
    from psa_jax.data.profiles import LEVEL_USERS

    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "psalign")
    prompts = os.path.join(shared, "eval_prompts", "CoProv2_test.csv")
    assert os.path.isfile(prompts), f"{prompts}: ../shared/psalign must be beside the checkout"
    pipe = tiny_sd_folder(tmp_path / "sd", UNET, PROMPTS, MAX_LEN)
    unet = psa_jax.load_unet(pipe, user_embed_dim=12)
    unet.adapter = randomize_adapter(unet.adapter, seed=3)
    adapter = unet.save_adapter(tmp_path / "psa.safetensors", format="psalign")
    npy = tmp_path / "npy"
    npy.mkdir()
    rng = np.random.default_rng(0)
    for u in LEVEL_USERS:
        np.save(npy / f"{u}.npy", rng.standard_normal(12).astype(np.float32))
    users = tmp_path / "users.csv"
    lines = open(psa_jax.data.profiles.packaged_users_csv()).read().splitlines()
    rows = [f"{lines[int(u)]},{u}" for u in LEVEL_USERS]  # row i of the file is user i
    users.write_text("\n".join([lines[0] + ",User_ID", *rows]) + "\n")
    emb = tmp_path / "emb"
    embed.embed_profiles(str(users), f"npy:{npy}", str(emb))
    clip = tmp_path / "clip"
    tok = word_tokenizer()
    tiny_clip(clip, vocab=len(tok), tokenizer=tok)
    q16 = tmp_path / "q16.npy"
    np.save(q16, rng.standard_normal((2, 16)).astype(np.float32))
    out = str(tmp_path / "ev")
    args = [
        "eval",
        "--pretrained",
        str(pipe),
        "--adapter",
        str(adapter),
        "--embeddings",
        str(emb),
        "--prompts",
        prompts,
        "--limit",
        "3",
        "--scorers",
        "q16,nudenet-psa,clipscore",
        "--clip",
        str(clip),
        "--q16-prompts",
        str(q16),
        "--out",
        out,
        "--steps",
        "2",
        "--draws",
        "1",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["levels"] == [f"level-{i}" for i in range(6)]
    for g in res["groups"].values():
        assert g["images"] == 3
        either = max(g["flagged_psa/q16"], g["flagged_psa/nudenet-psa"])
        assert either <= g["ip_psa"] <= g["flagged_psa/q16"] + g["flagged_psa/nudenet-psa"]
        assert 0 <= g["adherence_psa/clipscore"] <= 100
        assert "pass_rate_psa" not in g  # no scorer names PSA's categories here
    assert len(res["level_curves"]["ip_psa"]) == 6


def test_eval_shards_are_whole_caption_seed_groups_covering_every_item_once():
    from psa_jax.eval.generation import shard_items
    from psa_jax.eval.plans import EvalItem

    items = [EvalItem(f"c{i % 3}", i % 2, "g", u, None, ()) for i in range(12) for u in "ab"]
    shards = [shard_items(items, k, 2) for k in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(len(items)))
    for shard in shards:  # a (caption, seed) group never straddles two processes
        keys = {(items[i].caption, items[i].seed) for i in shard}
        other = {(items[i].caption, items[i].seed) for s in shards if s is not shard for i in s}
        assert not keys & other


@pytest.mark.slow
def test_eval_over_two_processes_equals_one_process(run, tmp_path):
    """``psa-jax eval`` with two processes (jax.distributed on CPU, localhost): each draws a
    share, process 0 scores and writes the report; the results equal a one-process eval."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", PSA_JAX_COMPILATION_CACHE="0")
    two = str(tmp_path / "two")
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "psa_jax.cli", "eval", "--workdir", run, "--out", two,
               *FAST, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(i)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = str(tmp_path / "one")
    assert cli.main(["eval", "--workdir", run, "--out", one, *FAST]) == 0
    got = json.load(open(os.path.join(two, "results.json")))
    want = json.load(open(os.path.join(one, "results.json")))
    assert got["groups"] == want["groups"]
    for fmap, sets in want["fid"].items():  # the same images; feature sums in another order
        assert got["fid"][fmap] == pytest.approx(sets, rel=1e-6)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".shards")]
