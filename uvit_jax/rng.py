"""Named random streams: every use of randomness derives its key from (seed, stream, index), never stores one.

Each stream folds its own constant into the seed first, then the step or batch index, so no two streams ever
draw the same key (before this, the sampling key of batch i equalled the training key of some step), and a
resumed run draws exactly what an uninterrupted one draws.
"""
from __future__ import annotations

import jax

INIT = 1  # parameter initialisation
TRAIN = 2  # per-step noise, timesteps, condition drop, latent posterior draws (index: step)
GRID = 3  # training-time sample grids (fixed across steps, so grids are comparable)
FID = 4  # FID during training (index: step, then batch)
SAMPLE = 5  # sample mode: noise of batch i
LABELS = 6  # sample mode / FID: class labels of batch i


def stream_key(seed: int, stream: int, *indices) -> jax.Array:
    """key(seed) -> fold_in(stream) -> fold_in(index) for each index: the key of one named draw."""
    key = jax.random.fold_in(jax.random.key(seed), stream)
    for i in indices:
        key = jax.random.fold_in(key, i)
    return key
