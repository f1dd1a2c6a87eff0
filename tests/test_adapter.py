"""PSA adapter: parity with PSAlign's processor and diffusers' IP-Adapter, file formats, errors."""

import os

import jax
import numpy as np
import pytest
import torch
from helpers import (
    SD15_LIKE,
    SDXL_LIKE,
    psa_reference_processor,
    psa_reference_projection,
    randomize_adapter,
    rel_err,
    tiny_torch_unet,
)

import psa_jax
from psa_jax.models.adapter import standardize_projection
from psa_jax.models.adapter_io import export_adapter
from psa_jax.models.psa_unet import PSAUNet

TOL = 1e-5
D = 12  # profile embedding size of the tiny tests
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "psalign")


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg["in_channels"], 16, 16), dtype=np.float32)
    ehs = rng.standard_normal((2, 7, cfg["cross_attention_dim"]), dtype=np.float32)
    t = np.array([10, 700])
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {
            "text_embeds": rng.standard_normal((2, text_dim), dtype=np.float32),
            "time_ids": rng.uniform(0, 1024, (2, 6)).astype(np.float32),
        }
    user = 3 * rng.standard_normal((2, D), dtype=np.float32)
    return x, t, ehs, added, user


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def base(request, tmp_path_factory):
    cfg = {"sd15": SD15_LIKE, "sdxl": SDXL_LIKE}[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    tiny_torch_unet(cfg).save_pretrained(folder)
    return cfg, folder


def _psa_unet(folder, num_tokens, seed=0):
    unet = psa_jax.load_unet(folder, user_embed_dim=D, num_user_tokens=num_tokens)
    unet.adapter = randomize_adapter(unet.adapter, seed)
    return unet


def _torch(unet, x, t, ehs, added, **extra):
    kw = {k: torch.from_numpy(v) for k, v in (added or {}).items()}
    kw.update(extra)
    with torch.no_grad():
        return unet(
            torch.from_numpy(x), torch.from_numpy(t), ehs, added_cond_kwargs=kw or None
        ).sample.numpy()


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_matches_psalign_reference_processor(base, num_tokens, tmp_path):
    cfg, folder = base
    unet = _psa_unet(folder, num_tokens)
    path = unet.save_adapter(tmp_path / "psa.safetensors", format="psalign")
    # Load our export the way PSAlign does: processors in attn_processors order, ModuleList.
    from safetensors.torch import load_file

    sd = load_file(path)
    ref = tiny_torch_unet(cfg)
    cross, scale = cfg["cross_attention_dim"], 0.7
    procs = {}
    for name, proc in ref.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = ref.get_submodule(name[: -len(".processor")])
            proc = psa_reference_processor(attn.to_q.out_features, cross, num_tokens, scale)
        procs[name] = proc
    ref.set_attn_processor(procs)
    psa_procs = torch.nn.ModuleList(p for n, p in ref.attn_processors.items() if "attn2" in n)
    psa_procs.load_state_dict(
        {k[len("psa_adapter.") :]: v for k, v in sd.items() if k.startswith("psa_adapter.")}
    )
    proj = psa_reference_projection(D, cross, num_tokens)
    proj.load_state_dict(
        {k[len("user_proj.") :]: v for k, v in sd.items() if k.startswith("user_proj.")}
    )

    x, t, ehs, added, user = _inputs(cfg)
    with torch.no_grad():
        tokens = proj(torch.from_numpy(user))
    expected = _torch(ref, x, t, torch.cat([torch.from_numpy(ehs), tokens], 1), added)
    got = unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user, user_scale=scale)
    assert rel_err(got, expected) <= TOL
    # The adapter really acts: the base output differs at this tolerance.
    assert rel_err(unet(x, t, ehs, added_cond_kwargs=added), expected) > 100 * TOL


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_matches_diffusers_ip_adapter(base, num_tokens):
    cfg, folder = base
    unet = _psa_unet(folder, num_tokens, seed=1)
    sd = export_adapter(unet.adapter, "diffusers-ip-adapter")
    split = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        group, rest = k.split(".", 1)
        split[group][rest] = torch.from_numpy(v)
    ref = tiny_torch_unet(cfg)
    ref._load_ip_adapter_weights([split], low_cpu_mem_usage=False)
    scale = 0.6
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [scale]

    x, t, ehs, added, user = _inputs(cfg, seed=2)
    expected = _torch(
        ref, x, t, torch.from_numpy(ehs), added, image_embeds=[torch.from_numpy(user)[:, None, :]]
    )
    got = unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user, user_scale=scale)
    assert rel_err(got, expected) <= TOL


