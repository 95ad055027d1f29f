"""KL-f8 autoencoder: equivalence with the official outputs, parameter count, strict CompVis / diffusers conversion."""
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
import safetensors.numpy
from flax import nnx

from uvit_jax.convert import autoencoder_from_official, autoencoder_to_official, save_torch_file
from uvit_jax.convert.pth import load_state_dict
from uvit_jax.models.autoencoder import KL_F8_DDCONFIG, KL_F8_EMBED_DIM, FrozenAutoencoderKL, posterior_sample

FIX = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIX / "autoencoder_manifest.json").read_text())
CASE = MANIFEST["ae_small_a"]
KWARGS = CASE["ctor_kwargs"]  # ddconfig (ch 32, ch_mult (1, 2), 1 res block), embed_dim 4, scale_factor 0.18215
PARAMS = FIX / "autoencoder_ae_small_a.params.npz"
IO = np.load(FIX / "autoencoder_ae_small_a.io.npz")


def nhwc(a):
    return a.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def official_sd():
    return load_state_dict(PARAMS)


def assert_same_state_dict(a, b):
    assert list(a) == list(b)  # same keys, in the official order
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def official_outputs(suffix, dtype):
    """Our encode_moments / decode / decode at scale 1 on the reference inputs (and the references), jitted.

    Under "highest" matmul precision, as every parity path must be (on CPU it changes nothing; on GPU/TPU the
    float32 default would use TF32/bf16 passes)."""
    kw = dict(KWARGS, dtype=dtype, param_dtype=dtype)
    ae = autoencoder_from_official(PARAMS, **kw)
    ae_noscale = autoencoder_from_official(PARAMS, **dict(kw, scale_factor=1.0))
    with jax.default_matmul_precision("highest"):
        ours = {"moments": jax.jit(lambda m, x: m.encode_moments(x))(ae, nhwc(IO[f"x_{suffix}"])),
                "decode": jax.jit(lambda m, z: m.decode(z))(ae, nhwc(IO[f"z_{suffix}"])),
                "dec_noscale": jax.jit(lambda m, z: m.decode(z))(ae_noscale, nhwc(IO[f"z_{suffix}"]))}
    return {k: (np.asarray(v), nhwc(IO[f"{k}_{suffix}"])) for k, v in ours.items()}


def test_matches_official_outputs_float32():
    for name, (ours, ref) in official_outputs("f32", jnp.float32).items():
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        err = rel_err(ours, ref)
        print(f"float32 {name} max rel err {err:.3e}")
        assert err <= 1e-5, name


def test_matches_official_outputs_float64(x64):
    for name, (ours, ref) in official_outputs("f64", jnp.float64).items():
        assert ours.dtype == np.float64, name
        err = rel_err(ours, ref)
        print(f"float64 {name} max rel err {err:.3e}")
        assert err <= 1e-12, name  # float64 rounding only (the brief asks 1e-6; we see ~3e-15)
    # The posterior draw, given the official noise.
    moments, eps = nhwc(IO["sample_moments_f64"]), nhwc(IO["sample_eps_f64"])
    out = posterior_sample(jnp.asarray(moments), jnp.asarray(eps), KWARGS["scale_factor"])
    assert rel_err(out, nhwc(IO["sample_out_f64"])) <= 1e-12
    # sample(moments, key) is that formula with n ~ N(0, I) drawn from the key.
    ae = autoencoder_from_official(PARAMS, **KWARGS)
    key = jax.random.key(3)
    m32 = jnp.asarray(moments, jnp.float32)
    z = ae.sample(m32, key)
    expected = posterior_sample(m32, jax.random.normal(key, z.shape, jnp.float32), KWARGS["scale_factor"])
    assert z.shape == eps.shape and z.dtype == jnp.float32
    np.testing.assert_array_equal(z, expected)


