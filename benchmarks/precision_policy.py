"""How much each bfloat16 precision policy changes the samples of a trained model, against float32.

    python benchmarks/precision_policy.py --config configs/quickstart.py --workdir runs/quickstart \
        [--n 500] [--digit_fd]

Samples `n` images from the workdir's EMA params with the config's sampler, once in float32 and once per policy
in bfloat16 (config `sample.dtype` / `precision.*`), all from the same noise and labels (sample mode's keys), and
prints per-sample distances to the float32 samples (mean |difference| in uint8 levels, the fraction of samples
that moved by more than 8 levels on average) and, with --digit_fd (benchmarks/digit_quality.py), the score
of each set: the FID-like number that says whether the difference matters.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICIES = {
    "all_bf16": dict(residual="compute", attention="compute", final_layer="compute"),
    "official_fp16_like": dict(residual="until_skip", attention="float32", final_layer="compute"),
    "default": dict(residual="float32", attention="compute", final_layer="float32"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--digit_fd", action="store_true", help="score each set with benchmarks/digit_quality.py "
                    "(quickstart digits only)")
    args = ap.parse_args()

    import numpy as np
    from absl import logging
    from ml_collections import config_flags  # noqa: F401 (config files import ml_collections)

    from uvit_jax import console, sample
    console.setup(0)
    logging.set_verbosity(logging.WARNING)
    spec = importlib.util.spec_from_file_location("cfg", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if args.digit_fd:
        from benchmarks import digit_quality

    def run(name, dtype, policy):
        config = module.get_config()
        config.sample.n_samples, config.sample.dtype = args.n, dtype
        config.sample.path = os.path.join(args.workdir, "precision", name)
        if policy:
            config.precision.update(policy)
        out = sample.sample_to_dir(config, args.workdir)
        return np.concatenate([np.load(f)["images"] for f in sample.sample_files(out)])[: args.n]

    ref = run("float32", "float32", None)
    rows = [("float32", ref)] + [(name, run(name, "bfloat16", p)) for name, p in POLICIES.items()]
    print(f"{'policy':<20} {'mean |diff| (levels)':>21} {'samples moved > 8':>18} {'digit_fd':>9}")
    for name, imgs in rows:
        per_sample = np.abs(imgs.astype(np.float32) - ref.astype(np.float32)).reshape(len(ref), -1).mean(1)
        fd = digit_quality.score(imgs)["digit_fd"] if args.digit_fd else float("nan")
        print(f"{name:<20} {per_sample.mean():>21.3f} {(per_sample > 8).mean():>18.3f} {fd:>9.2f}")


if __name__ == "__main__":
    main()
