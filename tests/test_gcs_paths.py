"""Run folders, checkpoints, metrics and outputs on ``gs://``, through the fake GCS of
``tests/fake_gcs.py`` (fsspec's gs/gcs protocols and orbax's TensorStore kvstore both on a
local folder, with object-store semantics). Every test runs in an empty working directory
and checks that no local folder named ``gs:`` appeared: a gs:// path handled as a local one
would create ``./gs:/bucket/...`` and still "work"."""

from __future__ import annotations

import json
import os

import fake_gcs
import jax
import numpy as np
import pytest
from etils import epath
from helpers import SMALL_WORLD

from configs import tiny
from psa_jax.config import apply_overrides
from psa_jax.core import outputs, paths
from psa_jax.core.checkpoint import Checkpointer, require_run, restore_host_params
from psa_jax.train import trainer
from psa_jax.train.metrics_io import MetricWriter, last_per_step, read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("psa_cache"))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The fake ``gs://bucket`` (its local root is yielded); cwd is an empty folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs.installed(str(tmp_path / "gcs")) as root:
        yield root
    assert not os.path.exists(cwd / "gs:"), "a gs:// path was written as a local folder"
    assert os.listdir(cwd) == []


def objects(root: str, prefix: str) -> list[str]:
    """The object names under ``gs://<prefix>`` in the fake's root."""
    base = os.path.join(root, prefix)
    return sorted(
        os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs
    )


def test_the_fake_is_what_epath_uses_for_gs(gcs):
    p = epath.Path("gs://bucket/a/b.txt")
    p.write_text("x")
    assert os.path.isfile(os.path.join(gcs, "bucket", "a", "b.txt"))
    assert [c.name for c in epath.Path("gs://bucket/a").iterdir()] == ["b.txt"]
    # Object-store semantics, not a disk's: folders are implicit, nothing is appended to.
    epath.Path("gs://bucket/empty").mkdir(parents=True)
    assert not epath.Path("gs://bucket/empty").exists()
    with pytest.raises(NotImplementedError):
        fake_gcs.FakeGCSFileSystem().open("gs://bucket/a/b.txt", "ab")
    with pytest.raises(FileNotFoundError, match="no bucket"):
        epath.Path("gs://other/x").write_text("x")


def test_paths_refuse_other_schemes_and_a_missing_client(tmp_path, monkeypatch):
    with pytest.raises(paths.RemotePathError, match="only local paths and gs://"):
        paths.absolute("s3://bucket/run")
    assert paths.absolute("gs://bucket/run/") == "gs://bucket/run"
    assert paths.absolute("run") == os.path.join(os.getcwd(), "run")
    # Without gcsfs (and no fake registered), a gs:// workdir is refused by name up front.
    import fsspec

    def missing(protocol):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(paths.RemotePathError, match=r"gcsfs .*psa_jax\[gcs\]"):
        paths.check_remote("gs://bucket/run")
    paths.check_remote(str(tmp_path))  # local: nothing to check


def test_checkpointer_needs_orbax_bucket_client(gcs, monkeypatch):
    from orbax.checkpoint._src.path import gcs_utils

    def no_client(name):
        raise ModuleNotFoundError("No module named 'google.cloud.storage'")

    monkeypatch.setattr(gcs_utils, "get_bucket", no_client)
    with pytest.raises(paths.RemotePathError, match="google-cloud-storage"):
        Checkpointer("gs://bucket/run")
    config = apply_overrides(tiny.get_config(), ["data.cache_dir=/nonexistent"])
    with pytest.raises(paths.RemotePathError, match="google-cloud-storage"):
        trainer.train(config, "gs://bucket/run")  # before any data or model is prepared


def test_metric_writer_stages_and_uploads_whole(gcs):
    with MetricWriter("gs://bucket/run", tensorboard=False) as w:
        w.write(1, {"loss": 1.0})
        assert not epath.Path("gs://bucket/run/metrics.jsonl").exists()  # not yet synced
        w.sync()
        assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1]
        w.write(2, {"loss": float("nan")})
    # A second writer (a resumed run) continues the same records.
    with MetricWriter("gs://bucket/run", tensorboard=False) as w:
        w.write(3, {"loss": 0.5})
    records = read_metrics("gs://bucket/run")
    assert [r["step"] for r in records] == [1, 2, 3] and np.isnan(records[1]["loss"])
    assert objects(gcs, "bucket/run") == ["metrics.jsonl"]


