"""configs/*.py build the intended architectures (checked abstractly, no weights allocated)."""

import numpy as np
from flax.core import meta
from flax.traverse_util import flatten_dict

from configs import sd15, sdxl, tiny
from psa_jax.models.psa_unet import abstract_variables, unet_module_from_config


def _count(tree, keep=lambda path: True) -> int:
    return sum(int(np.prod(x.shape)) for p, x in flatten_dict(tree).items() if keep(p))


def _counts(config):
    variables = meta.unbox(abstract_variables(unet_module_from_config(config.model)))
    adapter = variables["adapter"]
    kv = _count(adapter, lambda p: p[-2] in ("to_k_user", "to_v_user"))
    proj = _count(adapter, lambda p: p[0] == "user_proj")
    assert kv + proj == _count(adapter)
    return _count(variables["params"]), kv, proj


def test_sd15_matches_diffusers_parameter_counts():
    base, kv, proj = _counts(sd15.get_config())
    assert base == 859_520_964  # diffusers' SD1.5 UNet
    assert kv == 19_169_280  # 16 cross-attention layers, to_k_user + to_v_user (768 -> inner)
    assert proj == 2_754_816  # Linear(3584 -> 768) + LayerNorm(768)


def test_sdxl_matches_diffusers_parameter_counts():
    base, kv, proj = _counts(sdxl.get_config())
    assert base == 2_567_463_684  # diffusers' SDXL base UNet
    # 70 cross-attention layers with inner widths summing to 83,200; 2048-d user tokens.
    assert kv == 2 * 2048 * 83_200
    assert proj == 3584 * 2048 + 2048 + 2 * 2048


def test_tiny_is_about_a_million_params():
    base, kv, proj = _counts(tiny.get_config())
    assert 500_000 < base < 1_500_000, base
    t = tiny.get_config().model.adapter.num_user_tokens  # user tokens of width 32 each
    assert kv > 0 and proj == 384 * 32 * t + 32 * t + 2 * 32  # LayerNorm over each token


def test_model_init_is_explicit_and_checked():
    """Nothing trains on random weights unless the config says so (API.md)."""
    import ml_collections
    import pytest

    from psa_jax.models.loading import ModelInitError, model_init
    from psa_jax.models.packaged import TINY_BASE

    assert (tiny.get_config().model.init, tiny.get_config().model.pretrained) == (
        "pretrained",
        TINY_BASE,
    )
    assert tiny.get_config("base").model.init == tiny.get_config("vae").model.init == "random"
    assert sd15.get_config().model.init == sdxl.get_config().model.init == "pretrained"
    with pytest.raises(ModelInitError, match=r"needs model\.pretrained"):
        model_init(sd15.get_config().model)  # no folder given: an error, not random weights
    with pytest.raises(ModelInitError, match="both name a base"):
        model_init(ml_collections.ConfigDict({"init": "pretrained", "pretrained": "a",
                                              "base_workdir": "b"}))  # fmt: skip
    with pytest.raises(ModelInitError, match="unknown"):
        model_init(ml_collections.ConfigDict({"init": "zeros"}))
    with pytest.raises(ModelInitError, match=r"no model\.init"):  # never inferred
        model_init(ml_collections.ConfigDict({"base_workdir": "runs/b"}))


def test_real_model_config_without_weights_names_the_key(tmp_path, capsys):
    """`psa-jax train --config configs/sd15.py` with no folder: one line naming the keys to
    set, exit 2, before any data or model work (no workdir left behind)."""
    import re

    from psa_jax.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/sd15.py", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("psa-jax train: error: ")
    assert re.search(r"model\.pretrained.*model\.init='random'", err), err
    assert not workdir.exists()