def test_single_token_fast_path_equals_general_path(base):
    _, folder = base
    unet = _psa_unet(folder, 1, seed=3)
    general = PSAUNet(unet.config, unet.params, adapter=unet.adapter, user_embed_dim=D)
    general.module = general.module.clone(user_fast_path=False)
    general._apply = jax.jit(general.module.apply)
    x, t, ehs, added, user = _inputs(base[0])
    fast = unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user)
    slow = general(x, t, ehs, added_cond_kwargs=added, user_embeds=user)
    assert rel_err(fast, slow) <= 1e-6


def test_adapter_off_is_exactly_the_base(base):
    cfg, folder = base
    plain = psa_jax.load_unet(folder)
    fresh = psa_jax.load_unet(folder, user_embed_dim=D)
    x, t, ehs, added, user = _inputs(cfg)
    want = np.asarray(plain(x, t, ehs, added_cond_kwargs=added))
    # Zero-initialised k/v: the untrained adapter changes nothing.
    np.testing.assert_array_equal(fresh(x, t, ehs, added_cond_kwargs=added, user_embeds=user), want)
    trained = _psa_unet(folder, 1)
    np.testing.assert_array_equal(trained(x, t, ehs, added_cond_kwargs=added), want)
    np.testing.assert_array_equal(
        trained(x, t, ehs, added_cond_kwargs=added, user_embeds=user, user_scale=0.0), want
    )


def test_per_sample_user_scale(base):
    cfg, folder = base
    unet = _psa_unet(folder, 1)
    x, t, ehs, added, user = _inputs(cfg)
    mixed = np.asarray(
        unet(
            x,
            t,
            ehs,
            added_cond_kwargs=added,
            user_embeds=user,
            user_scale=np.array([0.0, 0.5], np.float32),
        )
    )
    off = np.asarray(unet(x, t, ehs, added_cond_kwargs=added))
    half = np.asarray(unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user, user_scale=0.5))
    # Float rounding only (the three calls compile to differently fused programs): values ~1.
    np.testing.assert_allclose(mixed[0], off[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], half[1], rtol=1e-5, atol=1e-5)


def test_psalign_file_round_trip_and_bin(base, tmp_path):
    cfg, folder = base
    unet = _psa_unet(folder, 4, seed=5)
    path = unet.save_adapter(tmp_path / "a.safetensors")
    fresh = psa_jax.load_unet(folder)  # no slots yet: D and T come from the file
    fresh.load_adapter(path)
    assert (fresh.user_embed_dim, fresh.num_user_tokens) == (D, 4)
    jax.tree.map(np.testing.assert_array_equal, fresh.adapter, unet.adapter)

    # PSAlign's own checkpoint: torch.save of {"user_proj": {...}, "psa_adapter": {...}}.
    from safetensors.torch import load_file

    flat = load_file(path)
    nested = {
        g: {k.split(".", 1)[1]: v.half() for k, v in flat.items() if k.startswith(g)}
        for g in ("user_proj", "psa_adapter")
    }
    torch.save(nested, tmp_path / "psa_adapter.bin")
    from_bin = psa_jax.load_unet(folder, user_embed_dim=D, num_user_tokens=4)
    from_bin.load_adapter(tmp_path / "psa_adapter.bin")
    x, t, ehs, added, user = _inputs(cfg)
    a = unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user)
    b = from_bin(x, t, ehs, added_cond_kwargs=added, user_embeds=user)
    assert rel_err(b, a) < 1e-2  # the .bin was stored in fp16, as PSAlign stores it


