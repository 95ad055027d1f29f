"""benchmarks/digit_quality.py, the quickstart's score: its input handling (the score itself trains a classifier for
a minute, so it is checked by hand against the original tool, not here)."""
import subprocess
import sys

import numpy as np

from benchmarks import digit_quality


def test_samples_of_any_size_are_read_as_28x28_grey_digits():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, -1)  # the pipeline's 32x32, RGB
    np.testing.assert_allclose(digit_quality._as_digits(padded), digits / 255.0, rtol=1e-6)
    small = digit_quality._as_digits(np.full((2, 16, 16, 1), 255, np.uint8))
    assert small.shape == (2, 28, 28) and np.all(small == 1.0)


def test_an_empty_folder_is_one_error_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/digit_quality.py", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: no .npz files in {tmp_path}: run main.py --mode sample first"
