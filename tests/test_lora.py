"""Functional LoRA: targets match PEFT's, exported files load in diffusers with the same output
(fp32, rel L2 <= 1e-5), gradients reach only the LoRA tree, export/import round-trips."""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import SD15_LIKE, rel_err, tiny_torch_unet

import psa_jax
from psa_jax.models import convert
from psa_jax.train.lora import (
    DEFAULT_TARGETS,
    WEIGHT_NAME,
    export_lora,
    import_lora,
    init_lora,
    lora_scale,
    lora_targets,
    merge_lora,
)

TOL = 1e-5
RANK, ALPHA = 4, 8
ONE_BLOCK = {  # one cross-attention block each way: the gradient test compiles a backward pass
    **SD15_LIKE,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    torch_unet = tiny_torch_unet(SD15_LIKE)
    folder = tmp_path_factory.mktemp("sd15")
    torch_unet.save_pretrained(folder)
    unet = psa_jax.load_unet(folder)
    forward = jax.jit(lambda params, x, t, c: unet.module.apply({"params": params}, x, t, c))
    return torch_unet, unet, forward


def _random_lora(params, seed=0):
    """Non-zero down and up, so a wrong layout, transpose or scale shows in the output.

    0.1 moves the output by ~12%; at 0.3 (~120%) the random net is so ill-conditioned that
    PyTorch's merged and unmerged LoRA alone differ by 1.7e-5.
    """
    rng = np.random.default_rng(seed)
    lora = init_lora(params, RANK, rng=jax.random.key(seed))
    return jax.tree.map(lambda v: jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype), lora)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    ehs = rng.standard_normal((2, 7, SD15_LIKE["cross_attention_dim"]), dtype=np.float32)
    return x, np.array([3, 981]), ehs


def _jax_forward(forward, params, x, t, ehs):
    out = forward(params, jnp.transpose(x, (0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ehs))
    return np.asarray(jnp.transpose(out, (0, 3, 1, 2)))


def _torch_forward(unet, x, t, ehs):
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ehs)).sample.numpy()


def test_init_merges_to_base_and_targets_match_peft(twins):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    torch_unet, unet, _ = twins
    lora = init_lora(unet.params, RANK, rng=jax.random.key(0))
    peft_unet = copy.deepcopy(torch_unet)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS))
    peft_unet.add_adapter(config)
    peft_names = {n for n, m in peft_unet.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(lora) == sorted(peft_names)
    # 11 transformer blocks (4 down, 1 mid, 6 up) x attn1/attn2 x q, k, v, out
    assert len(lora) == len(lora_targets(unet.params)) == 11 * 2 * 4

    kernels = convert.flat_leaves(unet.params)
    for path in lora_targets(unet.params):
        ab = lora[".".join(path)]
        d_in, d_out = kernels[(*path, "kernel")].shape
        assert ab["down"].shape == (d_in, RANK) and ab["up"].shape == (RANK, d_out)
        assert ab["down"].dtype == ab["up"].dtype == jnp.float32
        assert 0 < np.abs(ab["down"]).max() <= 1 / np.sqrt(d_in)  # PEFT's kaiming_uniform(a=√5)
        assert not np.any(ab["up"])

    merged = convert.flat_leaves(merge_lora(unet.params, lora, lora_scale(RANK, ALPHA)))
    assert merged.keys() == kernels.keys()
    for path, leaf in kernels.items():
        np.testing.assert_array_equal(merged[path], leaf, err_msg="/".join(path))
        if path[:-1] not in lora_targets(unet.params):
            assert merged[path] is leaf  # untouched leaves are shared, not copied


def test_targets_and_merge_handle_boxed_and_abstract_params(twins):
    _, unet, _ = twins
    boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), unet.params)
    abstract = jax.eval_shape(lambda p: p, boxed)
    assert lora_targets(abstract) == lora_targets(unet.params)
    lora = _random_lora(unet.params)
    assert jax.tree.map(jnp.shape, init_lora(abstract, RANK, rng=jax.random.key(1))) == (
        jax.tree.map(jnp.shape, lora)
    )
    merged = merge_lora(boxed, lora, 2.0)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    leaf = merged["mid_block.attentions.0"]["transformer_blocks.0"]["attn2"]["to_v"]["kernel"]
    assert isinstance(leaf, nn.LogicallyPartitioned)
    base = unet.params["mid_block.attentions.0"]["transformer_blocks.0"]["attn2"]["to_v"]["kernel"]
    want = np.asarray(base) + 2.0 * np.asarray(lora[name]["down"]) @ np.asarray(lora[name]["up"])
    np.testing.assert_allclose(leaf.unbox(), want, rtol=1e-6, atol=1e-6)

    with pytest.raises(KeyError, match=r"down_blocks\.0\.attn9\.to_q"):
        merge_lora(unet.params, {"down_blocks.0.attn9.to_q": lora[name]}, 1.0)
    with pytest.raises(ValueError, match=r"\('to_qq',\)"):
        lora_targets(unet.params, targets=("to_qq",))


