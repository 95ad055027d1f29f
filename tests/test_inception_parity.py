"""Our FID Inception pipeline (converter + preprocess + model) equals pytorch-fid's, on seeded random weights.

tests/fixtures/inception_parity.npz holds only the outputs of pytorch-fid 0.3.0's own `InceptionV3` (FID variant,
resize_input, normalize_input, pool3), written by tests/fixtures/inception_make_parity_fixture.py with torch. That
script runs `parity_state_dict` and `parity_images` from this file, so here the same weights and images are rebuilt
with numpy alone, passed through our converter under pytorch-fid's state-dict keys, and fed to our model.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvit_jax import evaluate
from uvit_jax.convert import inception as convert
from uvit_jax.models import inception

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "inception_parity.npz"
RTOL = 1e-4  # max |ours - torch| / max |torch|, per output, float32


def parity_state_dict(shapes, seed=0):
    """{key: float32 array} for pytorch-fid's Inception keys, drawn in sorted key order from one seeded generator.

    Conv weights are He-normal and BatchNorms near identity, so activations stay O(1) through all 94 layers and
    the pool3 features are far from zero (a relative comparison is meaningful).
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith(".weight") and len(shape) > 1:  # conv (O, I, kh, kw) and fc (out, in)
            fan_in = int(np.prod(shape[1:]))
            gain = 2.0 if len(shape) == 4 else 1.0
            value = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
        elif key.endswith(("bn.weight", "running_var")):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bn.bias, running_mean, fc.bias
            value = 0.1 * rng.standard_normal(shape)
        state[key] = value.astype(np.float32)
    return state


def parity_images():
    """Batches of uint8 NHWC test images: 2 at 32x32, 1 at 64x64 (upsampled to 299), 1 at 512x512 (downsampled).

    Integer arithmetic rather than a random generator, so they are the same on every numpy version.
    """
    batches = []
    for n, size in ((2, 32), (1, 64), (1, 512)):
        b, i, j, c = np.ogrid[:n, :size, :size, :3]
        pattern = i * (3 + 2 * b) + j * (5 + c) + (i * j) % 29 * 7 + 64 * c + 96 * b + size
        batches.append((pattern % 256).astype(np.uint8))
    return batches


def weight_checksum(state):
    """A float64 digest of the weights, to tell "different weights" from "different model" when parity fails."""
    return float(sum(np.sum(state[k].astype(np.float64) * (1 + i % 7)) for i, k in enumerate(sorted(state))))


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def weights(reference):
    shapes = {key: shape for key, (_, shape) in convert.expected_keys().items()}
    state = parity_state_dict(shapes)
    # Same key set as pytorch-fid's model and the same numbers drawn, or every comparison below is moot.
    assert sorted(state) == list(reference["keys"])
    np.testing.assert_allclose(weight_checksum(state), reference["weight_checksum"], rtol=1e-12)
    return state


def _max_rel_err(ours, torch_out) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - torch_out)) / np.max(np.abs(torch_out)))


def test_preprocess_matches_pytorch_fid_downsampling(reference):
    """512 -> 299: plain bilinear with align_corners=False and no antialiasing, as pytorch-fid's F.interpolate."""
    big = parity_images()[-1]
    ours = np.asarray(inception.preprocess(jnp.asarray(big)))[0, ::13, ::13]
    np.testing.assert_allclose(ours, reference["resized_512"], rtol=0, atol=2e-6)


def test_features_match_pytorch_fid(reference, weights):
    model = convert.model_from_state_dict(weights)
    apply, state = inception.apply_fn(model)
    # Preprocess each size separately (as pytorch-fid's batches), then one model call for all images.
    x = jnp.concatenate([inception.preprocess(jnp.asarray(images)) for images in parity_images()])
    out = jax.jit(apply)(state, x)
    want = dict(reference, logits_unbiased=reference["logits"] - weights["fc.bias"])
    for name in ("pool", "logits", "logits_unbiased", "spatial"):
        assert out[name].shape == want[name].shape, name
        err = _max_rel_err(out[name], want[name])
        assert err <= RTOL, f"{name}: max relative error {err:.2e} > {RTOL}"
    assert np.std(want["pool"]) > 0.1  # the random network did not collapse (the comparison means something)
    # The feature_fn used by evaluation returns these (IS takes the logits without the fc bias).
    fn_out = evaluate.inception_feature_fn(model)(parity_images()[0])
    for name, ref_name in (("pool", "pool"), ("logits", "logits_unbiased"), ("spatial", "spatial")):
        assert _max_rel_err(fn_out[name], want[ref_name][:2]) <= RTOL, name
