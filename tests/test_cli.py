"""The command line and config loading."""

import pytest

from psa_jax.cli import main
from psa_jax.config import ConfigFileError, load_config


def test_load_config_by_path():
    config = load_config("configs/tiny.py")
    assert config.name == "tiny"
    assert config.model.unet["cross_attention_dim"] == config.model.text_encoder["hidden_size"]


def test_missing_config_is_named(tmp_path):
    with pytest.raises(ConfigFileError, match=r"nope\.py"):
        load_config(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigFileError, match="get_config"):
        load_config(tmp_path / "bad.py")


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.train.stpes=3", "unknown config key 'train.stpes': train has"),
        ("--config.train.steps=many", "config override 'train.steps=many'"),
        ("--stpes=3", "unrecognized argument '--stpes=3'"),
    ],
)
def test_bad_config_overrides_are_one_line_before_any_work(tmp_path, capsys, override, named):
    """A typo in an override: exit 2, one line naming it, no traceback, no workdir."""
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), override]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("psa-jax train: error: ") and len(err.splitlines()) == 1, err
    assert named in err
    assert not workdir.exists()


@pytest.mark.slow
def test_info_runs_the_tiny_models_end_to_end(capsys):
    import json

    assert main(["info", "--config", "configs/tiny.py"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shapes"]["eps_user"] == [2, 4, 16, 16]
    assert report["shapes"]["decoded"] == [2, 3, 32, 32]
    assert report["adapter_changes_untrained_output"] is False
    assert 500_000 < report["parameters"]["unet"] < 1_500_000
