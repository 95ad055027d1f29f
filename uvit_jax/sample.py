"""Sample mode, eval mode and FID during training: the wiring between checkpoints, the sampler and the metrics.

Sample mode writes `n_samples` images as `SAMPLES/batch_XXXXXX.npz` (uint8 NHWC under `images`, class labels under
`labels` for class models; latent configs write `latents` until the autoencoder lands) plus `SAMPLES/grid.png`.
Batch i is drawn from keys derived from (seed, i) and each file is written atomically, so a preempted 50k job that
is started again skips the files already there and ends with exactly n_samples, none duplicated.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

from uvit_jax import checkpoint, data, evaluate, generate, models, parallel
from uvit_jax.train import compute_dtype

SAMPLE_SALT = 0x5A3  # keeps sampling keys apart from training keys derived from the same seed


def load_ema_params(config, workdir: str):
    """EMA params from `config.sample.params_dir` (a converted official checkpoint) or WORKDIR's newest checkpoint."""
    nnet = dict(config.nnet)
    abstract = jax.eval_shape(functools.partial(models.init_params, nnet), jax.random.key(0))
    mesh = parallel.make_mesh(config.mesh.fsdp)
    shardings = parallel.tree_param_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if config.sample.params_dir:
        params, saved_nnet = checkpoint.load_params_dir(config.sample.params_dir, abstract)
        # use_checkpoint (remat) changes no parameter, so it may differ
        mismatched = {k: (v, nnet.get(k)) for k, v in saved_nnet.items()
                      if k != "use_checkpoint" and nnet.get(k) != v}
        if mismatched:
            raise ValueError(f"{config.sample.params_dir}/nnet.json does not match config.nnet: {mismatched}")
        return params, mesh
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1)
    try:
        params = ckpt.restore_params(abstract, item="ema_params")
    finally:
        ckpt.close()
    if params is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or set "
                                f"--config.sample.params_dir to a converted official checkpoint")
    return params, mesh


def _labels(key, n: int, num_classes: int):
    """Class labels uniform over the real classes (the official eval scripts draw them uniformly too)."""
    return jax.random.randint(key, (n,), 0, num_classes, dtype=np.int32)


def sample_to_dir(config, workdir: str) -> str:
    """Generate config.sample.n_samples images into the samples dir, resuming a partial run; returns the dir."""
    out_dir = config.sample.path or os.path.join(workdir, "samples")
    nnet = dict(config.nnet)
    if nnet["name"] == "uvit_t2i":
        raise NotImplementedError("text-to-image sample mode needs MS-COCO validation contexts; not in this "
                                  "release (training and the sampler itself support text models)")
    info = data.dataset_info(config.dataset)
    latent = config.dataset.name.endswith("_latents")
    params, mesh = load_ema_params(config, workdir)
    batch_sharding = parallel.batch_sharding(mesh)
    k = generate.num_real_classes(nnet, bool(config.sample.cfg) or config.dataset.p_uncond > 0)
    batch = generate.padded_size(config.sample.mini_batch_size)
    n_total = int(config.sample.n_samples)
    n_batches = math.ceil(n_total / batch)
    apply = models.make_apply(nnet, dtype=compute_dtype(config))
    gen = jax.jit(functools.partial(generate.make_generate_from_config(config, apply, image_shape=info["image_shape"]),
                                    batch_size=batch), out_shardings=batch_sharding)
    base = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_SALT)
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
    done = _done_batches(out_dir, n_batches)
    todo = [i for i in range(n_batches) if not done[i]]
    logging.info("Sampling %d images in %d batches of %d into %s (%d batches already there)", n_total, n_batches,
                 batch, out_dir, n_batches - len(todo))
    t0, made = time.time(), 0
    with checkpoint.sigterm_guard():
        for i in todo:
            if checkpoint.should_stop(i):
                logging.info("Preemption requested: stopping after %d batches; run again to resume", made)
                break
            label_key, gen_key = jax.random.split(jax.random.fold_in(base, i))
            labels = jax.device_put(_labels(label_key, batch, k), batch_sharding) if k else None
            x = generate.gather_to_host(gen(params, gen_key, labels))
            count = min(batch, n_total - i * batch)
            if parallel.is_main_process():
                arrays = {"latents": x[:count]} if latent else {"images": generate.to_uint8(x[:count])}
                if k:
                    arrays["labels"] = generate.gather_to_host(labels)[:count]
                _write_atomic(os.path.join(out_dir, f"batch_{i:06d}.npz"), arrays)
                if i == 0 and not latent:
                    generate.save_grid(arrays["images"][:64], os.path.join(out_dir, "grid.png"), 8)
            made += 1
            logging.info("batch %d/%d: %.2f samples/s", i + 1, n_batches, made * batch / (time.time() - t0))
    if made:
        logging.info("Sampling throughput: %.2f samples/s (%d samples)", made * batch / (time.time() - t0),
                     made * batch)
    return out_dir