def test_old_run_configs_migrate_by_named_rule_or_fail(caplog):
    """A run saved before schema versions gets each missing key from the named rule (logged,
    the value such runs used); a newer schema is refused; a current run passes unchanged."""
    import logging

    import pytest

    from psa_jax.config import SCHEMA_VERSION, RunConfigError, migrate_run_config, stamp_schema

    old = {"task": "dpo", "model": {"base_workdir": "runs/b", "adapter": {"user_embed_dim": 8}},
           "data": {"source": "toy"}, "train": {"steps": 3}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="psa_jax.config"):
        new = migrate_run_config(old, "runs/x")
    assert new["schema_version"] == SCHEMA_VERSION and "schema_version" not in old
    assert new["model"]["init"] == "pretrained"  # it named a base run
    assert new["data"]["flip_pair"] == "joint" and new["train"]["dpo_chosen_weight"] == 0.0
    assert new["model"]["adapter"]["proj_init"] == "torch"
    assert "pre-schema-defaults" in caplog.text and "data.flip_pair='joint'" in caplog.text
    assert migrate_run_config({"model": {}}, "r")["model"]["init"] == "random"

    current = stamp_schema(tiny.get_config().to_dict())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="psa_jax.config"):
        assert migrate_run_config(current, "r") == current
    assert caplog.text == ""  # nothing to migrate, nothing said
    with pytest.raises(RunConfigError, match="newer psa_jax"):
        migrate_run_config({**current, "schema_version": SCHEMA_VERSION + 1}, "r")
    with pytest.raises(RunConfigError, match="positive integer"):
        migrate_run_config({**current, "schema_version": "2"}, "r")


def test_every_config_carries_the_keys_the_library_reads():
    """The current configs need no migration: every key the v1 rule would fill is present, so
    the library reads them directly (no `.get(key, default)` fallbacks)."""
    from psa_jax.config import SCHEMA_VERSION, migrate_run_config, stamp_schema

    for cfg in (tiny.get_config(), tiny.get_config("vae"), tiny.get_config("base"),
                tiny.get_config("calibrate"), sd15.get_config(), sdxl.get_config()):  # fmt: skip
        d = stamp_schema(cfg.to_dict())
        d.pop("schema_version")
        assert migrate_run_config(d, "r") == {**d, "schema_version": SCHEMA_VERSION}, cfg.get(
            "name"
        )


def test_packaged_names_resolve_or_fail_by_name(tmp_path):
    import pytest

    from psa_jax.models.packaged import PackagedModelError, resolve

    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(PackagedModelError, match="no packaged model 'huge'"):
        resolve("packaged:huge")


def test_overrides_set_typed_values_and_reject_unknown_keys():
    import pytest

    from psa_jax.cli.train import config_overrides
    from psa_jax.config import ConfigOverrideError, apply_overrides

    items = config_overrides(
        [
            "--config.train.steps=7",
            "--config.optim.learning_rate",
            "3e-4",
            "--config.data.toy.num_users=5",
            "--config.data.resolution=32",
        ]
    )
    cfg = apply_overrides(tiny.get_config(), items)
    assert (cfg.train.steps, cfg.optim.learning_rate) == (7, 3e-4)
    assert (cfg.data.toy.num_users, cfg.data.resolution) == (5, 32)
    assert apply_overrides(tiny.get_config(), ["optim.learning_rate=1"]).optim.learning_rate == 1.0
    with pytest.raises(KeyError, match="train has"):
        apply_overrides(tiny.get_config(), ["train.stpes=3"])
    with pytest.raises(KeyError, match="unknown config key"):
        apply_overrides(tiny.get_config(), ["trian.steps=3"])
    with pytest.raises(ConfigOverrideError, match=r"train\.steps=many"):
        apply_overrides(tiny.get_config(), ["train.steps=many"])
    with pytest.raises(ConfigOverrideError, match="unrecognized"):
        config_overrides(["--steps=3"])


def test_every_config_has_the_training_sections():
    for module in (tiny, sd15, sdxl):
        cfg = module.get_config()
        for section in ("model", "noise", "data", "optim", "train", "mesh"):
            assert section in cfg, (module.__name__, section)
        assert cfg.task == "dpo"
        if module is not tiny:  # PSAlign's loss on real models; the tiny world's is in its docs
            assert cfg.train.beta == 5000.0 and cfg.train.dpo_chosen_weight == 0.0


