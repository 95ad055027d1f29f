"""Eval mode and FID during training: the wiring between sample files, the feature network and the metrics.

`evaluate_workdir` scores WORKDIR/samples (FID, sFID, IS, precision, recall) against the config's reference
statistics and writes WORKDIR/eval/metrics_<time>.json. `make_training_fid_callback` computes FID-n of the EMA
params at save steps into WORKDIR/eval/fid_<step>.json, from which the training loop keeps WORKDIR/eval/best.json,
as the official training scripts do (docs/official_behaviour.md §4).
"""
from __future__ import annotations

import importlib
import os
import time

import jax
import numpy as np
from absl import logging

from uvit_jax import console, data, evaluate, files, generate, latent, parallel, rng, sample
from uvit_jax.conditioning import Conditioning
from uvit_jax.rundir import RunDir

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


def _recorded_samples(sample_dir: str) -> tuple[list[str], int]:
    """(the files of a finished sample run, their image count), from its record alone: nothing is read but the
    record and the files' sizes. One-line errors for a missing, unfinished or damaged run."""
    record = sample.read_record(sample_dir)
    if record is None:
        raise console.MissingFileError(f"no samples in {sample_dir} (no {sample.RECORD}): run --mode sample first")
    paths = sample.sample_files(sample_dir)
    for path in paths:
        written = record["files"][os.path.basename(path)]["bytes"]
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != written:
            raise evaluate.SampleFileError(
                f"{path} is {'missing' if size is None else f'{size} bytes'}, written as {written}: run --mode "
                "sample again to regenerate it")
    n = sum(entry["images"] for entry in record["files"].values())
    wanted = record["settings"]["n_samples"]
    if n != wanted:
        raise sample.SampleRecordError(f"{sample_dir} holds {n} of its {wanted} samples: run --mode sample again to "
                                       "finish it")
    return paths, n


def expected_image_size(config) -> tuple[int, int]:
    """The (H, W) of the images the config generates (decoded for latent configs)."""
    side = int(config.nnet.img_size) * (latent.downsampling(config) if latent.is_latent(config) else 1)
    return side, side


def evaluate_workdir(config, workdir: str) -> dict:
    """Eval mode: metrics of WORKDIR's samples against the reference (what it allows: FID and IS always, sFID
    and precision/recall when it holds spatial statistics / images); logged and written to WORKDIR/eval/."""
    feature_fn = make_feature_fn(config)  # first: a missing feature network is the first thing to fix
    sample_dir = config.sample.path or RunDir(workdir).samples
    paths, n = _recorded_samples(sample_dir)
    ref, ref_source = reference_stats(config, workdir, feature_fn)
    with np.load(paths[0]) as f:
        evaluate.check_image_size(f["images"].shape[1:3], ref, expected_image_size(config), paths[0])
    metrics = evaluate.evaluate_samples(paths, ref, feature_fn, batch_size=config.eval.batch_size,
                                        pr_k=config.eval.pr_k, max_samples=n)
    metrics.update(reference=ref_source, samples=sample_dir)
    if parallel.is_main_process():
        path = RunDir(workdir).metrics(time.strftime("%Y%m%d-%H%M%S"))
        files.write_json(path, metrics)
        names = {"fid": "FID %.3f", "sfid": "sFID %.3f", "is": "IS %.2f", "is_std": "(± %.2f)",
                 "precision": "precision %.3f", "recall": "recall %.3f"}
        shown = "  ".join(fmt % metrics[k] for k, fmt in names.items() if k in metrics)
        logging.info("%s  (%d samples vs %s); wrote %s", shown, n, ref_source, path)
        for what, why in metrics["skipped"].items():
            logging.info("%s not computed: %s", what, why)
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
    return dict(s, steps=50, order=3, thresholding=False, scale=float(config.sample.scale) if text else 0.0)


def make_training_fid_callback(config, workdir: str):
    """callback(step, state) -> {"fid": value, ...}: FID of `train.fid_n_samples` EMA samples drawn with
    `training_fid_sampler`, against the reference (the training loop records it in WORKDIR/eval/fid_<step>.json
    and keeps the best step)."""
    feature_fn = make_feature_fn(config)
    ref, _ = reference_stats(config, workdir, feature_fn)
    cond = Conditioning.from_config(config)
    settings = training_fid_sampler(config)
    n = int(config.train.fid_n_samples)
    label_probs = (generate.label_probabilities(config, workdir, cond.real_classes) if cond.kind == "class"
                   else None)
    sampler = generate.Sampler(config, parallel.make_mesh(config.mesh.fsdp), generate.batch_size(config, n),
                               settings=settings, label_probs=label_probs)

    def callback(step: int, state) -> dict:
        start = time.time()
        # validation captions for text models, as train_t2i_discrete.py's FID
        draws = sampler.batches(state["ema_params"], n, lambda i: rng.stream_key(config.seed, rng.FID, step, i),
                                label_key=lambda i: rng.stream_key(config.seed, rng.LABELS, step, i))
        stats = evaluate.compute_feature_stats((x for _, x, _ in draws), feature_fn,
                                               progress=console.Progress(f"step {step}: FID-{n} samples", n))
        fid = float(evaluate.frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"]))
        record = {"step": int(step), "fid": fid, "n_samples": n, "sampler": settings,
                  "seconds": round(time.time() - start, 2)}
        logging.info("step %d: FID-%d %.3f (%s %d steps, %.0f s)", step, n, fid, settings["algorithm"],
                     settings["steps"], record["seconds"])
        return record

    return callback
