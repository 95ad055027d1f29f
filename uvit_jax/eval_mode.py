"""Eval mode and FID during training: the wiring between sample files, the feature network and the metrics.

`evaluate_workdir` scores WORKDIR/samples (FID, sFID, IS, precision, recall) against the config's reference
statistics and writes WORKDIR/eval/metrics_<time>.json. `make_training_fid_callback` computes FID-n of the EMA
params at save steps into WORKDIR/eval/fid_<step>.json, from which the training loop keeps WORKDIR/eval/best.json,
as the official training scripts do (docs/official_behaviour.md §4).
"""
from __future__ import annotations

import importlib
import math
import os
import time

import jax
import numpy as np
from absl import logging

from uvit_jax import console, data, diffusion, evaluate, files, generate, images, latent, parallel, rng
from uvit_jax.conditioning import Conditioning
from uvit_jax.rundir import RunDir
from uvit_jax.sample import label_probabilities, sample_files, sample_labels
from uvit_jax.train_step import make_apply

INCEPTION_HELP = ("set --config.eval.inception_path=PATH to pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                  "(the TF-FID Inception weights, from the pytorch-fid GitHub releases; read without PyTorch, "
                  "nothing is downloaded here)")


class MissingFeatureNetworkError(ValueError):
    pass


def make_feature_fn(config):
    """The feature network: pytorch-fid's Inception from `eval.inception_path`, or `eval.feature_fn`
    ("module:function" returning a feature_fn with the same contract, e.g. another network or a test stand-in)."""
    if config.eval.feature_fn:
        module, _, name = config.eval.feature_fn.partition(":")
        logging.warning("Features from %s instead of Inception: the numbers are not comparable to published FIDs",
                        config.eval.feature_fn)
        return getattr(importlib.import_module(module), name)()
    path = config.eval.inception_path
    if not path:
        raise MissingFeatureNetworkError(f"no Inception weights: {INCEPTION_HELP}")
    if not os.path.exists(path):
        raise MissingFeatureNetworkError(f"config.eval.inception_path={path} does not exist: {INCEPTION_HELP}")
    return evaluate.make_inception_feature_fn(path)


OFFICIAL_REF_STATS = ("the official fid_stats_imagenet{256,512}_guided_diffusion.npz / fid_stats_mscoco256_val.npz / "
                      "fid_stats_cifar10_train_pytorch.npz (the U-ViT README's assets/fid_stats)")


def reference_stats_problem(config) -> str | None:
    """Why `reference_stats` cannot give statistics, saying what to do (None: it can). Latent datasets hold
    moments, not the real images FID compares against, so only a statistics file serves them."""
    path, name = config.eval.ref_stats, config.dataset.name
    if path and os.path.exists(path):
        return None
    if latent.is_latent(config):
        where = f"config.eval.ref_stats={path} not found" if path else "config.eval.ref_stats is not set"
        return f"{where}: {name} holds latents, not images; FID needs the statistics of the real images: get " \
               f"{OFFICIAL_REF_STATS} and set eval.ref_stats to it"
    if path:
        return (f"config.eval.ref_stats={path} not found: get {OFFICIAL_REF_STATS}, or set "
                f"--config.eval.ref_stats= (empty) to compute statistics from the dataset '{name}'")
    return None


def reference_stats(config, workdir: str, feature_fn) -> tuple[dict, str]:
    """(statistics, where from): config.eval.ref_stats if set, else the training dataset's, computed once and
    cached in WORKDIR/eval/."""
    problem = reference_stats_problem(config)
    if problem:
        raise console.MissingFileError(problem)
    if config.eval.ref_stats:
        return evaluate.load_reference_stats(config.eval.ref_stats, feature_fn), config.eval.ref_stats
    info = data.dataset_info(config.dataset)
    cache = RunDir(workdir).ref_stats_cache(config.dataset.name, info["image_shape"][0])
    if os.path.exists(cache):
        return evaluate.load_reference_stats(cache), cache
    logging.info("Computing reference statistics of %s (cached in %s)", config.dataset.name, cache)
    batches = data.make_eval_batches(config.dataset, global_batch_size=config.eval.batch_size)
    stats = evaluate.compute_feature_stats(
        batches, feature_fn, gather_processes=jax.process_count() > 1,
        progress=console.Progress(f"reference statistics of {config.dataset.name}",
                                  info["num_examples"] // jax.process_count()))
    if parallel.is_main_process():
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        evaluate.save_reference_stats(stats, cache)
    return stats, cache


def evaluate_workdir(config, workdir: str) -> dict:
    """Eval mode: metrics of WORKDIR's samples against the reference; logged and written to WORKDIR/eval/."""
    feature_fn = make_feature_fn(config)  # first: a missing feature network is the first thing to fix
    sample_dir = config.sample.path or RunDir(workdir).samples
    paths = sample_files(sample_dir)
    if not paths:
        raise console.MissingFileError(f"no samples in {sample_dir}: run --mode sample first")
    ref, ref_source = reference_stats(config, workdir, feature_fn)
    metrics = evaluate.evaluate_samples(paths, ref, feature_fn, batch_size=config.eval.batch_size,
                                        pr_k=config.eval.pr_k)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["n_samples"] = int(sum(np.load(f)["images"].shape[0] for f in paths))
    metrics["reference"] = ref_source
    metrics["samples"] = sample_dir
    if parallel.is_main_process():
        path = RunDir(workdir).metrics(time.strftime("%Y%m%d-%H%M%S"))
        files.write_json(path, metrics)
        logging.info("FID %.3f  sFID %.3f  IS %.2f  precision %.3f  recall %.3f  (%d samples vs %s); wrote %s",
                     metrics["fid"], metrics["sfid"], metrics["is"], metrics["precision"], metrics["recall"],
                     metrics["n_samples"], ref_source, path)
    return metrics


def training_fid_sampler(config) -> dict:
    """The sampler the official training scripts use for FID-10k (docs/official_behaviour.md §4): a 50-step
    DPM-Solver (continuous: noise form, logSNR "fast"; discrete: DPM-Solver++ on the time-uniform grid), guided
    only for text-to-image (train_t2i_discrete.py), whatever the config's final sampler is."""
    if config.schedule == "vp":
        s = dict(algorithm="dpm_solver", method="fast", skip_type="logSNR")
    else:
        s = dict(algorithm="dpm_solver_pp", method="fast_grid", skip_type="time_uniform")
    text = config.nnet.name == "uvit_t2i"
    return dict(s, steps=50, order=3, scale=float(config.sample.scale) if text else 0.0)


def training_fid_generate(config, image_shape: tuple[int, ...], mesh, null_context=None):
    """`generate(params, key, cond, batch_size)` of `training_fid_sampler` (make_generate_fn; jit it over `mesh`)."""
    sampler = training_fid_sampler(config)
    return generate.make_generate_fn(
        make_apply(config, mesh=mesh), diffusion.make_schedule(config.schedule), algorithm=sampler["algorithm"],
        steps=sampler["steps"], image_shape=image_shape, method=sampler["method"], order=sampler["order"],
        skip_type=sampler["skip_type"], scale=sampler["scale"],
        null_cond=Conditioning.from_config(config).null_condition(null_context) if sampler["scale"] > 0 else None)


def make_training_fid_callback(config, workdir: str):
    """callback(step, state) -> {"fid": value, ...}: FID of `train.fid_n_samples` EMA samples drawn with
    `training_fid_sampler`, against the reference (the training loop records it in WORKDIR/eval/fid_<step>.json
    and keeps the best step)."""
    feature_fn = make_feature_fn(config)
    ref, _ = reference_stats(config, workdir, feature_fn)
    info = data.dataset_info(config.dataset)
    cond = Conditioning.from_config(config)
    sampler = training_fid_sampler(config)
    batch = parallel.padded_size(config.sample.mini_batch_size)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    decode = latent.make_decoder(config, mesh) if latent.is_latent(config) else None
    texts = data.TextConditions(config, "val") if cond.kind == "text" else None
    null_context = data.load_empty_context(config.dataset.path) if cond.kind == "text" else None
    fn = training_fid_generate(config, info["image_shape"], mesh, null_context)
    gen = generate.jit_generate(fn, batch, mesh)
    n = int(config.train.fid_n_samples)
    label_probs = label_probabilities(config, workdir, cond.real_classes) if cond.kind == "class" else None

    def callback(step: int, state) -> dict:
        start = time.time()

        def batches():
            for i in range(math.ceil(n / batch)):
                c = None
                if cond.kind == "class":
                    c = sample_labels(rng.stream_key(config.seed, rng.LABELS, step, i), batch, label_probs)
                elif texts is not None:  # validation captions, as train_t2i_discrete.py's FID
                    c = latent.host_to_global(texts.batch(i, batch)["context"], mesh)
                x = gen(state["ema_params"], rng.stream_key(config.seed, rng.FID, step, i), c)
                x = parallel.gather_to_host(decode(x) if decode else x)
                yield images.to_uint8(x[: min(batch, n - i * batch)])

        stats = evaluate.compute_feature_stats(batches(), feature_fn,
                                               progress=console.Progress(f"step {step}: FID-{n} samples", n))
        fid = float(evaluate.frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"]))
        record = {"step": int(step), "fid": fid, "n_samples": n, "sampler": sampler,
                  "seconds": round(time.time() - start, 2)}
        logging.info("step %d: FID-%d %.3f (%s %d steps, %.0f s)", step, n, fid, sampler["algorithm"],
                     sampler["steps"], record["seconds"])
        return record

    return callback
