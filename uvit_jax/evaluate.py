"""Sample-quality metrics: FID, sFID, Inception Score, precision/recall, streamed over batches of images.

Pipeline (U-ViT's `tools/fid_score.py` = pytorch-fid, plus ADM's evaluator for sFID / IS / P&R):
  images -> uint8 (the PNG round trip of the official code: floor(255 * (x + 1) / 2 + 0.5)) -> `feature_fn`
  (jitted, on the accelerator: Inception pool3 (2048), IS logits (1008), sFID spatial features (2023))
  -> float64 running sums on the host -> mean / covariance (np.cov, ddof=1) -> Frechet distance in float64.

A `feature_fn` maps uint8 images (B, H, W, 3) to {"pool": (B, 2048), "logits": (B, 1008), "spatial": (B, 2023)}.
`make_inception_feature_fn(path)` builds the real one from pytorch-fid's weights (tests use a cheap random stand-in
with the same contract, tests/standin_features.py).

Statistics dicts (from `compute_feature_stats`, `load_reference_stats`) share keys: "mu", "sigma" (pool3),
optionally "mu_s", "sigma_s" (spatial, for sFID), "pool_features" (float32 rows kept for precision/recall),
"logits" (float32, for IS; samples only) and "n".

Known gap to ADM's numbers: ADM's TF graph resizes with TF1's legacy bilinear (no half-pixel centres) and scales
by (x - 128) / 128, while this pipeline follows pytorch-fid (half-pixel bilinear, x / 127.5 - 1), which is what
U-ViT's FIDs use; against ADM's stored `mu`/`sigma` expect differences of the order of 0.1 FID.
"""
from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy import special

from uvit_jax import console, files
from uvit_jax.images import to_uint8
from uvit_jax.models import inception

