"""FID InceptionV3: structure against pytorch-fid's FIDInceptionV3, the weight converter, layer semantics, and the
pytorch-fid preprocessing (no real weights here: synthetic state dicts in pytorch-fid's layout)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from uvit_jax import evaluate
from uvit_jax.convert import inception as convert
from uvit_jax.convert.pth import save_torch_file
from uvit_jax.models import inception

# pytorch-fid's fid_inception_v3() state dict: 94 BasicConv2d (conv.weight + 4 BN tensors) + fc.weight + fc.bias.
N_TENSORS = 94 * 5 + 2
# torchvision inception_v3 has 27,161,264 parameters with the aux head and 1000 classes; the aux head has
# 3,326,696 and 8 more classes add 8 * 2048 + 8.
N_PARAMS = 27_161_264 - 3_326_696 + 8 * 2049


def synthetic_state_dict(seed=0, with_counters=True):
    """Random weights in pytorch-fid's layout, scaled so activations neither vanish nor explode."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, (_, shape) in convert.expected_keys().items():
        if key.endswith(".conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("bn.weight"):
            sd[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if with_counters and key.endswith("running_var"):
            sd[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return sd


@pytest.fixture(scope="module")
def state_dict():
    return synthetic_state_dict()


@pytest.fixture(scope="module")
def model(state_dict):
    return convert.model_from_state_dict(state_dict)


def test_structure_matches_pytorch_fid():
    keys = convert.expected_keys()
    assert len(keys) == N_TENSORS == 472
    shapes = inception.state_shapes()
    assert sum(int(np.prod(s)) for p, s in shapes.items() if p[-1] not in ("mean", "var")) == N_PARAMS
    # Spot checks written from torchvision's Inception3 / pytorch-fid (O, I, kh, kw).
    assert keys["Conv2d_1a_3x3.conv.weight"][1] == (32, 3, 3, 3)
    assert keys["Mixed_5b.branch_pool.conv.weight"][1] == (32, 192, 1, 1)
    assert keys["Mixed_6b.branch7x7_2.conv.weight"][1] == (128, 128, 1, 7)
    assert keys["Mixed_6e.branch7x7dbl_2.conv.weight"][1] == (192, 192, 7, 1)
    assert keys["Mixed_7a.branch3x3_2.conv.weight"][1] == (320, 192, 3, 3)
    assert keys["Mixed_7c.branch3x3dbl_3b.conv.weight"][1] == (384, 384, 3, 1)
    assert keys["Mixed_7c.branch_pool.bn.running_var"][1] == (192,)
    assert keys["fc.weight"][1] == (1008, 2048) and keys["fc.bias"][1] == (1008,)
    assert not any("AuxLogits" in k for k in keys)


def test_converter_consumes_every_key_and_transposes(state_dict):
    tree = convert.convert_state_dict(state_dict)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert len(leaves) == N_TENSORS
    k = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # (O, I, 1, 7)
    np.testing.assert_array_equal(tree["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"], k.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(tree["fc"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(tree["Mixed_5b"]["branch1x1"]["bn"]["var"],
                                  state_dict["Mixed_5b.branch1x1.bn.running_var"])
    # The num_batches_tracked counters are optional.
    no_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) == N_TENSORS
    convert.convert_state_dict(no_counters)


def test_converter_errors_name_the_key(state_dict):
    missing = dict(state_dict)
    del missing["Mixed_6d.branch1x1.bn.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys \['Mixed_6d\.branch1x1\.bn\.running_mean'\], unexpected keys \[\]"):
        convert.convert_state_dict(missing)
    wrong = dict(state_dict)
    wrong["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"Mixed_7b\.branch3x3_2a\.conv\.weight: file has \(384, 384, 3, 1\), "
                                         r"model expects \(384, 384, 1, 3\)"):
        convert.convert_state_dict(wrong)
    extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['AuxLogits\.fc\.weight'\]"):
        convert.convert_state_dict(extra)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception state dict"):
        convert.convert_state_dict({"pos_embed": np.zeros((1, 65, 512)), "patch_embed.proj.weight": np.zeros(3)})


def test_load_inception_from_npz_and_bad_paths(tmp_path, state_dict):
    path = tmp_path / "inception.npz"
    np.savez(path, **state_dict)
    model = convert.load_inception(path)
    np.testing.assert_array_equal(np.asarray(model.Conv2d_1a_3x3.conv.kernel[...]),
                                  state_dict["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        convert.load_inception(tmp_path / "missing.pth")


def test_load_inception_from_pth(tmp_path, state_dict):
    path = tmp_path / "pt_inception.pth"
    save_torch_file(state_dict, str(path))
    model = convert.load_inception(path)
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), state_dict["fc.weight"].T)
    legacy = tmp_path / "legacy.pth"  # pre-1.6 torch.save files start with a bare pickle
    legacy.write_bytes(b"\x80\x02\x8a\x0alegacy")
    with pytest.raises(ValueError, match=r"legacy(.|\n)*np\.savez"):
        convert.load_inception(legacy)


def _torch_conv_bn_relu(x_nchw, w, gamma, beta, mean, var, padding):
    """Direct NCHW cross-correlation (PyTorch Conv2d, stride 1) -> eval BatchNorm(eps 1e-3) -> ReLU."""
    ph, pw = padding
    x = np.pad(x_nchw, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    o, _, kh, kw = w.shape
    n, _, h, wd = x.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + out.shape[2], j:j + out.shape[3]], w[:, :, i, j])
    out = (out - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3)
    return np.maximum(out * gamma[None, :, None, None] + beta[None, :, None, None], 0)


def test_converted_conv_matches_torch_semantics(model, state_dict):
    """An asymmetric (1, 7) conv layer after conversion computes what the PyTorch layer computes."""
    name = "Mixed_6b.branch7x7_2"
    x = np.random.default_rng(1).standard_normal((2, 128, 5, 9)).astype(np.float32)
    want = _torch_conv_bn_relu(x, *(state_dict[f"{name}.{s}"].astype(np.float64) for s in
                                    ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")),
                               padding=(0, 3))
    got = model.Mixed_6b.branch7x7_2(jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def test_pooling_semantics():
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 2)).astype(np.float32)
    avg = np.asarray(inception.avg_pool_exclude_pad(jnp.asarray(x)))
    mx = np.asarray(inception.max_pool(jnp.asarray(x), stride=1, padding=1))
    for i in range(4):
        for j in range(5):
            win = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]  # only real pixels: count_include_pad=False
            np.testing.assert_allclose(avg[0, i, j], win.mean((0, 1)), rtol=1e-6)
            np.testing.assert_array_equal(mx[0, i, j], win.max((0, 1)))
    assert inception.max_pool(jnp.asarray(x), stride=2).shape == (1, 1, 2, 2)  # 3x3/2 VALID


def _torch_bilinear(x, out_size):
    """PyTorch F.interpolate(mode='bilinear', align_corners=False, antialias=False), NHWC, written directly."""
    def axis(n_in):
        src = np.maximum((np.arange(out_size) + 0.5) * n_in / out_size - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, ry = axis(x.shape[1])
    c0, c1, cx = axis(x.shape[2])
    rows = x[:, r0] * (1 - ry)[None, :, None, None] + x[:, r1] * ry[None, :, None, None]
    return rows[:, :, c0] * (1 - cx)[None, None, :, None] + rows[:, :, c1] * cx[None, None, :, None]


@pytest.mark.parametrize("size_in,size_out", [(32, 299), (50, 29)])
def test_preprocess_matches_pytorch_fid_resize(size_in, size_out):
    images = np.random.default_rng(3).integers(0, 256, (2, size_in, size_in, 3), dtype=np.uint8)
    got = np.asarray(inception.preprocess(jnp.asarray(images), size=size_out))
    want = 2.0 * _torch_bilinear(images.astype(np.float64) / 255.0, size_out) - 1.0
    np.testing.assert_allclose(got, want, atol=1e-5)  # float32 rounding; a wrong sampling grid errs by ~1e-2
    assert got.min() >= -1.0 and got.max() <= 1.0


def test_outputs_and_sfid_layer_small_input(model):
    """At 75x75 (the smallest valid input) check what each output is: spatial = Mixed_6d 1x1 branch [..., :7]."""
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32))

    @jax.jit
    def run(x):
        h = model.Conv2d_2b_3x3(model.Conv2d_2a_3x3(model.Conv2d_1a_3x3(x)))
        h = inception.max_pool(model.Conv2d_4a_3x3(model.Conv2d_3b_1x1(inception.max_pool(h, 2))), 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            h = getattr(model, name)(h)
        return model(x), model.Mixed_6d.branch1x1(h)[..., :7]

    out, spatial = run(x)
    np.testing.assert_allclose(out["spatial"], spatial.reshape(2, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"], out["logits_unbiased"] + np.asarray(model.fc.bias[...]), rtol=1e-6)
    np.testing.assert_allclose(out["logits_unbiased"], np.asarray(out["pool"]) @ np.asarray(model.fc.kernel[...]),
                               rtol=1e-4, atol=1e-4)


def test_feature_fn_is_pytorch_fid_preprocessing_then_the_network_on_every_device(model):
    """feature_fn(uint8 images of any size) is the network on pytorch-fid's 299x299 input: pool3 features, the
    1008-way logits without the fc bias (for IS) and the sFID features; its batch is split over the 8 test devices
    (3 images padded to 8) and gives what one device gives (before: one device per host)."""
    fn = evaluate.inception_feature_fn(model)
    images = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    out = fn(images)
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008) and out["spatial"].shape == (3, 2023)
    assert len(out["pool"].sharding.device_set) == 8
    ref = jax.jit(lambda x: model(inception.preprocess(x)))(jnp.asarray(images))
    assert float(jnp.std(ref["pool"])) > 0.01  # the random network did not collapse: the comparison means something
    for key, ref_key in (("pool", "pool"), ("logits", "logits_unbiased"), ("spatial", "spatial")):
        np.testing.assert_allclose(out[key], ref[ref_key], rtol=1e-4, atol=1e-4, err_msg=key)  # two jits: fp32 sums
    single = evaluate.inception_feature_fn(model, devices=jax.devices()[:1])(images)
    for k in out:  # float32 through 94 convolutions on other per-device batch sizes: rounding only
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(single[k]), rtol=1e-4, atol=1e-4)