def test_full_size_param_count_and_shapes():
    full = MANIFEST["_full_size_kl_f8"]
    assert KL_F8_DDCONFIG == dict(full["ddconfig"], ch_mult=(1, 2, 4, 4), attn_resolutions=())
    model = nnx.eval_shape(lambda: FrozenAutoencoderKL(KL_F8_DDCONFIG, KL_F8_EMBED_DIM, rngs=nnx.Rngs(0)))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(model) == full["n_params_total"] == 83_653_863
    for part, n in full["n_params"].items():
        assert count(getattr(model, part)) == n, part
    moments = jax.eval_shape(lambda m, x: m.encode_moments(x), model, jax.ShapeDtypeStruct((2, 256, 256, 3),
                                                                                            jnp.float32))
    assert moments.shape == (2, 32, 32, 8)
    images = jax.eval_shape(lambda m, z: m.decode(z), model, jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32))
    assert images.shape == (2, 512, 512, 3)


def test_strict_conversion_errors(official_sd):
    sd = official_sd
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.upsample.conv.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['decoder.up.1.upsample.conv.bias'\], unexpected keys \[\]"):
        autoencoder_from_official(missing, **KWARGS)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['encoder.extra.weight'\]"):
        autoencoder_from_official(dict(sd, **{"encoder.extra.weight": np.zeros(3, np.float32)}), **KWARGS)
    bad = dict(sd, **{"encoder.mid.attn_1.q.weight": np.zeros((64, 32, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch for 'encoder.mid.attn_1.q.weight': checkpoint has "
                                         r"\(64, 32, 1, 1\), the autoencoder expects \(64, 64, 1, 1\)"):
        autoencoder_from_official(bad, **KWARGS)
    with pytest.raises(ValueError, match=r"shape mismatch for 'quant_conv.weight'"):  # embed_dim 3: 8 -> 6 channels
        autoencoder_from_official(sd, **dict(KWARGS, embed_dim=3))
    # The LPIPS / discriminator keys of CompVis training checkpoints are dropped, and only those.
    with_loss = dict(sd, **{"loss.logvar": np.zeros((), np.float32),
                            "loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4), np.float32)})
    assert_same_state_dict(autoencoder_to_official(autoencoder_from_official(with_loss, **KWARGS)), sd)
    with pytest.raises(ValueError, match=r"unknown keys \['dropuot'\]"):
        FrozenAutoencoderKL(dict(KWARGS["ddconfig"], dropuot=0.0), 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="double_z must be True"):
        FrozenAutoencoderKL(dict(KWARGS["ddconfig"], double_z=False), 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, H, W, 3\) \(NHWC\)"):
        nnx.eval_shape(lambda: FrozenAutoencoderKL(**KWARGS, rngs=nnx.Rngs(0))).encode_moments(jnp.ones((1, 3, 8, 8)))


def test_pth_roundtrip(official_sd, tmp_path):
    path = tmp_path / "autoencoder_kl.pth"
    save_torch_file(official_sd, path)
    model = autoencoder_from_official(path, **KWARGS)
    assert model.scale_factor == KWARGS["scale_factor"]
    assert_same_state_dict(autoencoder_to_official(model), official_sd)


# --- diffusers layout, written here independently of the converter's renaming -----------------------------------

_ATTN_NAMES = {"new": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
               "old": {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}}


def to_diffusers(sd, num_levels, attention):
    """CompVis state dict -> diffusers AutoencoderKL names; attention 1×1-conv weights -> Linear (O, I)."""
    out = {}
    for key, value in sd.items():
        new = re.sub(r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets.", key)
        new = re.sub(r"\.down\.(\d+)\.attn\.", r".down_blocks.\1.attentions.", new)
        new = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", new)
        up = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}
        new = re.sub(r"\.up\.(\d+)\.(block|attn|upsample)\.",
                     lambda m: f".up_blocks.{num_levels - 1 - int(m[1])}.{up[m[2]]}.", new)
        new = new.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
        new = new.replace(".mid.attn_1.", ".mid_block.attentions.0.").replace(".norm_out.", ".conv_norm_out.")
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        m = re.fullmatch(r"(.*attentions\.\d+\.)(norm|q|k|v|proj_out)\.(weight|bias)", new)
        if m:
            new = f"{m[1]}{_ATTN_NAMES[attention][m[2]]}.{m[3]}"
            if value.ndim == 4:
                value = value[:, :, 0, 0]
        out[new] = value
    return out


@pytest.mark.parametrize("attention", ["new", "old"])
def test_diffusers_layout_converts_identically(official_sd, tmp_path, attention):
    num_levels = len(KWARGS["ddconfig"]["ch_mult"])
    diffusers_sd = to_diffusers(official_sd, num_levels, attention)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in diffusers_sd  # CompVis up.1 = diffusers up_blocks.0
    assert diffusers_sd["encoder.mid_block.attentions.0." + _ATTN_NAMES[attention]["q"] + ".weight"].shape == (64, 64)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.numpy.save_file(diffusers_sd, str(path))
    assert_same_state_dict(autoencoder_to_official(autoencoder_from_official(path, **KWARGS)), official_sd)
    # Errors name the key as the file spells it.
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    bad = dict(diffusers_sd, **{key: np.zeros((32, 32, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=rf"'decoder.up.0.block.0.nin_shortcut.weight' \(diffusers '{key}'\): "
                                         r"checkpoint has \(32, 32, 1, 1\), the autoencoder expects \(32, 64, 1, 1\)"):
        autoencoder_from_official(bad, **KWARGS)
    other = _ATTN_NAMES["old" if attention == "new" else "new"]["q"]
    dup = dict(diffusers_sd, **{f"encoder.mid_block.attentions.0.{other}.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match="holds both .*the two diffusers attention namings"):
        autoencoder_from_official(dup, **KWARGS)
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.mid_block.resnets.2.conv1.weight'\]"):
        autoencoder_from_official(dict(diffusers_sd, **{"decoder.mid_block.resnets.2.conv1.weight": np.zeros(1)}),
                                  **KWARGS)


def test_attention_levels_convert_both_layouts():
    """attn_resolutions (unused by KL-f8, but an official option): attention after every res block of those levels,
    named down.{i}.attn.{j} / up.{i}.attn.{j} (diffusers attentions.{j})."""
    ddconfig = dict(KWARGS["ddconfig"], resolution=8, attn_resolutions=[8, 4])
    abstract = nnx.eval_shape(lambda: FrozenAutoencoderKL(ddconfig, 4, rngs=nnx.Rngs(0)))
    # Random values straight from numpy: eager construction would dispatch ~400 small init ops (seconds).
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                                                 nnx.to_pure_dict(state)))
    sd = autoencoder_to_official(nnx.merge(graphdef, state))
    assert {"encoder.down.0.attn.0.q.weight", "encoder.down.1.attn.0.proj_out.bias", "decoder.up.0.attn.1.k.bias",
            "decoder.up.1.attn.1.norm.weight"} <= set(sd)
    assert len(sd) == CASE["n_state_dict_tensors"] + 10 * (2 + 4)  # 2 encoder + 4 decoder blocks of 10 tensors
    assert_same_state_dict(autoencoder_to_official(autoencoder_from_official(sd, ddconfig=ddconfig, embed_dim=4,
                                                                             scale_factor=1.0)), sd)
    diffusers_sd = to_diffusers(sd, 2, "new")
    assert "decoder.up_blocks.0.attentions.1.to_out.0.weight" in diffusers_sd  # CompVis up.1.attn.1
    assert_same_state_dict(autoencoder_to_official(autoencoder_from_official(diffusers_sd, ddconfig=ddconfig,
                                                                             embed_dim=4, scale_factor=1.0)), sd)
    out = jax.eval_shape(lambda m, x: m.decode(m.encode(x, jax.random.key(0))), abstract,
                         jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    assert out.shape == (1, 8, 8, 3)