def test_atomic_outputs_upload_once_complete(gcs):
    with outputs.atomic_file("gs://bucket/out/a.json") as tmp:
        assert not paths.is_remote(tmp) and tmp.endswith("a.json")
        with open(tmp, "w") as f:
            f.write("{}")
        assert not epath.Path("gs://bucket/out/a.json").exists()
    assert epath.Path("gs://bucket/out/a.json").read_text() == "{}"
    with pytest.raises(RuntimeError, match="boom"), outputs.atomic_file("gs://bucket/b.txt") as t:
        open(t, "w").close()
        raise RuntimeError("boom")
    assert not epath.Path("gs://bucket/b.txt").exists()
    # A folder: uploaded file by file; an earlier result's names it does not write go.
    for names in (("x", "old"), ("x", "y")):
        with outputs.atomic_folder("gs://bucket/dir", replaceable={"x", "y", "old"}) as tmp:
            for n in names:
                with open(os.path.join(tmp, n), "w") as f:
                    f.write(n)
    assert objects(gcs, "bucket/dir") == ["x", "y"]
    with pytest.raises(outputs.OutputExistsError, match="did not write"):
        outputs.check_folder_out("gs://bucket/dir", {"x"})
    with pytest.raises(outputs.OutputExistsError, match="is a folder"):
        outputs.check_file_out("gs://bucket/dir")


def test_data_and_base_folders_on_gs_are_refused_by_name(cache, gcs, capsys):
    from psa_jax.cli import main
    from psa_jax.data import prepare
    from psa_jax.models import loading

    config = small_config(cache, "data.cache_dir=gs://bucket/cache")
    with pytest.raises(paths.RemotePathError, match=r"data.cache_dir .*memory-mapped"):
        prepare.cache_root(config)
    config = small_config(cache, "data.users_csv=gs://bucket/users.csv")
    with pytest.raises(paths.RemotePathError, match=r"data\.users_csv"):
        prepare.prepare_data(config, models=None)
    config = small_config(cache, "model.vae_path=gs://bucket/vae")
    with pytest.raises(paths.RemotePathError, match=r"model\.vae_path"):
        loading.model_init(config.model)
    assert main(["build-data", "--source", "x", "--out", "gs://bucket/tfds"]) == 2
    assert "--out 'gs://bucket/tfds' must be a local path" in capsys.readouterr().err


def test_many_process_sample_to_gs_is_refused(gcs, monkeypatch, capsys):
    from psa_jax.cli import main

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    argv = ["sample", "--pretrained", "packaged:tiny-base", "--prompt", "a cat"]
    assert main([*argv, "--out", "gs://bucket/samples"]) == 2
    assert "shards are merged through a folder" in capsys.readouterr().err


def test_eval_reports_replace_an_earlier_one_on_gs(gcs):
    from psa_jax.eval import report

    for n in (1, 2):
        with report.atomic_output("gs://bucket/ev", "results.json") as tmp:
            report.write_json(os.path.join(tmp, "results.json"), {"n": n})
            report.write_json(os.path.join(tmp, f"only-{n}.json"), {})
    assert objects(gcs, "bucket/ev") == ["only-2.json", "results.json"]
    assert json.loads(epath.Path("gs://bucket/ev/results.json").read_text()) == {"n": 2}
    epath.Path("gs://bucket/other/x").write_text("x")
    with pytest.raises(outputs.OutputExistsError, match=r"holds no results\.json"):
        report.check_out("gs://bucket/other", "results.json")