def test_exported_lora_matches_diffusers(twins, tmp_path):
    from diffusers import StableDiffusionPipeline

    torch_unet, unet, forward = twins
    lora = _random_lora(unet.params)
    scale = lora_scale(RANK, ALPHA)
    path = export_lora(lora, tmp_path, rank=RANK, alpha=ALPHA)
    assert path == str(tmp_path / WEIGHT_NAME)
    x, t, ehs = _inputs()
    ours = _jax_forward(forward, merge_lora(unet.params, lora, scale), x, t, ehs)
    base = _jax_forward(forward, unet.params, x, t, ehs)
    assert rel_err(base, ours) > 0.05  # the LoRA really changes the prediction

    # The UNet's own loader, then the pipeline's (lora_state_dict + load_lora_into_unet).
    adapted = copy.deepcopy(torch_unet)
    adapted.load_lora_adapter(path, weight_name=WEIGHT_NAME, prefix="unet")
    scalings = {s for m in adapted.modules() if hasattr(m, "scaling") for s in m.scaling.values()}
    assert scalings == {scale}
    err = rel_err(ours, _torch_forward(adapted, x, t, ehs))
    assert err <= TOL, err

    piped = copy.deepcopy(torch_unet)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(tmp_path), return_lora_metadata=True
    )
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, piped, metadata=metadata)
    assert rel_err(ours, _torch_forward(piped, x, t, ehs)) <= TOL

    # A hand merge in PyTorch: W + alpha/r * B @ A.
    merged = copy.deepcopy(torch_unet)
    sd = merged.state_dict()
    for name, ab in lora.items():
        a, b = (torch.from_numpy(np.asarray(ab[k]).T.copy()) for k in ("down", "up"))
        sd[f"{name}.weight"] += scale * b @ a
    merged.load_state_dict(sd)
    assert rel_err(ours, _torch_forward(merged, x, t, ehs)) <= TOL


def test_gradients_reach_only_lora(tmp_path):
    tiny_torch_unet(ONE_BLOCK).save_pretrained(tmp_path)
    unet = psa_jax.load_unet(tmp_path)
    params = unet.params
    before = jax.tree.map(np.array, params)
    lora = init_lora(params, RANK, rng=jax.random.key(0))
    scale = lora_scale(RANK, ALPHA)
    x, t, ehs = (v[:1] for v in _inputs(1))
    x = jnp.transpose(x[:, :, :8, :8], (0, 2, 3, 1))
    target = jax.random.normal(jax.random.key(2), x.shape)

    def loss_fn(lora, params):
        out = unet.module.apply({"params": merge_lora(params, lora, scale)}, x, t, ehs)
        return jnp.mean((out - target) ** 2)

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss0, grads = step(lora, params)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    for name, g in grads.items():  # up == 0 at init: d/d(down) = g_W @ up.T vanishes
        assert not np.any(g["down"]), name
        assert np.any(g["up"]), name
    lora = jax.tree.map(lambda p, g: p - 1.0 * g, lora, grads)
    loss1, grads = step(lora, params)
    assert np.isfinite(loss1) and loss1 < loss0
    assert all(np.any(g["down"]) for g in grads.values())
    jax.tree.map(np.testing.assert_array_equal, params, before)  # frozen base bitwise unchanged


def test_export_import_round_trip_and_missing_key(twins, tmp_path):
    from safetensors import safe_open

    _, unet, _ = twins
    lora = _random_lora(unet.params, seed=3)
    path = export_lora(lora, tmp_path / "lora.safetensors", rank=RANK, alpha=ALPHA)
    back, meta = import_lora(path)
    assert meta == {"rank": RANK, "alpha": ALPHA}
    assert back.keys() == lora.keys()
    jax.tree.map(np.testing.assert_array_equal, back, lora)

    state = convert.read_state_dict(path)
    with safe_open(path, framework="np") as f:
        header = f.metadata()
    assert json.loads(header["lora_adapter_metadata"])["unet.lora_alpha"] == ALPHA
    gone = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.lora_B.weight"
    del state[gone]
    convert.write_safetensors(state, tmp_path / "broken.safetensors", metadata=header)
    with pytest.raises(psa_jax.WeightMismatchError, match=gone.replace(".", r"\.")):
        import_lora(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="rank 4, export was given 8"):
        export_lora(lora, tmp_path / "x.safetensors", rank=8, alpha=ALPHA)
