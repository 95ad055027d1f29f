"""InceptionV3 as used for FID: the TF "inception-2015-12-05" graph as ported by pytorch-fid, in Flax NNX, NHWC.

This is the network behind U-ViT's FID numbers (pytorch-fid's `FIDInceptionV3` with the `pt_inception-2015-12-05`
weights; torch-fidelity loads the same file). It differs from torchvision's ImageNet InceptionV3 in ways that
change the features, so they are reproduced here:
  * every conv is conv(no bias) -> BatchNorm(eps=1e-3) -> ReLU (TF's layout; the TF BNs have no learned scale,
    the ported weights carry scale = 1);
  * the pooling branch of the 35x35, 17x17 and first 8x8 blocks (Mixed_5b-d, Mixed_6b-e, Mixed_7b) is a 3x3
    average pool that does NOT count the zero padding (TF semantics), and the last block (Mixed_7c) uses a 3x3
    max pool there (a quirk of the TF graph);
  * the classifier has 1008 outputs (1000 ImageNet classes + 8 unused).

Module and attribute names follow torchvision/pytorch-fid (`Conv2d_1a_3x3`, `Mixed_6e.branch7x7dbl_3`, ...) so the
converter can map state-dict keys mechanically. Outputs of `InceptionV3.__call__` (input: preprocessed images,
(B, 299, 299, 3) float in [-1, 1], see `preprocess`):
  * `pool`: (B, 2048) pool3 features (global average of Mixed_7c) - FID, precision/recall;
  * `logits`: (B, 1008) `pool @ fc.kernel + fc.bias`, the full classifier of the ported model;
  * `logits_unbiased`: (B, 1008) `pool @ fc.kernel`. This is what Inception Score uses: ADM's evaluator takes
    the weight of `softmax/logits/MatMul` without the bias and torch-fidelity / torchmetrics default to the
    `logits_unbiased` feature; both take the softmax over all 1008 outputs;
  * `spatial`: (B, 2023) sFID features: the first 7 channels of Mixed_6d's 1x1 branch (conv-BN-ReLU, 17x17),
    flattened in (H, W, C) order. ADM's evaluator reads `mixed_6/conv:0` from the TF graph and keeps `[..., :7]`;
    the TF graph names the 17x17 blocks mixed_4..mixed_7 = Mixed_6b..Mixed_6e, so `mixed_6` is Mixed_6d and its
    node `conv` is the 1x1 branch. ADM flattens NHWC, hence (H, W, C) order (matters only for comparing against
    ADM's stored `mu_s`/`sigma_s`; the Frechet distance itself is invariant to a consistent permutation).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
BN_EPS = 1e-3


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 NHWC images -> float32 NHWC at `size`x`size` in [-1, 1], as pytorch-fid feeds its Inception.

    pytorch-fid: ToTensor (x / 255), `F.interpolate(size=299, mode='bilinear', align_corners=False)`, then 2x - 1.
    `jax.image.resize(..., 'bilinear', antialias=False)` samples at half-pixel centres with edge clamping, which is
    the same map as PyTorch's align_corners=False bilinear both when up- and down-sampling (no antialiasing in
    either; checked against a direct implementation of PyTorch's formula in tests/test_inception.py).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"preprocess expects uint8 images (B, H, W, 3), got shape {images.shape}")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


def _pad2(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool, NHWC; padding counts as -inf like PyTorch's `max_pool2d`."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 'same' average pool that divides by the number of real pixels (TF / count_include_pad=False)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / count


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0, *, dtype, precision, rngs: nnx.Rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=_pad2(padding), use_bias=False,
                             dtype=dtype, precision=precision, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nnx.Module):
    """35x35 block (Mixed_5b/c/d); the pool branch excludes padding from the average."""

    def __init__(self, cin: int, pool_features: int, *, dtype, precision, rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, precision=precision, rngs=rngs)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, cin: int, *, dtype, precision, rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, precision=precision, rngs=rngs)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, stride=2)], axis=-1)


class FIDInceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b-e); the pool branch excludes padding."""

    def __init__(self, cin: int, c7: int, *, dtype, precision, rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, precision=precision, rngs=rngs)
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        # branch1x1 comes first, so out[..., :7] is the first 7 channels of the 1x1 branch (sFID feature).
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin: int, *, dtype, precision, rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, precision=precision, rngs=rngs)
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, stride=2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """8x8 block (Mixed_7b with an exclude-padding average pool, Mixed_7c with a max pool: `pool='max'`)."""

    def __init__(self, cin: int, pool: str, *, dtype, precision, rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
        conv = functools.partial(BasicConv2d, dtype=dtype, precision=precision, rngs=rngs)
        self.pool = pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = max_pool(x, stride=1, padding=1) if self.pool == "max" else avg_pool_exclude_pad(x)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nnx.Module):
    """pytorch-fid's FIDInceptionV3 (no aux head, 1008 classes), NHWC. See the module docstring for outputs.

    Args:
      dtype: compute dtype (params stay float32). float32 reproduces the reference features.
      precision: matmul/conv precision; HIGHEST by default so TPU/GPU do not silently use bf16/TF32 passes.
    """

    def __init__(self, *, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(192, 32, **kw)
        self.Mixed_5c = FIDInceptionA(256, 64, **kw)
        self.Mixed_5d = FIDInceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, 128, **kw)
        self.Mixed_6c = FIDInceptionC(768, 160, **kw)
        self.Mixed_6d = FIDInceptionC(768, 160, **kw)
        self.Mixed_6e = FIDInceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, "avg", **kw)
        self.Mixed_7c = FIDInceptionE(2048, "max", **kw)
        self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, dtype=dtype, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """Preprocessed images (B, H, W, 3) in [-1, 1] (299x299 for the reference features) -> feature dict."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        x = self.Mixed_6d(x)
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        kernel = self.fc.kernel[...]
        logits_unbiased = jnp.dot(pool, kernel, precision=self.fc.precision)
        return {
            "pool": pool,
            "logits": logits_unbiased + self.fc.bias[...],
            "logits_unbiased": logits_unbiased,
            "spatial": spatial.astype(jnp.float32),
        }


@functools.lru_cache(maxsize=4)
def _abstract_split(dtype, precision):
    # Tracing the 94 conv initialisers takes seconds: do it once per (dtype, precision).
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(dtype=dtype, precision=precision, rngs=nnx.Rngs(0))))


def model_from_pure_dict(tree: dict, *, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST) -> InceptionV3:
    """An InceptionV3 holding the arrays of `tree` (our variable layout, e.g. from the converter); no random init."""
    graphdef, template = _abstract_split(dtype, precision)
    state = jax.tree.map(lambda v: v, template)  # fresh Variables: the cached template stays intact
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
    return nnx.merge(graphdef, state)


def state_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of every variable (params and BN statistics) of the model."""
    pure = nnx.to_pure_dict(_abstract_split(jnp.float32, jax.lax.Precision.HIGHEST)[1])
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def apply_fn(model: InceptionV3):
    """(graphdef-bound apply, state): `apply(state, preprocessed) -> dict`, for jitting with the state as input."""
    graphdef, state = nnx.split(model)

    def apply(state, x: jax.Array) -> dict[str, jax.Array]:
        return nnx.merge(graphdef, state)(x)

    return apply, state
