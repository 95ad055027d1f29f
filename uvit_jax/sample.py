"""Sample mode: `n_samples` images from the EMA params of a run (or a converted official checkpoint) into files.

Writes `SAMPLES/batch_XXXXXX.npz` (uint8 NHWC under `images`; class labels under `labels` for class models; for
text models the validation caption each sample was drawn for, `captions` (str, when the feature folder keeps the
texts) and `caption_index` (image, caption k) in the val split) plus `SAMPLES/grid.png` (the first 64 samples of
batch 0, 8 per row). Latent configs decode through the autoencoder (`latent.make_decoder`) first, so eval mode reads
the same files for every config. Batch i draws its noise and its labels / captions from (seed, stream, i), and each
file is written atomically, so a preempted 50k job that is started again writes only the missing files and ends
with exactly n_samples, none duplicated.

With `sample.prompts=FILE` (text models): one image per line of FILE, the prompts CLIP-encoded here with
`clip.pretrained_path`, into `PROMPTS/prompt_XXXX.png`, `PROMPTS/prompts.json` and a captioned `PROMPTS/grid.png`
(PROMPTS = sample.path or WORKDIR/prompts).
"""
from __future__ import annotations

import glob
import math
import os
import time

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from uvit_jax import checkpoint, console, data, files, generate, images, latent, models, parallel, preemption, rng
from uvit_jax.conditioning import Conditioning
from uvit_jax.config import ConfigError
from uvit_jax.rundir import RunDir
from uvit_jax.train_step import make_apply


class NoParamsError(FileNotFoundError):
    """Nothing to sample from: no checkpoint in the workdir and no converted params dir."""


def abstract_params_on_mesh(config, mesh):
    """The network's params as ShapeDtypeStructs with this mesh's (FSDP) shardings: a restore target."""
    abstract = models.abstract_params(dict(config.nnet))
    return parallel.with_shardings(abstract, parallel.tree_param_shardings(abstract, mesh))


def load_ema_params(config, workdir: str, mesh) -> tuple[dict, str]:
    """EMA params from `config.sample.params_dir` (a converted official checkpoint) or WORKDIR's newest checkpoint.

    Returns (params, where they came from). Reads only: nothing is created in a wrong workdir.
    """
    target = abstract_params_on_mesh(config, mesh)
    if config.sample.random_params:
        init = jax.jit(lambda k: models.init_params(dict(config.nnet), k),
                       out_shardings=jax.tree.map(lambda a: a.sharding, target))
        return init(rng.stream_key(config.seed, rng.INIT)), "freshly initialised params (sample.random_params)"
    if config.sample.params_dir:
        from uvit_jax import convert
        nnet, params = convert.load_converted(config.sample.params_dir,
                                              shardings=jax.tree.map(lambda a: a.sharding, target))
        # use_checkpoint (remat) changes no parameter, so it may differ
        mismatched = {k: (v, config.nnet.get(k)) for k, v in nnet.items()
                      if k != "use_checkpoint" and config.nnet.get(k) != v}
        if mismatched:
            raise ValueError(f"{config.sample.params_dir}/nnet.json does not match config.nnet (saved, config): "
                             f"{mismatched}")
        return params, f"converted params {config.sample.params_dir}"
    directory = RunDir(workdir).checkpoints
    step, why = _chosen_step(config.sample.step, workdir)
    try:
        params, step = checkpoint.restore_ema_params(directory, target, step=step)
    except checkpoint.NoSuchStepError as e:
        raise NoParamsError(f"{e}: choose one with --config.sample.step=N (or 'latest', 'best')") from e
    except checkpoint.NoCheckpointError as e:
        raise NoParamsError(f"nothing to sample from: no checkpoint in {directory}. Train first (same --config and "
                            "--workdir without --mode), or set --config.sample.params_dir to a converted official "
                            "checkpoint (python main.py --mode convert ...).") from e
    return params, f"EMA params of step {step} ({why}) in {directory}"


def _chosen_step(choice: str, workdir: str) -> tuple[int | None, str]:
    """config.sample.step -> (step or None for the newest, the reason to log)."""
    if choice.isdigit():
        return int(choice), "chosen with sample.step"
    if choice == "best":
        run = RunDir(workdir)
        best = run.best(checkpoint.saved_steps(run.checkpoints))
        if best is not None:
            return int(best["step"]), f"best FID during training, {best['fid']:.3f}; sample.step=latest for the newest"
        return None, "the newest: no FID was computed during training"
    return None, "the newest, as sample.step=latest asks"


def sample_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "batch_*.npz")))


