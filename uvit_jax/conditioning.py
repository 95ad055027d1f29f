"""What a network is conditioned on (docs/official_behaviour.md §1 item 3, §3.3, §8 item 7).

Training, sampling, generation and the benchmark ask `Conditioning.from_config(config)` instead of working it out
(config.validate checks, before anything runs, that nnet.num_classes fits the dataset and dataset.p_uncond):
  kind          "none" (unconditional), "class" (label token) or "text" (77 CLIP context tokens)
  real_classes  labels to draw for sampling and grids (class models), e.g. 1000 for ImageNet
  null_label    the CFG "unconditional" label: the last embedding, index = real_classes (class models trained
                with condition drop only; ImageNet-64 has none: its 1000 embeddings are all real classes)
  cfg_trained   whether training drops the condition (dataset.p_uncond > 0)
  batch_key     the batch entry holding the condition ("label", "context" or None)
Text models have no learned null token: their null condition is the CLIP encoding of "" (empty_context.npy),
which the caller loads and passes to `null_condition`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

KINDS = ("none", "class", "text")


@dataclasses.dataclass(frozen=True)
class Conditioning:
    kind: str
    real_classes: int = 0
    cfg_trained: bool = False
    context_shape: tuple[int, int] | None = None  # text models: (tokens, clip_dim)

    @classmethod
    def from_nnet(cls, nnet: Any, *, cfg_trained: bool) -> Conditioning:
        """From the network description alone: a class table of K embeddings holds K-1 real classes plus the null
        label when the model is trained with condition drop, K real classes otherwise."""
        nnet = dict(nnet)
        if nnet.get("name") == "uvit_t2i":
            return cls("text", cfg_trained=cfg_trained,
                       context_shape=(int(nnet["num_clip_token"]), int(nnet["clip_dim"])))
        k = int(nnet.get("num_classes", -1))
        if k <= 0:
            return cls("none")
        return cls("class", real_classes=k - 1 if cfg_trained else k, cfg_trained=cfg_trained)

    @classmethod
    def from_config(cls, config) -> Conditioning:
        return cls.from_nnet(config.nnet, cfg_trained=float(config.dataset.p_uncond) > 0)

    @property
    def batch_key(self) -> str | None:
        return {"none": None, "class": "label", "text": "context"}[self.kind]

    @property
    def null_label(self) -> int | None:
        """The CFG null class index (= the number of real classes), or None where the model has none."""
        return self.real_classes if self.kind == "class" and self.cfg_trained else None

    def null_condition(self, null_context: np.ndarray | None = None):
        """The "unconditional" input of classifier-free guidance (a label, or the empty-text context)."""
        if self.kind == "text":
            if null_context is None:
                raise ValueError("a text-conditional model needs the empty-string context (empty_context.npy) "
                                 "as its null condition")
            return jnp.asarray(null_context, jnp.float32)
        if self.null_label is None:
            raise ValueError("this network has no null label: classifier-free guidance needs a class model trained "
                             "with dataset.p_uncond > 0 (num_classes = real classes + 1)")
        return self.null_label

    def grid_labels(self, n: int) -> np.ndarray:
        """Labels for a grid of n images: column j shows class j (mod the number of real classes)."""
        return (np.arange(n) % max(self.real_classes, 1)).astype(np.int32)

    def grid_columns(self, n: int) -> int:
        """Columns of a sample grid: one per class when there are few classes, else a square."""
        return self.real_classes if 0 < self.real_classes <= 16 else int(np.ceil(np.sqrt(n)))

    def synthetic(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """A random condition batch of n rows (benchmarks, compile checks)."""
        if self.kind == "class":
            return rng.integers(0, self.real_classes, (n,)).astype(np.int32)
        if self.kind == "text":
            return rng.standard_normal((n, *self.context_shape), np.float32)
        return None
