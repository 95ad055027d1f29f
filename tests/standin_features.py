"""A TEST STAND-IN for the Inception feature network: a fixed random network with the feature_fn contract.

Its numbers are NOT FID. main.py reaches it through `--config.eval.feature_fn=standin_features:make` (tests put
this directory on PYTHONPATH), so every eval path runs end to end without the 90 MB Inception weights.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.models import inception


def make():
    """The stand-in with its default sizes (what `eval.feature_fn` calls)."""
    return make_standin_feature_fn(0)


def make_standin_feature_fn(seed: int = 0, *, pool_dim: int = 128, spatial_grid: int = 4):
    """TEST / SMOKE STAND-IN ONLY: a fixed random network with the feature_fn contract; its numbers are NOT FID.

    pool = relu(random projection of the 16x16 downsampled image) (B, pool_dim), logits = pool @ random (B, 1008),
    spatial = random 1x1 projection of the image resized to spatial_grid^2 to 7 channels (B, 7 * spatial_grid^2).
    The feature sizes are smaller than Inception's (2048 / 2023; pass pool_dim=2048, spatial_grid=17 for those)
    because the float64 eigendecompositions of 2048-d covariances cost tens of seconds on a 2-core CPU.
    Deterministic in `seed`, cheap, and sensitive to the image distribution, so metrics move the right way.
    """
    k_pool, k_logits, k_spatial = jax.random.split(jax.random.key(seed), 3)
    weights = {
        "pool": jax.random.normal(k_pool, (16 * 16 * 3, pool_dim)) / np.sqrt(16 * 16 * 3),
        "logits": jax.random.normal(k_logits, (pool_dim, inception.NUM_CLASSES)) * (4.0 / np.sqrt(pool_dim)),
        "spatial": jax.random.normal(k_spatial, (3, inception.SPATIAL_CHANNELS)),
    }

    @jax.jit
    def features(w, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        b = x.shape[0]
        small = jax.image.resize(x, (b, 16, 16, 3), "bilinear")
        pool = jax.nn.relu(small.reshape(b, -1) @ w["pool"])
        grid = jax.image.resize(x, (b, spatial_grid, spatial_grid, 3), "bilinear")
        return {"pool": pool, "logits": pool @ w["logits"], "spatial": (grid @ w["spatial"]).reshape(b, -1)}

    return functools.partial(features, weights)