def _bad_file(path, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    edit(sd)
    out = tmp_path / "bad.safetensors"
    save_file(sd, out)
    return out


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.pop("psa_adapter.3.to_v_user.0.weight"), "psa_adapter.3.to_v_user.0.weight"),
        (
            lambda sd: sd.update({"psa_adapter.99.to_k_user.0.weight": torch.zeros(2, 2)}),
            "psa_adapter.99.to_k_user.0.weight",
        ),
        (
            lambda sd: sd.update({"psa_adapter.0.to_k_user.0.weight": torch.zeros(5, 5)}),
            "psa_adapter.0.to_k_user.0.weight",
        ),
    ],
)
def test_bad_adapter_file_names_the_key(base, tmp_path, edit, named):
    _, folder = base
    unet = _psa_unet(folder, 1)
    bad = _bad_file(unet.save_adapter(tmp_path / "ok.safetensors"), tmp_path, edit)
    with pytest.raises(psa_jax.WeightMismatchError, match=named.replace(".", r"\.")):
        psa_jax.load_unet(folder).load_adapter(bad)


def test_bad_unet_checkpoint_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_torch_unet(SD15_LIKE).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["conv_in.weigth"] = sd.pop("conv_in.weight")  # a typo'd key: missing + unexpected
    sd["conv_out.bias"] = torch.zeros(7)
    save_file(sd, weights)
    with pytest.raises(psa_jax.WeightMismatchError) as err:
        psa_jax.load_unet(tmp_path)
    msg = str(err.value)
    assert "missing keys (1): conv_in.weight" in msg
    assert "unexpected keys (1): conv_in.weigth" in msg
    assert "conv_out.bias: checkpoint (7,), model expects (4,)" in msg


def test_real_psalign_profile_embedding_projects(base):
    _, folder = base
    emb = np.load(os.path.join(SHARED, "embeddings", "0000001.npy"))
    assert emb.shape == (3584,) and emb.dtype == np.float32
    unet = psa_jax.load_unet(folder, user_embed_dim=3584)
    x, t, ehs, added, _ = _inputs(base[0])
    user = np.stack([emb, np.zeros_like(emb)])  # a real profile and CFG's zero profile
    out = np.asarray(unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user))
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="user_embeds must be"):
        unet(x, t, ehs, added_cond_kwargs=added, user_embeds=user[:, :100])


def test_ip_adapter_export_needs_t_dividing_4(base):
    _, folder = base
    unet = psa_jax.load_unet(folder, user_embed_dim=D, num_user_tokens=3)
    with pytest.raises(ValueError, match="format='psalign'"):
        export_adapter(unet.adapter, "diffusers-ip-adapter")
    assert "psa_adapter.0.to_k_user.0.weight" in export_adapter(unet.adapter, "psalign")


def test_wrapping_an_adapter_takes_its_shapes(base):
    _, folder = base
    unet = _psa_unet(folder, 4)
    wrapped = PSAUNet(unet.config, unet.params, adapter=unet.adapter, num_user_tokens=4)
    assert (wrapped.user_embed_dim, wrapped.num_user_tokens) == (D, 4)
    with pytest.raises(ValueError, match="T=4"):
        PSAUNet(unet.config, unet.params, adapter=unet.adapter)  # num_user_tokens defaults to 1


def test_standardized_projection_folds_the_population_statistics():
    rng = np.random.default_rng(0)
    d, width, n = 12, 8, 40
    common = rng.normal(size=d)
    embeds = (common + 0.01 * rng.normal(size=(n, d))).astype(np.float32)  # nearly parallel
    embeds[:, 3] = 0.5  # a feature every user shares: floored, not divided by zero
    proj = {"kernel": rng.uniform(-0.3, 0.3, (d, width)).astype(np.float32),
            "bias": rng.uniform(-0.3, 0.3, width).astype(np.float32)}  # fmt: skip
    out = standardize_projection(proj, embeds)
    mean, std = embeds.mean(0), embeds.std(0)
    std = np.maximum(std, 0.1 * np.sqrt(np.mean(std**2)))
    want = ((embeds - mean) / std) @ proj["kernel"] + proj["bias"]
    got = embeds @ np.asarray(out["kernel"]) + np.asarray(out["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # What the zero-initialised to_v_user sees at step 0: per-user differences of order 1, not
    # the ~1% of the plain init.
    plain = embeds @ proj["kernel"] + proj["bias"]
    assert got.std(0).mean() > 20 * plain.std(0).mean()
    with pytest.raises(ValueError, match="training-user embeddings"):
        standardize_projection(proj, embeds[:1])
    with pytest.raises(ValueError, match="training-user embeddings"):
        standardize_projection(proj, embeds[:, :5])
    with pytest.raises(ValueError, match="all identical"):
        standardize_projection(proj, np.ones((4, d), np.float32))
