"""``psa-jax sample`` and ``psa-jax export`` fail early and never leave a half-written ``--out``.

Bad input (an unknown user, a garbage adapter file, a folder that is not a run) is one line on
stderr and exit status 2, found before any model is built (``Pipeline.from_pretrained`` and
``load_run`` are made to fail here, so a check that came too late would show); ``--out`` is not
created and every file already there is byte-identical afterwards. Results are drawn into
``<out>.partial-<pid>`` and renamed only when complete: an error removes that folder, a SIGKILL
leaves it (named partial) but never ``--out``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file
from snapshots import tree_digest

from psa_jax import cli
from psa_jax.models.packaged import TINY_BASE, resolve
from psa_jax.sample.pipeline import Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 8  # profile embedding size of the test users


def one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("WARNING:absl:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_models(monkeypatch):
    """Building a model is a test failure: every check here must come before it."""

    def refuse(*a, **k):
        raise AssertionError("a model was built before the inputs were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(Pipeline, "from_run", classmethod(refuse))
    monkeypatch.setattr("psa_jax.train.restore.load_run", refuse)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An embed-profiles folder of users 1..3 (size DIM) and an adapter file whose header
    is a PSAlign adapter's of that size (its weights are never loaded here)."""
    from psa_jax.data.embed import embed_profiles
    from psa_jax.data.profiles import packaged_users_csv

    d = tmp_path_factory.mktemp("inputs")
    with open(packaged_users_csv(), encoding="utf-8") as f:
        lines = f.read().splitlines()[:4]
    (d / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "npy").mkdir()
    for i in (1, 2, 3):
        np.save(d / "npy" / f"{i:07d}.npy", np.full(DIM, i, np.float32))
    emb = str(d / "emb")
    embed_profiles(str(d / "users.csv"), f"npy:{d / 'npy'}", emb, ids_from_row_order=True)
    adapter = str(d / "adapter.safetensors")
    save_file({"user_proj.proj.weight": np.zeros((32, DIM), np.float32)}, adapter)
    return {"embeddings": emb, "adapter": adapter, "base": resolve(TINY_BASE)}


def run_cli(argv, capsys) -> tuple[int, str, float]:
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = cli.main(argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n{argv[0]} ... --out {argv[-1]}: exit {rc} after {seconds:.2f}s")
    return rc, err, seconds


@pytest.mark.parametrize("layout", ["grid", "rows"])
def test_unknown_user_with_embeddings_fails_before_any_model(
    inputs, tmp_path, capsys, no_models, layout
):
    (tmp_path / "keep.txt").write_text("not ours")
    out = tmp_path / "out"
    argv = ["sample", "--pretrained", inputs["base"], "--adapter", inputs["adapter"]]
    argv += ["--embeddings", inputs["embeddings"]]
    if layout == "grid":
        argv += ["--users", "base,2,4242", "--prompt", "a tent"]
    else:
        with open(tmp_path / "prompts.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerows([["caption", "user_id"], ["a tent", "1"], ["a car", "4242"]])
        argv += ["--prompts", str(tmp_path / "prompts.csv")]
    before = tree_digest(tmp_path)
    rc, err, _ = run_cli([*argv, "--out", str(out)], capsys)  # prints the seconds taken
    assert rc == 2
    line = one_line_error(err)
    assert line.startswith("psa-jax sample: error:") and "0004242" in line
    assert inputs["embeddings"] in line and "0000002" not in line
    assert not out.exists() and tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.safetensors", os.urandom(300)),
        ("garbage.bin", b"not a pickle at all\n"),
        ("empty.safetensors", b""),
        ("other.safetensors", None),  # a valid file, but not an adapter's weights
    ],
)
def test_unreadable_adapter_fails_naming_the_file(
    inputs, tmp_path, capsys, no_models, name, content
):
    path = tmp_path / name
    if content is None:
        save_file({"text_model.weight": np.zeros((2, 2), np.float32)}, str(path))
    else:
        path.write_bytes(content)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    argv = ["sample", "--pretrained", inputs["base"], "--adapter", str(path)]
    argv += ["--users", "base", "--prompt", "a tent", "--out", str(out)]
    rc, err, _ = run_cli(argv, capsys)
    assert rc == 2
    line = one_line_error(err)
    assert str(path) in line, line
    assert not out.exists() and tree_digest(tmp_path) == before