def image_shape(config) -> tuple[int, int, int]:
    """The shape the network generates (latents for latent configs): no dataset needed to sample."""
    return (int(config.nnet.img_size), int(config.nnet.img_size), int(config.nnet.in_chans))


def sample_to_dir(config, workdir: str) -> str:
    """Generate config.sample.n_samples images into the samples dir, resuming a partial run; returns the dir.
    With sample.prompts set, one image per prompt instead (`sample_prompts`)."""
    if config.sample.prompts:
        return sample_prompts(config, workdir)
    out_dir = config.sample.path or RunDir(workdir).samples
    cond = Conditioning.from_config(config)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    params, source = load_ema_params(config, workdir, mesh)
    decode = None
    if latent.is_latent(config):
        if config.sample.random_params and not os.path.exists(config.autoencoder.pretrained_path or ""):
            logging.warning("sample.random_params without autoencoder weights: writing undecoded latents (timing)")
        else:
            decode = latent.make_decoder(config, mesh)
    texts = data.TextConditions(config, "val") if cond.kind == "text" else None
    label_probs = label_probabilities(config, workdir, cond.real_classes) if cond.kind == "class" else None
    null_context = data.load_empty_context(config.dataset.path) if cond.kind == "text" else None
    batch_sharding = parallel.batch_sharding(mesh)
    batch = parallel.padded_size(config.sample.mini_batch_size)
    n_total = int(config.sample.n_samples)
    n_batches = math.ceil(n_total / batch)
    fn = generate.make_generate_from_config(config, make_apply(config, mesh=mesh), image_shape=image_shape(config),
                                            null_context=null_context)
    gen = generate.jit_generate(fn, batch, mesh)
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
    done = _done_batches(out_dir, n_batches)
    todo = [i for i in range(n_batches) if not done[i]]
    logging.info("Sampling %d images (%s, %d steps) from %s into %s: %d batches of %d, %d already there",
                 n_total, config.sample.algorithm, config.sample.sample_steps, source, out_dir, n_batches, batch,
                 n_batches - len(todo))
    if texts is not None and not hasattr(texts.source, "captions"):
        logging.info("%s keeps no caption texts (official feature folder): recording caption_index only",
                     config.dataset.path)
    t0, made, written = time.time(), 0, 0
    with preemption.stop_guard():
        for i in todo:
            if preemption.should_stop(i):
                logging.info("Preemption requested: stopped after %d batches; run again to resume", made)
                break
            c, records = None, {}
            if cond.kind == "class":
                c = jax.device_put(sample_labels(rng.stream_key(config.seed, rng.LABELS, i), batch, label_probs),
                                   batch_sharding)
                records["labels"] = parallel.gather_to_host(c)
            elif texts is not None:
                records = texts.batch(i, batch)
                c = latent.host_to_global(records.pop("context"), mesh)
            x = gen(params, rng.stream_key(config.seed, rng.SAMPLE, i), c)
            x = parallel.gather_to_host(decode(x) if decode else x)
            count = min(batch, n_total - i * batch)
            if parallel.is_main_process():
                arrays = {"images": images.to_uint8(x[:count]), **{k: v[:count] for k, v in records.items()}}
                files.write_npz(os.path.join(out_dir, f"batch_{i:06d}.npz"), arrays)
                if i == 0:
                    images.save_grid(arrays["images"][:64], os.path.join(out_dir, "grid.png"), 8)
            made, written = made + 1, written + count
            elapsed = time.time() - t0
            logging.info("batch %d/%d  %.1f samples/s  ETA %s", i + 1, n_batches, made * batch / elapsed,
                         console.format_duration((len(todo) - made) * elapsed / made))
    total = sum(min(batch, n_total - i * batch) for i in range(n_batches) if done[i]) + written
    logging.info("Wrote %d samples this run (%d in all of %d) to %s/batch_*.npz; the first 64 are shown in "
                 "%s/grid.png", written, total, n_total, out_dir, out_dir)
    return out_dir


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompts file."""
    if not os.path.exists(path):
        raise console.MissingFileError(f"config.sample.prompts={path} not found (a text file, one prompt a line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"config.sample.prompts: {path} holds no prompt (one a line)")
    return prompts


def sample_prompts(config, workdir: str) -> str:
    """One image per prompt of `sample.prompts`, guided against the same CLIP's encoding of "" (what the
    training null context empty_context.npy is); returns the output dir."""
    prompts = read_prompts(config.sample.prompts)
    out_dir = config.sample.path or RunDir(workdir).prompts
    cond = Conditioning.from_config(config)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    params, source = load_ema_params(config, workdir, mesh)
    encoded = latent.make_text_encoder(config, mesh)(prompts + [""])
    if encoded.shape[1:] != cond.context_shape:
        raise ConfigError(f"config.clip.pretrained_path: {config.clip.pretrained_path} gives contexts "
                          f"{encoded.shape[1:]}, the network takes {cond.context_shape}")
    contexts, null_context = encoded[:-1], encoded[-1]
    decode = latent.make_decoder(config, mesh)
    batch = parallel.padded_size(config.sample.mini_batch_size)
    fn = generate.make_generate_from_config(config, make_apply(config, mesh=mesh), image_shape=image_shape(config),
                                            null_context=null_context)
    gen = generate.jit_generate(fn, batch, mesh)
    logging.info("Sampling %d prompts from %s (%s, %d steps, scale %s)", len(prompts), source,
                 config.sample.algorithm, config.sample.sample_steps, config.sample.scale if config.sample.cfg else 0)
    out = []
    for i in range(math.ceil(len(prompts) / batch)):
        chunk = contexts[i * batch:(i + 1) * batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        # fold 1 after i: keys of their own, never those of the validation-caption batches
        x = gen(params, rng.stream_key(config.seed, rng.SAMPLE, i, 1), latent.host_to_global(padded, mesh))
        out.append(images.to_uint8(parallel.gather_to_host(decode(x))[:len(chunk)]))
    pictures = np.concatenate(out)
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        index = []
        for j, (prompt, picture) in enumerate(zip(prompts, pictures)):
            name = f"prompt_{j:04d}.png"
            files.write_atomic(os.path.join(out_dir, name), lambda tmp, p=picture: Image.fromarray(p).save(tmp))
            index.append({"prompt": prompt, "file": name})
        files.write_json(os.path.join(out_dir, "prompts.json"), index)
        captioned_grid(pictures, prompts, os.path.join(out_dir, "grid.png"))
    logging.info("Wrote %d images (one per prompt of %s) to %s/prompt_*.png; captioned grid %s/grid.png",
                 len(prompts), config.sample.prompts, out_dir, out_dir)
    return out_dir


def captioned_grid(pictures: np.ndarray, captions: list[str], path: str, ncols: int = 4, lines: int = 4) -> None:
    """uint8 NHWC RGB images in a grid, each with its caption (wrapped, at most `lines` lines) below it."""
    n, h, w, _ = pictures.shape
    ncols = min(ncols, n)
    cell_w, line_h = max(w, 160), 12
    cell_h = h + lines * line_h + 6
    grid = Image.new("RGB", (ncols * cell_w, math.ceil(n / ncols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for j, (picture, caption) in enumerate(zip(pictures, captions)):
        r, c = divmod(j, ncols)
        x0, y0 = c * cell_w, r * cell_h
        grid.paste(Image.fromarray(picture), (x0 + (cell_w - w) // 2, y0))
        wrapped = textwrap.wrap(caption, width=max(8, cell_w // 6))
        for k, line in enumerate(wrapped[:lines]):
            more = k == lines - 1 and len(wrapped) > lines
            draw.text((x0 + 2, y0 + h + 2 + k * line_h), line + (" ..." if more else ""), fill="black")
    files.write_atomic(path, grid.save)


def sample_labels(key, n: int, probs: np.ndarray):
    """n class labels drawn with probabilities `probs` (one per real class)."""
    return jax.random.choice(key, len(probs), (n,), p=jnp.asarray(probs)).astype(jnp.int32)


def label_probabilities(config, workdir: str, num_classes: int) -> np.ndarray:
    """How sample labels are drawn (`sample.label_distribution`): "uniform" over the real classes (the official
    latent ImageNet evaluation), or "dataset": the training set's class frequencies, as the official ImageNet-64
    evaluation draws them; read once from the labels (images are not decoded) and cached in WORKDIR/eval/."""
    if config.sample.label_distribution == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    cache = RunDir(workdir).class_frequencies_cache(config.dataset.name)
    if os.path.exists(cache):
        return np.load(cache)
    logging.info("Reading the class frequencies of %s (once; cached in %s)", config.dataset.name, cache)
    probs = data.open_source(config.dataset).class_frequencies()
    if parallel.is_main_process():
        files.write_atomic(cache, lambda tmp: np.save(tmp, probs))
    return probs


def _done_batches(out_dir: str, n_batches: int) -> np.ndarray:
    """Which batch files exist, decided on process 0 and shared, so every host runs the same batches."""
    done = np.array([os.path.exists(os.path.join(out_dir, f"batch_{i:06d}.npz")) for i in range(n_batches)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return done
