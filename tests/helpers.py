"""Shared test helpers: loading config files from configs/ and the tiny training config."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(digits_dir: str, **train_overrides):
    """configs/test_tiny.py reading the digits prepared in `digits_dir`, with train.* overrides."""
    c = load_config("test_tiny")
    c.dataset.data_dir = digits_dir
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


def rel_err(a, b):
    """Max absolute difference relative to the reference's max magnitude (the equivalence tests' measure)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
