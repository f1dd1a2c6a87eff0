"""``model.init_adapter``: a DPO run that starts from an existing adapter (a PSAlign file, a
diffusers IP-Adapter export, or a dpo run folder) holds exactly that adapter at step 0;
resuming still wins over it; an adapter of other shapes is a named error."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax.core import meta
from test_trainer import small_config

from configs import tiny
from psa_jax.config import apply_overrides
from psa_jax.core import parallel
from psa_jax.core.checkpoint import Checkpointer, restore_host_params
from psa_jax.export.formats import export_run
from psa_jax.models import loading
from psa_jax.models.adapter_io import export_adapter, import_adapter
from psa_jax.models.convert import WeightMismatchError, write_safetensors
from psa_jax.models.psa_unet import abstract_variables, unet_module_from_config
from psa_jax.train import tasks, trainer


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def same(a, b) -> bool:
    """Bit-equal trees (structure, dtype and every value)."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b))
    )


def step0_params(config, workdir: str):
    """The trainable state ``train(config, workdir)`` would start its loop from."""
    inputs = trainer.prepare_inputs(config)
    with Checkpointer(workdir, max_to_keep=1, async_save=False) as ckpt:
        run = trainer.create_state(config, inputs, ckpt, parallel.make_mesh(config.mesh))
        assert int(run.state.step) == run.start
        return run.start, jax.device_get(run.state.params)


def test_dpo_run_starts_from_an_exported_adapter_bit_for_bit(tmp_path):
    cache, first = str(tmp_path / "cache"), str(tmp_path / "first")
    trainer.train(small_config(cache, "train.steps=2", "train.checkpoint_every=2"), first)
    trained, _ = restore_host_params(first)
    psalign = export_run(first, "psalign", str(tmp_path / "psa_adapter.safetensors"))
    ip = export_run(first, "diffusers-ip-adapter", str(tmp_path / "ip"))

    cont = small_config(cache, f"model.init_adapter={psalign}", "train.steps=3")
    assert cont.model.adapter.proj_init == "standardized"  # skipped: the file is the start
    # The initialisation reads no embeddings (the file is the start); only an optimizer that
    # steps in the users' coordinates would (train.user_proj_space, the demo's "standardized").
    raw = apply_overrides(cont, ["train.user_proj_space=raw"])
    assert tasks.training_user_embeds(raw, None, None) is None
    start, params = step0_params(cont, str(tmp_path / "cont"))
    assert start == 0 and same(params, trained)

    # The IP-Adapter export and the run folder itself start the same adapter.
    models = loading.load_base_models(cont, unet_only=True)
    for source in (ip, first):
        cfg = apply_overrides(cont, [f"model.init_adapter={source}"])
        assert same(tasks.build_task(cfg, models).trainable, trained), source

    # Resuming wins: a run with a checkpoint continues from it, not from init_adapter.
    other = jax.tree.map(lambda x: x + 1.0, trained)
    other_file = str(tmp_path / "other.safetensors")
    write_safetensors(export_adapter(other, "psalign"), other_file)
    cfg = small_config(cache, f"model.init_adapter={other_file}", "train.steps=2")
    assert same(tasks.build_task(cfg, models).trainable, other)
    start, params = step0_params(cfg, first)
    assert start == 2 and same(params, trained)


def test_an_adapter_of_other_shapes_is_a_named_error(tmp_path):
    model = tiny.get_config().model  # T=4 user tokens of width 32, 384-d profiles
    module = unet_module_from_config(model)
    adapter = jax.tree.map(
        lambda x: np.ones(x.shape, np.float32), meta.unbox(abstract_variables(module)["adapter"])
    )
    path = str(tmp_path / "psa_adapter.safetensors")
    write_safetensors(export_adapter(adapter, "psalign"), path)
    for override, shown in (("model.adapter.num_user_tokens=1", "num_user_tokens=1"),
                            ("model.adapter.user_embed_dim=64", "user_embed_dim=64")):  # fmt: skip
        cfg = apply_overrides(
            tiny.get_config(), ["model.init=random", f"model.init_adapter={path}", override]
        )
        models = loading.load_base_models(cfg, unet_only=True, unet_params=False)
        with pytest.raises(loading.ModelInitError, match=rf"model\.init_adapter=.*{shown}.*"
                           r"user_proj\.proj\.weight"):  # fmt: skip
            tasks.build_task(cfg, models)
    cfg = apply_overrides(tiny.get_config(), [f"model.init_adapter={tmp_path / 'none.bin'}"])
    with pytest.raises(loading.ModelInitError, match=r"model\.init_adapter=.*none\.bin"):
        tasks.start_adapter(cfg, module)


@pytest.mark.parametrize("tokens", [1, 2])
def test_ip_adapter_export_of_fewer_tokens_imports_back(tokens):
    """diffusers' IP-Adapter has 4 tokens: a T<4 adapter is exported with each token repeated
    and imported back into its own T-token tree exactly; other 4-token files do not fit."""
    model = tiny.get_config().model
    model.adapter.num_user_tokens = tokens
    ref = meta.unbox(abstract_variables(unet_module_from_config(model))["adapter"])
    rng = np.random.default_rng(tokens)
    adapter = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), ref)
    state = export_adapter(adapter, "diffusers-ip-adapter")
    assert state["image_proj.proj.weight"].shape[0] == 4 * 32
    assert same(import_adapter(state, ref), adapter)
    w = state["image_proj.proj.weight"].copy()
    w[-1] += 1.0  # the last token no longer repeats its own
    with pytest.raises(WeightMismatchError, match=r"image_proj\.proj\.weight"):
        import_adapter({**state, "image_proj.proj.weight": w}, ref)