def test_sample_argument_errors_are_one_line(inputs, tmp_path, capsys, no_models):
    out = str(tmp_path / "out")
    base, adapter = inputs["base"], ["--adapter", inputs["adapter"]]
    cases = {
        "exactly one of --workdir and --pretrained": ["--prompt", "x"],
        "--prompts CSV or --prompt TEXT": ["--pretrained", base],
        "need an adapter": ["--pretrained", base, "--users", "1", "--prompt", "x"],
        "pass --embeddings": ["--pretrained", base, *adapter, "--users", "1", "--prompt", "x"],
        "no user_id column": ["--pretrained", base, "--prompt", "x"],
        "does not exist": ["--pretrained", base, "--prompts", str(tmp_path / "no.csv")],
        "not a psa-jax train run": ["--workdir", str(tmp_path), "--prompt", "x"],
    }
    for want, argv in cases.items():
        rc, err, _ = run_cli(["sample", *argv, "--out", out], capsys)
        assert rc == 2 and want in one_line_error(err), (want, err)
    assert not os.path.exists(out)


def test_a_non_empty_out_is_refused_and_left_as_it_was(inputs, tmp_path, capsys, no_models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_bytes(b"someone's image")
    before = tree_digest(tmp_path)
    argv = ["sample", "--pretrained", inputs["base"], "--users", "base", "--prompt", "x"]
    rc, err, _ = run_cli([*argv, "--out", str(out)], capsys)
    assert rc == 2 and "is not empty" in one_line_error(err)
    assert tree_digest(tmp_path) == before


class FakePipeline:
    """Grey images at once: what sample writes, without a model."""

    adapter = None
    embeddings = None

    def __call__(self, prompts, user_embeds, seeds, **kw):
        return np.full((len(prompts), 8, 8, 3), 128, np.uint8)


def test_results_appear_only_when_complete(inputs, tmp_path, capsys, monkeypatch):
    import psa_jax.sample.images as images

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda *a, **k: FakePipeline()))

    def argv(out):
        args = ["sample", "--pretrained", inputs["base"], "--users", "base", "--out", str(out)]
        return [*args, "--prompt", "a", "--prompt", "b", "--prompt", "c"]

    out = tmp_path / "out"
    out.mkdir()  # an empty --out is fine
    assert cli.main(argv(out)) == 0
    assert sorted(os.listdir(out / "images" / "base")) == [f"{i:07d}.png" for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial folder left

    saved, save_png = [], images.save_png

    def fail_on_the_second(image, path):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        save_png(image, path)

    monkeypatch.setattr(images, "save_png", fail_on_the_second)
    again = tmp_path / "again"
    before = tree_digest(tmp_path)
    with pytest.raises(OSError, match="disk full"):  # not bad input: the traceback stays
        cli.main(argv(again))
    assert saved and ".partial-" in saved[0]  # the first image was written, in the temp folder
    assert not again.exists() and tree_digest(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the temp folder was removed


def test_a_killed_sample_leaves_no_out(inputs, tmp_path):
    """SIGKILL mid-way (the temp folder holds an image, or it has existed for 2 s): only the
    ``.partial-<pid>`` folder remains; ``--out`` never appears."""
    (tmp_path / "keep.txt").write_text("not ours")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "psa_jax.cli", "sample", "--pretrained", inputs["base"]]
    argv += ["--users", "base", "--steps", "30", "--batch-size", "2", "--out", str(out)]
    for i in range(8):
        argv += ["--prompt", f"a scene number {i}"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    before = tree_digest(tmp_path)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = tmp_path / f"out.partial-{proc.pid}"
    seen = None
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 300:
            if seen is None and partial.is_dir():
                seen = time.perf_counter()
            if seen is not None:
                pngs = [f for _, _, fs in os.walk(partial) for f in fs if f.endswith(".png")]
                if pngs or time.perf_counter() - seen > 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()  # still drawing: kill it mid-way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed, appeared = time.perf_counter() - t0, (seen or t0) - t0
    print(f"killed after {killed:.1f}s (the temp folder appeared after {appeared:.1f}s)")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", partial.name]
    after = {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith(partial.name)}
    assert after == before


@pytest.mark.parametrize("layout", ["missing", "empty", "no-steps"])
def test_export_of_a_folder_without_checkpoints_fails_naming_it(
    tmp_path, capsys, no_models, layout
):
    workdir = tmp_path / "run"
    if layout != "missing":
        workdir.mkdir()
    if layout == "no-steps":
        (workdir / "checkpoints").mkdir()
    old = tmp_path / "psa.safetensors"
    old.write_bytes(b"an earlier export")
    before = tree_digest(tmp_path)
    for fmt, out in [("psalign", old), ("diffusers-unet", tmp_path / "unet")]:
        argv = ["export", "--workdir", str(workdir), "--format", fmt, "--out", str(out)]
        rc, err, _ = run_cli(argv, capsys)
        assert rc == 2
        line = one_line_error(err)
        assert line.startswith("psa-jax export: error:") and str(workdir) in line, line
        assert tree_digest(tmp_path) == before and not (tmp_path / "unet").exists()
