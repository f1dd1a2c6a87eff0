"""Issue 17, weight and dataset files: a bad input file is a named error that says which file and
what is wrong with it, found before anything is written, and the file itself is left untouched.

Each case prints how long it took to fail (printed, not asserted: run with ``-s`` to see it).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import numpy as np
import pytest
import torch
from helpers import SD15_LIKE, tiny_sd_folder
from snapshots import digests

import psa_jax
from psa_jax import cli
from psa_jax.core.errors import EXIT_BAD_INPUT, PsaJaxError
from psa_jax.data.sage import BadRecordError, build_data
from psa_jax.models import convert
from psa_jax.models.convert import MissingWeightFileError, WeightFileError
from psa_jax.models.psa_unet import PSAUNet, abstract_variables
from psa_jax.models.unet import UNet2DConditionModel

D = 12  # profile embedding size of the adapter files
UNET = {**SD15_LIKE, "sample_size": 8, "layers_per_block": 1}


# -- helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def fails_in(case: str):
    """Print the time to fail of the block (time.perf_counter), not asserted."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        print(f"[time to fail] {case}: {time.perf_counter() - t0:.3f}s")


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``psa-jax argv``; assert exit 2 and one ``psa-jax <cmd>: error:`` line; return it."""
    capsys.readouterr()
    assert cli.main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("psa-jax ")]
    assert len(lines) == 1 and lines[0].startswith(f"psa-jax {argv[0]}: error: "), err
    return lines[0]


def _adapter_tree(config, user_embed_dim: int) -> dict:
    """An all-zero adapter of the right shapes (no compile: from ``jax.eval_shape``)."""
    import jax
    from flax.core import meta

    module = UNet2DConditionModel(config, user_embed_dim=user_embed_dim, num_user_tokens=1)
    ref = meta.unbox(abstract_variables(module)["adapter"])
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), ref)


# -- weight files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny diffusers pipeline folder (random UNet, CLIP text encoder, VAE, DDIM)."""
    return tiny_sd_folder(tmp_path_factory.mktemp("pipe"), UNET, ["a red cat"], 8)


@pytest.fixture(scope="module")
def base(folder, tmp_path_factory):
    """The folder's UNet (no adapter) and a valid PSAlign adapter file's bytes for it."""
    unet = psa_jax.load_unet(folder)
    with_adapter = PSAUNet(unet.config, unet.params, adapter=_adapter_tree(unet.config, D))
    path = with_adapter.save_adapter(tmp_path_factory.mktemp("good") / "adapter.safetensors")
    with open(path, "rb") as f:
        return unet, f.read()