def small_config(cache: str, *extra: str):
    return apply_overrides(tiny.get_config(), [*SMALL_WORLD, f"data.cache_dir={cache}", *extra])


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # ~45 s: compiles and trains three steps, exports twice
def test_train_checkpoint_resume_and_export_on_gs(cache, gcs):
    run = "gs://bucket/run"
    config = small_config(cache, "train.steps=2", "train.checkpoint_every=1")
    first = trainer.train(config, run)
    assert first["workdir"] == run and first["checkpoints"] == [1, 2]
    names = objects(gcs, "bucket/run")
    assert "checkpoints/2/commit_success.txt" in names and "summary.json" in names
    assert any(n.startswith("checkpoints/2/state/") for n in names)  # TensorStore's arrays
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert sorted(r["step"] for r in read_metrics(run) if "loss" in r) == [1, 2]
    # A longer run in the same folder resumes from the checkpoint of step 2 on gs://.
    second = trainer.train(apply_overrides(config, ["train.steps=3"]), run)
    assert second["start_step"] == 2 and second["checkpoints"] == [1, 2, 3]
    logged = last_per_step(read_metrics(run))
    assert sorted(s for s, r in logged.items() if "loss" in r) == [1, 2, 3]
    summary = json.loads(epath.Path(f"{run}/summary.json").read_text())
    assert summary["start_step"] == 2 and summary["step"] == 3
    step, cfg = require_run(run)
    assert step == 3 and cfg["task"] == "dpo"
    params, _ = restore_host_params(run)
    assert all(np.isfinite(x).all() for x in leaves(params))
    # Exports from the gs:// run to gs://: a file and a folder.
    from safetensors.numpy import load_file

    from psa_jax.export.formats import export_run

    out = export_run(run, "psalign", "gs://bucket/exports/psa.safetensors")
    assert out == "gs://bucket/exports/psa.safetensors"
    folder = export_run(run, "diffusers-ip-adapter", "gs://bucket/exports/ip")
    assert folder == "gs://bucket/exports/ip/ip_adapter.safetensors"
    assert objects(gcs, "bucket/exports") == ["ip/ip_adapter.safetensors", "psa.safetensors"]
    tensors = load_file(os.path.join(gcs, "bucket", "exports", "psa.safetensors"))
    kernel = np.asarray(params["user_proj"]["kernel"], np.float32)
    np.testing.assert_allclose(tensors["user_proj.proj.weight"].astype(np.float32), kernel.T)
    # The public API loads the adapter straight from the gs:// run.
    from psa_jax.models.psa_unet import PSAUNet
    from psa_jax.models.unet import UNetConfig

    unet = PSAUNet(UNetConfig.from_diffusers_config(dict(config.model.unet)), params={})
    unet.load_adapter(run)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(unet.adapter), leaves(params)))
    # Images drawn from the gs:// run into a gs:// --out.
    from psa_jax.cli import main

    argv = ["sample", "--workdir", run, "--out", "gs://bucket/samples", "--steps", "2"]
    assert main([*argv, "--prompt", "a cat", "--users", "base"]) == 0
    want = ["grid.png", "images/base/0000000.png", "samples.jsonl"]
    assert objects(gcs, "bucket/samples") == want


@pytest.mark.slow  # ~60 s: one real `psa-jax train` subprocess on the fake gs://
def test_a_sweep_on_gs_runs_records_and_reports(cache, gcs, tmp_path, capsys):
    """``psa-jax sweep --out gs://...``: each run is a ``psa-jax train`` subprocess whose
    Python goes through ``tests/scripts/with_fake_gcs.py`` (the same fake bucket)."""
    import ast
    import stat
    import sys
    import textwrap

    from psa_jax.sweep import run as run_lib
    from psa_jax.sweep.plan import plan
    from psa_jax.sweep.report import sweep_report

    here = os.path.dirname(os.path.abspath(__file__))
    python = tmp_path / "python"
    wrapper = os.path.join(here, "scripts", "with_fake_gcs.py")
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {wrapper} {gcs} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    shared = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in SMALL_WORLD)}
    shared.update({"train.steps": 1, "train.checkpoint_every": 1, "data.cache_dir": cache})
    spec = tmp_path / "configs" / "sweeps" / "s.py"
    spec.parent.mkdir(parents=True)
    tiny_py = os.path.join(os.path.dirname(here), "configs", "tiny.py")
    spec.write_text(
        textwrap.dedent(f"""
        def get_sweep():
            return {{"config": {tiny_py!r}, "overrides": {shared!r},
                     "runs": [{{"data.source": "/no/such/sage"}}, {{"train.beta": 2000.0}}]}}
    """)
    )
    runs = plan(str(spec))
    out = "gs://bucket/sweep"
    run_lib.prepare(out, str(spec), runs)
    records = run_lib.run_local(out, runs, python=str(python), log=lambda _: None)
    assert [r["status"] for r in records] == ["failed", "done"]
    failed, done = (f"{out}/{r.name}" for r in runs)
    assert "no/such/sage" in epath.Path(f"{failed}/train.log").read_text()
    assert require_run(done)[0] == 1
    rows = sweep_report(out)
    assert [r["status"] for r in rows] == ["failed", "done"] and rows[1]["step"] == 1
    names = objects(gcs, "bucket/sweep")
    assert {"sweep.json", "sweep.csv", "loss.png"} <= set(names)
    assert f"{runs[1].name}/checkpoints/1/commit_success.txt" in names