FeatureFn = Callable[[Any], Mapping[str, Any]]
FEATURE_KEYS = ("pool", "logits", "spatial")


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------
def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 @ sigma2) for symmetric PSD matrices, via symmetric eigendecompositions.

    With A = sigma1^(1/2) (symmetric), sigma1 sigma2 = A (A sigma2) and (A sigma2) A = A sigma2 A share their
    eigenvalues, and A sigma2 A is symmetric PSD; so the trace is sum(sqrt(eigvalsh(A sigma2 A))). Unlike a general
    `sqrtm` of the non-symmetric product this stays real and well defined for singular (rank-deficient)
    covariances, so no eps offset is needed; tiny negative eigenvalues from rounding are clipped to 0.
    """
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2).

    Equals pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`) wherever that one is well behaved (tested),
    and is exact for singular covariances where `sqrtm` needs its 1e-6 offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: inconsistent shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"frechet_distance: {name} has non-finite entries")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2))


def sfid(mu_s1, sigma_s1, mu_s2, sigma_s2) -> float:
    """sFID (Nash et al. 2021, as in ADM's evaluator): the Frechet distance of the 2023-d spatial features."""
    return frechet_distance(mu_s1, sigma_s1, mu_s2, sigma_s2)


# ----------------------------------------------------------------------------------------------------------------
# Streaming mean / covariance
# ----------------------------------------------------------------------------------------------------------------
class RunningStats:
    """Mean and covariance (np.cov normalisation, ddof=1) of rows seen batch by batch, in float64.

    Keeps n, sum(x - c) and sum((x - c)(x - c)^T) around a shift c (the first batch's mean) so that the final
    subtraction does not cancel catastrophically when the mean is large compared with the spread.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, x, mask=None) -> None:
        """Add the rows of x (B, dim); with `mask` (B,) bool, only the rows where it is True."""
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"RunningStats: expected rows of dim {self.dim}, got {x.shape}")
        if mask is not None:
            x = x[np.asarray(mask, bool)]
        if not len(x):
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        xc = x - self.shift
        self.n += len(x)
        self.sum += xc.sum(axis=0)
        self.outer += xc.T @ xc

    def merge(self, other: RunningStats) -> None:
        """Fold in another accumulator (e.g. another process's), re-centring its sums on this shift."""
        if other.n == 0:
            return
        if self.shift is None:
            self.shift = other.shift.copy()
        d = other.shift - self.shift
        self.outer += other.outer + np.outer(other.sum, d) + np.outer(d, other.sum) + other.n * np.outer(d, d)
        self.sum += other.sum + other.n * d
        self.n += other.n

    @property
    def mean(self) -> np.ndarray:
        return self.shift + self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        m = self.sum / self.n
        return (self.outer - self.n * np.outer(m, m)) / (self.n - 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) in float64."""
        return self.mean, self.cov


# ----------------------------------------------------------------------------------------------------------------
# Inception Score, precision / recall
# ----------------------------------------------------------------------------------------------------------------
def inception_score(preds, splits: int = 10, *, from_logits: bool = True) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` contiguous splits): exp(E_x KL(p(y|x) || p(y))).

    `preds` are the 1008-way IS logits of the feature_fn (softmax over all 1008, no fc bias: ADM / torch-fidelity
    convention) or, with from_logits=False, probabilities. Contiguous equal splits as ADM (50k samples: 10 splits
    of 5000); torch-fidelity shuffles first, which changes only the std noticeably.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or len(preds) < splits:
        raise ValueError(f"inception_score: need (N, classes) with N >= splits={splits}, got {preds.shape}")
    scores = []
    for part in np.array_split(np.arange(len(preds)), splits):
        x = preds[part].astype(np.float64)
        if from_logits:
            logp = x - special.logsumexp(x, axis=1, keepdims=True)
            p = np.exp(logp)
        else:
            p = x
        p_y = p.mean(axis=0, keepdims=True)
        kl = (special.xlogy(p, p) - special.xlogy(p, p_y)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2.0 * ab + jnp.sum(b * b, 1)[None, :], 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _knn_update(best: jax.Array, rows: jax.Array, cols: jax.Array, col_valid: jax.Array, k: int) -> jax.Array:
    """Merge one column block into the running k+1 smallest squared distances of each row (self included)."""
    d = jnp.where(col_valid[None, :], _sq_dists(rows, cols), jnp.inf)
    return -jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)[0]


@jax.jit
def _ball_membership(a, a_radii, b, b_radii):
    """(a-rows inside some b-ball, b-rows inside some a-ball) for one block pair; radii are squared."""
    d = _sq_dists(a, b)
    return jnp.any(d <= b_radii[None, :], axis=1), jnp.any(d <= a_radii[:, None], axis=0)


def _blocks(x: np.ndarray, block: int) -> tuple[list[jax.Array], list[jax.Array]]:
    """Zero-pad rows to a multiple of `block` and cut into equal blocks (one compile), with validity masks."""
    n = len(x)
    padded = np.zeros((-(-n // block) * block, x.shape[1]), np.float32)
    padded[:n] = x
    valid = np.arange(len(padded)) < n
    return ([jnp.asarray(padded[i:i + block]) for i in range(0, len(padded), block)],
            [jnp.asarray(valid[i:i + block]) for i in range(0, len(padded), block)])


def _manifold_radii(blocks, valids, k: int) -> list[jax.Array]:
    """Squared distance of every row to its k-th nearest neighbour in the same set (-inf on padding rows)."""
    radii = []
    for rows, row_valid in zip(blocks, valids):
        best = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)
        for cols, col_valid in zip(blocks, valids):
            best = _knn_update(best, rows, cols, col_valid, k)
        radii.append(jnp.where(row_valid, best[:, k], -jnp.inf))
    return radii


def precision_recall(real_features, fake_features, k: int = 3, block_size: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as in ADM's evaluator.

    Each point gets a ball reaching its k-th nearest neighbour within its own set (the point itself excluded).
    precision = fraction of fake points inside at least one real ball; recall = fraction of real points inside at
    least one fake ball. Distances are computed on the default device in float32 blocks of `block_size` rows.
    """
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: need (N, D) feature sets of equal D, got {real.shape}, {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: each set needs more than k={k} points, got {len(real)}, {len(fake)}")
    r_blocks, r_valid = _blocks(real, min(block_size, len(real)))
    f_blocks, f_valid = _blocks(fake, min(block_size, len(fake)))
    r_radii, f_radii = _manifold_radii(r_blocks, r_valid, k), _manifold_radii(f_blocks, f_valid, k)
    real_in = [jnp.zeros(b.shape[0], bool) for b in r_blocks]
    fake_in = [jnp.zeros(b.shape[0], bool) for b in f_blocks]
    for i, (rb, rr) in enumerate(zip(r_blocks, r_radii)):
        for j, (fb, fr) in enumerate(zip(f_blocks, f_radii)):
            r_in_f, f_in_r = _ball_membership(rb, rr, fb, fr)
            real_in[i] = real_in[i] | r_in_f
            fake_in[j] = fake_in[j] | f_in_r
    precision = np.concatenate([np.asarray(x) for x in fake_in])[:len(fake)].mean()
    recall = np.concatenate([np.asarray(x) for x in real_in])[:len(real)].mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------------------------
# Streaming feature statistics
# ----------------------------------------------------------------------------------------------------------------
def to_uint8_rgb(images) -> np.ndarray:
    """Images (B, H, W, C), C in {1, 3} -> uint8 (B, H, W, 3).

    uint8 passes through; floats are taken to be in [-1, 1] (the project's convention) and quantised like the
    official PNG round trip (torchvision save_image of (x + 1) / 2: floor(255 v + 0.5), clamped). Grey images are
    repeated to RGB, as PIL's convert('RGB') does in pytorch-fid's loader.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (B, H, W, C) with C in (1, 3), got shape {images.shape}")
    images = to_uint8(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _unpack(item) -> tuple[Any, np.ndarray | None]:
    """A batch item: an image array, an (images, mask) pair, or a dict with "images"/"image" and maybe "mask"."""
    if isinstance(item, Mapping):
        key = "images" if "images" in item else "image"
        if key not in item:
            raise ValueError(f"batch dict needs an 'images' or 'image' entry, got keys {sorted(item)}")
        return item[key], item.get("mask")
    if isinstance(item, tuple):
        images, mask = item
        return images, mask
    return item, None


def compute_feature_stats(batches: Iterable, feature_fn: FeatureFn, *,
                          max_pool_features: int | None = 50_000, gather_processes: bool = False,
                          progress: console.Progress | None = None) -> dict:
    """Stream image batches through `feature_fn` into statistics.

    `batches` yields image arrays (see `to_uint8_rgb`), (images, mask) pairs or dicts {"image(s)", "mask"}; rows
    where mask is False (padding) are dropped. A batch smaller than the first one is zero-padded to its size so
    the jitted feature_fn compiles once. The next batch is dispatched before the previous one's host-side float64
    accumulation, overlapping the two.

    Returns {"n", "mu", "sigma", "mu_s", "sigma_s" (float64), "logits" (n, 1008) float32 for IS,
    "pool_features" (min(n, max_pool_features), 2048) float32: the first rows, for precision/recall,
    "image_size" (H, W) of the images}.
    With gather_processes=True the sums of all JAX processes are combined (each process streams its own rows).
    `progress` is told the number of images consumed after each batch.
    """
    pool = spatial = image_size = None
    logits, kept = [], []
    n_kept = 0
    cap = np.inf if max_pool_features is None else max_pool_features
    first_size = None

    def consume(out, mask):
        nonlocal pool, spatial, n_kept
        feats = {k: np.asarray(out[k]) for k in FEATURE_KEYS}
        feats = {k: v[: len(mask)][mask] for k, v in feats.items()}
        if pool is None:
            pool, spatial = RunningStats(feats["pool"].shape[1]), RunningStats(feats["spatial"].shape[1])
        pool.update(feats["pool"])
        spatial.update(feats["spatial"])
        logits.append(feats["logits"].astype(np.float32))
        if n_kept < cap:
            take = feats["pool"][: int(min(cap - n_kept, len(feats["pool"])))]
            kept.append(take.astype(np.float32))
            n_kept += len(take)
        if progress is not None:
            progress.update(pool.n)

    pending = None
    for item in batches:
        images, mask = _unpack(item)
        images = to_uint8_rgb(images)
        image_size = images.shape[1:3]
        b = len(images)
        mask = np.ones(b, bool) if mask is None else np.asarray(mask, bool).reshape(b)
        first_size = first_size or b
        if b < first_size:
            images = np.concatenate([images, np.zeros((first_size - b,) + images.shape[1:], np.uint8)])
        out = feature_fn(images)  # dispatched asynchronously
        if pending is not None:
            consume(*pending)
        pending = (out, mask)
    if pending is not None:
        consume(*pending)
    if pool is None:
        raise ValueError("compute_feature_stats: no images (empty iterator or all rows masked)")
    if gather_processes and jax.process_count() > 1:
        pool, spatial, logits, kept = _gather_over_processes(pool, spatial, logits, kept, cap)
    mu, sigma = pool.result()
    mu_s, sigma_s = spatial.result()
    return {"n": pool.n, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
            "logits": np.concatenate(logits), "pool_features": np.concatenate(kept),
            "image_size": np.asarray(image_size, np.int64)}


def _gather_over_processes(pool, spatial, logits, kept, cap):
    """Combine every process's accumulators (identical result on all processes)."""
    from jax.experimental import multihost_utils

    def gather_stats(rs: RunningStats) -> RunningStats:
        parts = multihost_utils.process_allgather(
            {"n": np.int64(rs.n), "shift": rs.shift, "sum": rs.sum, "outer": rs.outer})
        total = RunningStats(rs.dim)
        for i in range(len(parts["n"])):
            one = RunningStats(rs.dim)
            one.n, one.shift, one.sum, one.outer = (int(parts["n"][i]), parts["shift"][i], parts["sum"][i],
                                                    parts["outer"][i])
            total.merge(one)
        return total

    def gather_rows(rows: list) -> list:
        local = np.concatenate(rows)
        counts = multihost_utils.process_allgather(np.int64(len(local)))
        padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
        padded[: len(local)] = local
        every = multihost_utils.process_allgather(padded)
        return [every[i, : int(c)] for i, c in enumerate(counts)]

    all_kept = np.concatenate(gather_rows(kept))
    return (gather_stats(pool), gather_stats(spatial), gather_rows(logits),
            [all_kept[: int(min(cap, len(all_kept)))]])


class SampleFileError(console.UserError, ValueError):
    """A sample file that cannot be read as samples: the message names it and what to do."""


def iter_npz_batches(paths: Sequence[str], batch_size: int, *, key: str = "images",
                     max_samples: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, mask) batches of exactly `batch_size` rows over the arrays `key` of .npz files, in order.

    Only one file's array is held at a time; the last batch is zero-padded with mask False.
    """
    if not paths:
        raise ValueError("iter_npz_batches: no sample files given")
    buf, n_buf, seen = [], 0, 0
    for path in paths:
        try:
            with np.load(path) as f:
                if key not in f.files:
                    raise SampleFileError(f"{path}: no '{key}' array (found {f.files})")
                arr = f[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, SampleFileError):
                raise
            raise SampleFileError(f"{path} is unreadable ({type(e).__name__}: {e}): delete it and run --mode "
                                  "sample again to regenerate it") from e
        if max_samples is not None:
            arr = arr[: max(0, max_samples - seen)]
        seen += len(arr)
        buf.append(arr)
        n_buf += len(arr)
        while n_buf >= batch_size:
            cat = np.concatenate(buf)
            yield cat[:batch_size], np.ones(batch_size, bool)
            buf, n_buf = [cat[batch_size:]], n_buf - batch_size
        if max_samples is not None and seen >= max_samples:
            break
    if n_buf:
        cat = np.concatenate(buf)
        pad = np.zeros((batch_size - n_buf,) + cat.shape[1:], cat.dtype)
        yield np.concatenate([cat, pad]), np.arange(batch_size) < n_buf


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------------------
_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool_features", "image_size")


def save_reference_stats(stats: Mapping, path: str, *, max_pool_features: int | None = 10_000) -> None:
    """Write mu/sigma (and mu_s/sigma_s, pool_features, image_size when present) to an .npz that
    `load_reference_stats` reads.

    Keeps at most `max_pool_features` rows of pool features (ADM's reference batches hold 10k images for
    precision/recall; 50k rows would be 400 MB).
    """
    arrays = {k: np.asarray(stats[k]) for k in _STAT_KEYS if stats.get(k) is not None}
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"save_reference_stats: stats need 'mu' and 'sigma', got keys {sorted(stats)}")
    if "pool_features" in arrays and max_pool_features is not None:
        arrays["pool_features"] = arrays["pool_features"][:max_pool_features]
    files.write_npz(path, arrays)


def _check_pair(mu: np.ndarray, sigma: np.ndarray, what: str, path: str) -> None:
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{path}: {what} statistics have inconsistent shapes mean {mu.shape}, cov {sigma.shape}")


def load_reference_stats(path: str, feature_fn: FeatureFn | None = None, *, batch_size: int = 100) -> dict:
    """Reference statistics from an .npz, as a dict like `compute_feature_stats`'s.

    Layouts understood:
      * U-ViT / pytorch-fid `fid_stats_*.npz` and our `save_reference_stats` files: "mu", "sigma"
        (+ optional "mu_s", "sigma_s", "pool_features", "image_size");
      * ADM reference batches `VIRTUAL_*.npz`: "arr_0" uint8 images (N, H, W, 3), usually with "mu", "sigma",
        "mu_s", "sigma_s". Given `feature_fn`, the images are run through it for the precision/recall features
        (and for any statistics the file lacks); without it only the stored statistics are used.
    Anything else is a ValueError naming the keys found.
    """
    if not os.path.exists(path):
        raise console.MissingFileError(f"reference statistics not found: {path}")
    with np.load(path) as f:
        keys = set(f.files)
        if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
            raise ValueError(f"{path}: unknown reference layout, keys {sorted(keys)}; expected 'mu' and 'sigma' "
                             "(fid_stats_*.npz) or ADM's 'arr_0' images (VIRTUAL_*.npz)")
        ref = {k: f[k] for k in _STAT_KEYS if k in keys}
        images = f["arr_0"] if "arr_0" in keys and feature_fn is not None else None
        if images is not None:
            ref["image_size"] = np.asarray(images.shape[1:3], np.int64)
    if "arr_0" in keys and feature_fn is None:
        if "mu" not in ref:
            raise ValueError(f"{path} holds ADM reference images without statistics: pass feature_fn to compute them")
        logging.info("%s: using stored statistics; pass feature_fn to get precision/recall features", path)
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{path}: 'arr_0' should be uint8 (N, H, W, 3) images, got {images.dtype} "
                             f"{images.shape}")
        batches = ((images[i:i + batch_size], None) for i in range(0, len(images), batch_size))
        computed = compute_feature_stats(batches, feature_fn, max_pool_features=None)
        for k in _STAT_KEYS:
            ref.setdefault(k, computed[k])
        ref["n"] = computed["n"]
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        if k in ref:
            ref[k] = np.asarray(ref[k], np.float64)  # some official files store float32 means
    if ("mu_s" in ref) != ("sigma_s" in ref):
        raise ValueError(f"{path}: has only one of 'mu_s' / 'sigma_s'")
    _check_pair(ref["mu"], ref["sigma"], "pool", path)
    if "mu_s" in ref:
        _check_pair(ref["mu_s"], ref["sigma_s"], "spatial", path)
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of sample files
# ----------------------------------------------------------------------------------------------------------------
def evaluate_samples(sample_npz_paths: Sequence[str], ref: Mapping | str, feature_fn: FeatureFn, *,
                     batch_size: int = 100, pr_k: int = 3, is_splits: int = 10,
                     max_samples: int | None = None) -> dict:
    """Metrics of the samples in `sample_npz_paths` (key "images", uint8 NHWC) against `ref` (a stats dict or a
    path for `load_reference_stats`): what the reference and the sample count allow.

    Returns {"fid", "is", "n_samples", "skipped": {metric: why}} plus "is_std" (with at least `is_splits` samples;
    fewer give IS over one split), "sfid" when the reference has spatial statistics and "precision", "recall"
    when it has pool features (k = pr_k) and both sets have more than k. The samples are streamed `batch_size`
    at a time.
    """
    if isinstance(ref, (str, os.PathLike)):
        ref = load_reference_stats(os.fspath(ref), feature_fn, batch_size=batch_size)
    stats = compute_feature_stats(iter_npz_batches(sample_npz_paths, batch_size, max_samples=max_samples),
                                  feature_fn, progress=console.Progress("features of the samples", max_samples))
    n = stats["n"]
    out = {"fid": frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"]), "n_samples": n}
    skipped = {}
    if ref.get("mu_s") is not None:
        out["sfid"] = sfid(stats["mu_s"], stats["sigma_s"], ref["mu_s"], ref["sigma_s"])
    else:
        skipped["sfid"] = ("the reference has no spatial statistics (mu_s, sigma_s; official fid_stats_*.npz files "
                           "hold only mu and sigma)")
    if n >= is_splits:
        out["is"], out["is_std"] = inception_score(stats["logits"], splits=is_splits)
    else:
        out["is"] = inception_score(stats["logits"], splits=1)[0]
        skipped["is_std"] = f"{n} samples are fewer than the {is_splits} IS splits: IS over one split"
    n_ref = 0 if ref.get("pool_features") is None else len(ref["pool_features"])
    if min(n_ref, n) > pr_k:
        out["precision"], out["recall"] = precision_recall(ref["pool_features"], stats["pool_features"], k=pr_k)
    else:
        skipped["precision/recall"] = (
            f"{n} samples: more than k={pr_k} needed" if n_ref > pr_k else
            "the reference has no images or pool features (official fid_stats_*.npz files hold only mu and "
            "sigma; ADM's VIRTUAL_*.npz or statistics computed from the dataset have them)")
    out["skipped"] = skipped
    return out


def check_image_size(samples_hw: Sequence[int], ref: Mapping, expected_hw: Sequence[int], where: str) -> None:
    """SampleFileError unless the samples' (H, W) are the reference's (when it records its image size) or else
    `expected_hw` (what the config generates)."""
    ref_hw = ref.get("image_size")
    want, what = ((tuple(int(v) for v in ref_hw), "the reference statistics' image size") if ref_hw is not None
                  else (tuple(int(v) for v in expected_hw), "the config's image size"))
    if tuple(int(v) for v in samples_hw) != want:
        raise SampleFileError(f"{where}: samples are {samples_hw[0]}x{samples_hw[1]}, {what} is {want[0]}x{want[1]}:"
                              " FID against it would compare different resolutions; sample with the matching config")


# ----------------------------------------------------------------------------------------------------------------
# Feature functions
# ----------------------------------------------------------------------------------------------------------------
def inception_feature_fn(model: inception.InceptionV3, devices: Sequence | None = None) -> FeatureFn:
    """Jitted feature_fn of an InceptionV3 module: preprocess (pytorch-fid) -> pool / IS logits / spatial.

    The batch is split over `devices` (default: this process's devices; the weights are replicated on each), as
    `latent._jit_frozen` runs the autoencoder and CLIP: an 8-GPU host computes features on all 8. Each process
    works on its own host rows, so the statistics stay per-process (`compute_feature_stats` combines them). A
    batch is padded to a multiple of the device count and the padding rows dropped.
    """
    apply, state = inception.apply_fn(model)
    mesh = jax.sharding.Mesh(np.asarray(list(devices or jax.local_devices())), ("batch",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    @functools.partial(jax.jit, out_shardings=split)
    def features(state, images):
        out = apply(state, inception.preprocess(images))
        return {"pool": out["pool"], "logits": out["logits_unbiased"], "spatial": out["spatial"]}

    def run(images):
        images = np.asarray(images)
        b, d = len(images), mesh.size
        padded = np.concatenate([images, np.zeros((-b % d,) + images.shape[1:], images.dtype)])
        out = features(state, jax.device_put(padded, split))
        return {k: v[:b] for k, v in out.items()}

    return run


def make_inception_feature_fn(weights_path: str, *, dtype=jnp.float32,
                              precision=jax.lax.Precision.HIGHEST) -> FeatureFn:
    """The real feature_fn, from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an .npz of it)."""
    from uvit_jax.convert.inception import load_inception  # the converter is only needed for real weights

    return inception_feature_fn(load_inception(weights_path, dtype=dtype, precision=precision))