def _done_batches(out_dir: str, n_batches: int) -> np.ndarray:
    """Which batch files exist, decided on process 0 and shared, so every host runs the same batches."""
    done = np.array([os.path.exists(os.path.join(out_dir, f"batch_{i:06d}.npz")) for i in range(n_batches)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return done


def _write_atomic(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a preempted write leaves only a .tmp file, never a partial batch file


def sample_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "batch_*.npz")))


def make_feature_fn(config):
    """The Inception feature function from config.eval.inception_path ('standin' = a random stand-in for tests)."""
    path = config.eval.inception_path
    if not path:
        raise ValueError("config.eval.inception_path is not set: point it at pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth (no download happens here)")
    if path == "standin":
        logging.warning("Using a random stand-in for Inception: the numbers are NOT FID; for tests only.")
        return evaluate.make_standin_feature_fn(0)
    return evaluate.make_inception_feature_fn(path)


def reference_stats(config, workdir: str, feature_fn) -> dict:
    """config.eval.ref_stats if set, else statistics of the training dataset computed once and cached."""
    if config.eval.ref_stats:
        if not os.path.exists(config.eval.ref_stats):
            raise FileNotFoundError(
                f"config.eval.ref_stats={config.eval.ref_stats} not found: get the official fid_stats file, or set "
                f"--config.eval.ref_stats= (empty) to compute statistics from the dataset '{config.dataset.name}'")
        return evaluate.load_reference_stats(config.eval.ref_stats, feature_fn)
    cache = os.path.join(workdir, "eval", f"ref_stats_{config.dataset.name}_{config.dataset.image_size}.npz")
    if os.path.exists(cache):
        return evaluate.load_reference_stats(cache)
    logging.info("Computing reference statistics of %s (cached in %s)", config.dataset.name, cache)
    stats = evaluate.compute_feature_stats(
        data.make_eval_batches(config.dataset, global_batch_size=config.eval.batch_size), feature_fn,
        gather_processes=jax.process_count() > 1)
    if parallel.is_main_process():
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        evaluate.save_reference_stats(stats, cache)
    return stats


def evaluate_workdir(config, workdir: str) -> dict:
    """Eval mode: metrics of WORKDIR's samples against the reference; printed, logged, written to WORKDIR/eval/."""
    files = sample_files(config.sample.path or os.path.join(workdir, "samples"))
    if not files:
        raise FileNotFoundError(f"no samples in {workdir}/samples: run --mode sample first")
    feature_fn = make_feature_fn(config)
    ref = reference_stats(config, workdir, feature_fn)
    metrics = evaluate.evaluate_samples(files, ref, feature_fn, batch_size=config.eval.batch_size,
                                        pr_k=config.eval.pr_k)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["n_samples"] = int(sum(np.load(f)["images"].shape[0] for f in files))
    if parallel.is_main_process():
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        path = os.path.join(workdir, "eval", f"metrics_{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics, indent=2))
        logging.info("Wrote %s", path)
    return metrics


def make_training_fid_callback(config, workdir: str):
    """FID-n during training (official: FID-10k every save): samples stream straight into the statistics."""
    feature_fn = make_feature_fn(config)
    ref = reference_stats(config, workdir, feature_fn)
    nnet = dict(config.nnet)
    info = data.dataset_info(config.dataset)
    apply = models.make_apply(nnet, dtype=compute_dtype(config))
    batch = generate.padded_size(config.sample.mini_batch_size)
    gen = jax.jit(functools.partial(generate.make_generate_from_config(config, apply, image_shape=info["image_shape"]),
                                    batch_size=batch))
    k = generate.num_real_classes(nnet, bool(config.sample.cfg) or config.dataset.p_uncond > 0)
    n = int(config.train.fid_n_samples)

    def callback(step: int, state) -> dict:
        base = jax.random.fold_in(jax.random.key(config.seed), step)

        def images():
            for i in range(math.ceil(n / batch)):
                label_key, gen_key = jax.random.split(jax.random.fold_in(base, i))
                labels = _labels(label_key, batch, k) if k else None
                x = generate.gather_to_host(gen(state["ema_params"], gen_key, labels))
                yield generate.to_uint8(x[: min(batch, n - i * batch)])

        stats = evaluate.compute_feature_stats(images(), feature_fn)
        fid = evaluate.frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"])
        logging.info("step %d: FID-%d %.3f", step, n, fid)
        return {f"fid_{n}": float(fid)}

    return callback