def _fresh(base) -> PSAUNet:
    unet, _ = base
    return PSAUNet(unet.config, unet.params)


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def _touch(path):  # what a malicious pickle would run; torch.load(weights_only=True) must not
    open(path, "w").close()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _bad_weight_file(kind: str, tmp_path, good: bytes) -> tuple[str, str]:
    """(path, expected message fragment) of a bad adapter file of ``kind``."""
    if kind == "garbage-safetensors":
        rng = np.random.default_rng(0)
        return _write(tmp_path / "adapter.safetensors", rng.bytes(4096)), (
            "not a readable safetensors file"
        )
    if kind == "truncated-safetensors":
        return _write(tmp_path / "adapter.safetensors", good[: len(good) // 2]), (
            "not a readable safetensors file"
        )
    if kind == "empty-safetensors":
        return _write(tmp_path / "adapter.safetensors", b""), "empty file (0 bytes)"
    if kind == "empty-bin":
        return _write(tmp_path / "psa_adapter.bin", b""), "empty file (0 bytes)"
    if kind == "garbage-bin":
        rng = np.random.default_rng(1)
        return _write(tmp_path / "psa_adapter.bin", rng.bytes(4096)), (
            "torch.load(weights_only=True)"
        )
    if kind == "truncated-bin":
        torch.save({"user_proj.proj.weight": torch.zeros(24, D)}, tmp_path / "full.bin")
        data = (tmp_path / "full.bin").read_bytes()
        return _write(tmp_path / "psa_adapter.bin", data[: len(data) // 2]), (
            "torch.load(weights_only=True) cannot read it"
        )
    if kind == "pickle-with-code-bin":
        path = tmp_path / "psa_adapter.bin"
        torch.save({"user_proj.proj.weight": _Evil(os.fspath(tmp_path / "pwned"))}, path)
        return os.fspath(path), "torch.load(weights_only=True) refuses it"
    raise AssertionError(kind)


WEIGHT_CASES = [
    "garbage-safetensors",
    "truncated-safetensors",
    "empty-safetensors",
    "empty-bin",
    "garbage-bin",
    "truncated-bin",
    "pickle-with-code-bin",
]


@pytest.mark.parametrize("kind", WEIGHT_CASES)
def test_bad_adapter_file_is_a_named_error(base, tmp_path, kind):
    path, fragment = _bad_weight_file(kind, tmp_path, base[1])
    before = digests(tmp_path)
    unet = _fresh(base)
    with fails_in(f"load_adapter {kind}"), pytest.raises(WeightFileError) as err:
        unet.load_adapter(path)
    msg = str(err.value)
    assert isinstance(err.value, PsaJaxError) and isinstance(err.value, ValueError)
    assert msg.startswith(f"{path}: ") and fragment in msg, msg
    assert err.value.path == path
    assert "\n" not in msg  # the CLI prints it as one line
    assert unet.adapter is None and unet.user_embed_dim is None  # nothing half-loaded
    assert digests(tmp_path) == before
    assert not (tmp_path / "pwned").exists()  # no pickled code ran


def test_missing_weight_file_is_a_named_error_and_still_file_not_found(base, tmp_path):
    path = os.fspath(tmp_path / "nope.safetensors")
    with fails_in("load_adapter missing"), pytest.raises(MissingWeightFileError) as err:
        _fresh(base).load_adapter(path)
    assert isinstance(err.value, PsaJaxError) and isinstance(err.value, FileNotFoundError)
    assert str(err.value) == f"{path}: no such weights file"
    assert not os.path.exists(path)


def test_sharded_index_names_the_index_and_a_missing_shard(tmp_path):
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("{not json")
    with fails_in("read_state_dict garbage index"), pytest.raises(WeightFileError) as err:
        convert.read_state_dict(index)
    assert str(err.value).startswith(f"{index}: not valid JSON")
    index.write_text(json.dumps({"weight_map": {"a.weight": "shard-1.safetensors"}}))
    before = digests(tmp_path)
    with pytest.raises(MissingWeightFileError) as err:
        convert.read_state_dict(index)
    assert str(err.value) == (
        f"{tmp_path / 'shard-1.safetensors'}: no such shard (listed in {index})"
    )
    assert digests(tmp_path) == before


def test_mismatched_adapter_names_the_file(base, tmp_path):
    unet, _ = base
    other = PSAUNet(unet.config, unet.params, adapter=_adapter_tree(unet.config, D + 3))
    path = other.save_adapter(tmp_path / "adapter_d15.safetensors")
    before = digests(path)
    target = PSAUNet(unet.config, unet.params, adapter=_adapter_tree(unet.config, D))
    with fails_in("load_adapter shape mismatch"), pytest.raises(psa_jax.WeightMismatchError) as e:
        target.load_adapter(path)
    msg = str(e.value)
    assert isinstance(e.value, PsaJaxError)
    assert msg.startswith(f"adapter file {path} (psalign) does not match the model:"), msg
    assert "user_proj.proj.weight" in msg
    # A file of some other model's weights: no adapter keys at all, still named.
    other_model = tmp_path / "not_an_adapter.safetensors"
    convert.write_safetensors({"conv_in.weight": np.zeros((2, 2), np.float32)}, other_model)
    with pytest.raises(psa_jax.WeightMismatchError, match=r"not_an_adapter\.safetensors"):
        _fresh(base).load_adapter(other_model)
    assert digests(path) == before


def test_cli_sample_with_a_garbage_adapter_exits_2_naming_it(folder, tmp_path, capsys):
    garbage = _write(tmp_path / "adapter.safetensors", np.random.default_rng(2).bytes(1000))
    before = digests(garbage, folder)
    out = tmp_path / "samples"
    argv = ["sample", "--pretrained", os.fspath(folder), "--adapter", garbage]
    argv += ["--prompt", "a red cat", "--users", "base", "--out", os.fspath(out), "--steps", "1"]
    with fails_in("psa-jax sample --adapter garbage"):
        line = cli_error(capsys, argv)
    assert garbage in line, line  # the CLI's own adapter check, or load_adapter's error
    assert not out.exists()
    assert digests(garbage, folder) == before


# -- dataset files ---------------------------------------------------------------------------------


def _record(i: int) -> dict:
    return {
        "chosen": f"{i}_s.png",
        "rejected": f"{i}_u.png",
        "caption": f"caption {i}",
        "user_data": {"User_ID": "0000001"},
    }


def _sage(root, text: str | bytes, images: int = 0) -> str:
    """A Sage split folder whose ``metadata.jsonl`` is ``text`` (and ``images`` PNG pairs)."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    for i in range(images):
        for k in "su":
            Image.new("RGB", (4, 4), (i, 0, 0)).save(os.path.join(root, f"{i}_{k}.png"))
    with open(os.path.join(root, "metadata.jsonl"), "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return os.fspath(root)


@pytest.mark.parametrize("text", ["", "\n  \n\n"], ids=["zero-bytes", "blank-lines"])
def test_build_data_of_an_empty_metadata_exits_2_naming_it(tmp_path, capsys, text):
    src = _sage(tmp_path / "src", text)
    meta = os.path.join(src, "metadata.jsonl")
    out = tmp_path / "out"
    before = digests(src)
    with fails_in(f"build-data empty metadata ({text!r})"):
        line = cli_error(capsys, ["build-data", "--source", src, "--out", os.fspath(out)])
    assert f"{meta}: no records" in line, line
    assert not out.exists()
    assert digests(src) == before
    with pytest.raises(BadRecordError, match="no records"):  # skip_bad has nothing to skip
        build_data(src, out, skip_bad=True)
    assert not out.exists()


def test_build_data_of_a_non_json_line_names_file_and_line(tmp_path, capsys):
    lines = [json.dumps(_record(0)), "this is not json", json.dumps(_record(1))]
    src = _sage(tmp_path / "src", "\n".join(lines) + "\n", images=2)
    meta = os.path.join(src, "metadata.jsonl")
    out = tmp_path / "out"
    before = digests(src)
    with fails_in("build-data non-JSON line"):
        line = cli_error(capsys, ["build-data", "--source", src, "--out", os.fspath(out)])
    assert f"{meta} line 2: malformed JSON" in line, line
    assert not out.exists()  # checked before anything is written
    assert digests(src) == before


def test_build_data_of_a_non_utf8_line_names_file_and_line_and_skip_bad_skips_it(tmp_path):
    text = (json.dumps(_record(0)) + "\n").encode() + b"\xff\xfe garbage\n"
    src = _sage(tmp_path / "src", text, images=1)
    meta = os.path.join(src, "metadata.jsonl")
    with fails_in("build-data non-UTF-8 line"), pytest.raises(BadRecordError) as err:
        build_data(src, tmp_path / "out")
    assert str(err.value).startswith(f"{meta} line 2: not UTF-8 text")
    assert not (tmp_path / "out").exists()
    report = build_data(src, tmp_path / "out", skip_bad=True)  # skip_bad semantics unchanged
    assert (report.num_records, report.num_skipped) == (1, 1)
    assert report.skipped[0][0] == 2


def test_build_data_with_every_line_bad_and_skip_bad_says_nothing_is_left(tmp_path, capsys):
    src = _sage(tmp_path / "src", "nope\n{}\n")
    meta = os.path.join(src, "metadata.jsonl")
    out = tmp_path / "out"
    argv = ["build-data", "--source", src, "--out", os.fspath(out), "--skip-bad"]
    with fails_in("build-data every line bad, --skip-bad"):
        line = cli_error(capsys, argv)
    assert f"{meta}: no records left to build: all 2 are bad" in line, line
    assert not out.exists()


def test_build_data_with_every_image_unreadable_and_skip_bad_names_the_metadata(tmp_path):
    src = _sage(tmp_path / "src", json.dumps(_record(0)) + "\n")
    for k in "su":
        _write(os.path.join(src, f"0_{k}.png"), b"not a png")
    meta = os.path.join(src, "metadata.jsonl")
    before = digests(src)
    with fails_in("build-data every image unreadable"), pytest.raises(BadRecordError) as err:
        build_data(src, tmp_path / "out", skip_bad=True)
    assert str(err.value).startswith(f"{meta}: no records left to build"), err.value
    assert "0_s.png" in str(err.value)
    assert os.listdir(tmp_path / "out") == []  # the temporary build folder is gone
    assert digests(src) == before


def test_build_data_of_a_missing_source_exits_2(tmp_path, capsys):
    src, out = os.fspath(tmp_path / "nowhere"), tmp_path / "out"
    with fails_in("build-data missing source"):
        line = cli_error(capsys, ["build-data", "--source", src, "--out", os.fspath(out)])
    assert f"{src}: no such folder" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = cli_error(capsys, ["build-data", "--source", os.fspath(empty), "--out", os.fspath(out)])
    assert f"{empty}: no metadata.jsonl" in line
    assert not out.exists()


def test_written_safetensors_files_are_readable_by_the_group_as_any_new_file():
    """safetensors itself creates files 0600; exports (adapters, packed bases) on shared storage
    must open for colleagues like any file the user writes: 0666 minus the umask."""
    import stat

    import ml_dtypes

    old = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory() as d:
            for name, arr in (("f32", np.zeros(2, np.float32)),
                              ("bf16", np.zeros(2, ml_dtypes.bfloat16))):  # fmt: skip
                path = os.path.join(d, f"{name}.safetensors")
                convert.write_safetensors({"w": arr}, path)
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, name
        os.umask(0o027)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "g.safetensors")
            convert.write_safetensors({"w": np.zeros(2, np.float32)}, path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)
