"""The text conditions of text-to-image sampling: contexts of a split's captions, as the official
`eval_t2i_discrete.py` draws them (a shuffled pass over the validation images, one random caption each)."""
from __future__ import annotations

import numpy as np

from uvit_jax import rng
from uvit_jax.data.pipeline import EpochShuffle, open_source
from uvit_jax.data.preprocess import caption_index, example_bits


class TextConditions:
    """Batch i holds images order(i*n .. i*n+n-1) of a permutation seeded from (config.seed, rng.LABELS), each with
    the caption `caption_index` picks from the same seed: a pure function of (seed, i, n), so resumed runs draw
    the same."""

    def __init__(self, config, split: str = "val"):
        self.source = open_source(config.dataset, split=split)
        self.split = split
        self.seed = int(example_bits(config.seed, rng.LABELS, np.zeros(1, np.int64))[0])
        self.order = EpochShuffle(self.source.num_examples, self.seed)

    def batch(self, index: int, n: int) -> dict[str, np.ndarray]:
        """{"context" (n, 77, D) float32, "caption_index" (n, 2) int64 = (image, caption k), and "captions" (n,)
        str when the folder keeps the texts (ours does; the official feature folders do not)}."""
        positions = np.int64(index) * n + np.arange(n, dtype=np.int64)
        images, bits = self.order(positions), example_bits(self.seed, 0, positions)
        context = self.source.read(images, bits, False)["context"]
        ks = caption_index(bits, self.source.n_captions[images])  # the choice `read` made
        out = {"context": context.astype(np.float32), "caption_index": np.stack([images, ks], axis=1)}
        if hasattr(self.source, "captions"):
            out["captions"] = np.array([caps[k] for caps, k in zip(self.source.captions(images), ks)])
        return out