def test_unsafe_weights_are_checked_and_migrated():
    """``train.unsafe_weights``: known categories, numbers >= 0, only for task=denoise, users
    known; runs saved at schema v2 get ``{}`` (equal weights, how they trained) by the rule."""
    import pytest

    from psa_jax.config import apply_overrides, migrate_run_config
    from psa_jax.train.checks import ConfigValueError, check_config

    check_config(tiny.get_config("calibrate"))
    for text, match in (('{"Shock": 2.0}', "unknown category 'Shock'"),
                        ('{"Hate": -1.0}', "Hate")):  # fmt: skip
        cfg = apply_overrides(tiny.get_config("base"), [f"train.unsafe_weights={text}"])
        with pytest.raises(ConfigValueError, match=match):
            check_config(cfg)
    dpo = apply_overrides(tiny.get_config(), ['train.unsafe_weights={"Hate": 2.0}'])
    with pytest.raises(ConfigValueError, match="does not read"):
        check_config(dpo)
    sage = apply_overrides(tiny.get_config("calibrate"), ["data.source=/data/sage"])
    with pytest.raises(ConfigValueError, match="real SAGE"):
        check_config(sage)
    v2 = {**tiny.get_config("base").to_dict(), "schema_version": 2}
    del v2["train"]["unsafe_weights"]
    assert migrate_run_config(v2, "r")["train"]["unsafe_weights"] == {}


def test_recipes_are_psalign_launchers():
    """sd15/sdxl train as PSAlign's launchers ran on 4 GPUs (launchers/train_sd15.sh: 6 x 8 x 4
    = 192 pairs, AdamW; train_sdxl.sh: 2 x 16 x 4 = 128 pairs, Adafactor, checkpointing); the
    tiny DPO stage keeps its measured recipe (no empty captions)."""
    for module, pairs, opt in ((sd15, 192, "adamw"), (sdxl, 128, "adafactor")):
        cfg = module.get_config()
        assert cfg.train.batch_size * cfg.train.accum_steps == pairs, module.__name__
        assert (cfg.optim.name, cfg.optim.learning_rate, cfg.optim.schedule) == (
            opt, 5e-6, "constant_with_warmup")  # fmt: skip
        assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.grad_clip_norm) == (
            500, 1e-2, 1.0)  # fmt: skip
        assert (cfg.train.steps, cfg.train.checkpoint_every, cfg.train.beta) == (5000, 500, 5000)
        assert cfg.data.flip_pair == "independent" and cfg.model.dtype == "bfloat16"
    assert sd15.get_config().data.caption_dropout == 0.2  # --proportion_empty_prompts
    assert sdxl.get_config().data.caption_dropout == 0.36  # drawn twice with --sdxl
    assert (sd15.get_config().model.remat_policy, sdxl.get_config().model.remat_policy) == (
        "none", "full")  # fmt: skip
    assert tiny.get_config().data.caption_dropout == 0.0
    assert tiny.get_config("base").data.caption_dropout == 0.1
    assert tiny.get_config("calibrate").data.caption_dropout == 0.1


def test_init_adapter_is_checked_and_migrated(tmp_path, caplog):
    """``model.init_adapter``: an existing path, task=dpo only (checked before anything is
    built); runs saved at schema v3 get ``""`` (a fresh adapter, how they trained)."""
    import logging

    import pytest

    from psa_jax.config import apply_overrides, migrate_run_config
    from psa_jax.train.checks import ConfigValueError, check_config

    assert tiny.get_config().model.init_adapter == sd15.get_config().model.init_adapter == ""
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigValueError, match=r"model\.init_adapter=.*nope.*no such file"):
        check_config(apply_overrides(tiny.get_config(), [f"model.init_adapter={missing}"]))
    check_config(apply_overrides(tiny.get_config(), [f"model.init_adapter={tmp_path}"]))
    base = apply_overrides(tiny.get_config("base"), [f"model.init_adapter={tmp_path}"])
    with pytest.raises(ConfigValueError, match="does not read it"):
        check_config(base)
    v3 = {**tiny.get_config().to_dict(), "schema_version": 3}
    del v3["model"]["init_adapter"]
    with caplog.at_level(logging.WARNING, logger="psa_jax.config"):
        assert migrate_run_config(v3, "r")["model"]["init_adapter"] == ""
    assert "'init-adapter'" in caplog.text and "model.init_adapter=''" in caplog.text
