"""Sample mode: `n_samples` images from the EMA params of a run (or a converted official checkpoint) into files.

Writes `SAMPLES/batch_XXXXXX.npz` (uint8 NHWC under `images`; class labels under `labels` for class models; for
text models the validation caption each sample was drawn for, `captions` (str, when the feature folder keeps the
texts) and `caption_index` (image, caption k) in the val split), `SAMPLES/samples.json` (the record: the settings
that produced the files and each finished file's image count and size; eval mode reads the files it lists and
nothing else) and `SAMPLES/grid.png` (the first `sample.grid_size` samples). Images come from
`generate.Sampler` (decoded for latent configs), so eval mode reads the same files for every config. Batch i draws
its noise and its labels / captions from (seed, stream, i), and each file is written atomically, so a preempted
50k job that is started again writes only the missing files and ends with exactly n_samples, none duplicated, on
any device count; a rerun with other settings (checkpoint, seed, n_samples, batch, sampler) is refused.

With `sample.prompts=FILE` (text models): one image per line of FILE, the prompts CLIP-encoded here with
`clip.pretrained_path`, into `PROMPTS/prompt_XXXX.png`, `PROMPTS/prompts.json` and a captioned `PROMPTS/grid.png`
(PROMPTS = sample.path or WORKDIR/prompts).
"""
from __future__ import annotations

import glob
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from PIL import Image

from uvit_jax import checkpoint, console, files, generate, images, latent, models, parallel, preemption, rng
from uvit_jax.conditioning import Conditioning
from uvit_jax.config import ConfigError
from uvit_jax.rundir import RunDir


class NoParamsError(FileNotFoundError):
    """Nothing to sample from: no checkpoint in the workdir and no converted params dir."""


def abstract_params_on_mesh(config, mesh):
    """The network's params as ShapeDtypeStructs with this mesh's (FSDP) shardings: a restore target."""
    abstract = models.abstract_params(dict(config.nnet))
    return parallel.with_shardings(abstract, parallel.tree_param_shardings(abstract, mesh))


def load_ema_params(config, workdir: str, mesh) -> tuple[dict, str]:
    """EMA params from `config.sample.params_dir` (a converted official checkpoint) or WORKDIR's newest checkpoint.

    Returns (params, where they came from: "checkpoint step S", "converted params DIR" or "freshly
    initialised params (sample.random_params)"; recorded with the samples). Reads only: nothing is created in a
    wrong workdir.
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
    logging.info("EMA params of step %d (%s) in %s", step, why, directory)
    return params, f"checkpoint step {step}"


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


RECORD = "samples.json"


class SampleRecordError(ConfigError):
    """The samples directory holds samples of other settings, or a file its record lists is damaged."""


def read_record(out_dir: str) -> dict | None:
    """SAMPLES/samples.json: the settings that produced the files, the images per file (`batch`) and, per
    finished file, its image count and byte size; None when there is none."""
    path = os.path.join(out_dir, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SampleRecordError(f"{path} is unreadable ({e}): move {out_dir} away and sample again") from e


def sample_files(out_dir: str) -> list[str]:
    """The finished sample files of a sample run, in order, as its record lists them (never a glob: temporaries
    and strays are not samples)."""
    record = read_record(out_dir)
    return [os.path.join(out_dir, name) for name in sorted(record["files"])] if record else []


def _settings(config, source: str) -> dict:
    """What decides the images of a sample run: a rerun with other values would mix two sets of samples."""
    return {"params": source, "seed": int(config.seed), "n_samples": int(config.sample.n_samples),
            "mini_batch_size": int(config.sample.mini_batch_size), "sampler": generate.sampler_settings(config),
            "label_distribution": config.sample.label_distribution}


_SETTING_KEYS = {"params": "sample.step / sample.params_dir", "seed": "seed", "n_samples": "sample.n_samples",
                 "mini_batch_size": "sample.mini_batch_size", "sampler": "the sampler (sample.*)",
                 "label_distribution": "sample.label_distribution"}


def _file_name(i: int) -> str:
    return f"batch_{i:06d}.npz"


def _finished(out_dir: str, record: dict, n_batches: int) -> np.ndarray:
    """Which batch files are finished: listed in the record with the size they were written with."""
    def ok(i):
        entry = record["files"].get(_file_name(i))
        path = os.path.join(out_dir, _file_name(i))
        return entry is not None and os.path.isfile(path) and os.path.getsize(path) == entry["bytes"]
    return np.array([ok(i) for i in range(n_batches)])


def _resume_plan(config, out_dir: str, settings: dict) -> tuple[dict, str | None]:
    """The record this run continues (or starts), and why it cannot (None when it can). Process 0 only."""
    rows = generate.batch_size(config, config.sample.n_samples)
    fresh = {"settings": settings, "batch": rows, "device_count": jax.device_count(), "files": {}}
    record = read_record(out_dir)
    if record is None:
        strays = glob.glob(os.path.join(out_dir, "batch_*.npz"))
        if strays:
            return fresh, (f"{out_dir} holds {len(strays)} batch_*.npz files but no {RECORD}: they were not "
                           "written by this version's sample mode")
        return fresh, None
    changed = [f"{_SETTING_KEYS[k]}: {record['settings'].get(k)!r} -> {v!r}"
               for k, v in settings.items() if record["settings"].get(k) != v]
    if changed:
        return fresh, f"{out_dir} holds samples of other settings ({'; '.join(changed)})"
    return record, None


def _from_process_0(x: np.ndarray) -> np.ndarray:
    """Process 0's value of x on every process (what process 0 decided about the files)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _set_aside(out_dir: str) -> str:
    """Rename out_dir to the first free OUT_DIR.old-<n>; returns the new name."""
    n = 1
    while os.path.exists(f"{out_dir}.old-{n}"):
        n += 1
    os.rename(out_dir, f"{out_dir}.old-{n}")
    return f"{out_dir}.old-{n}"


def sample_to_dir(config, workdir: str) -> str:
    """Generate config.sample.n_samples images into the samples dir, resuming a partial run; returns the dir.
    With sample.prompts set, one image per prompt instead (`sample_prompts`).

    The directory's record (samples.json) says which settings produced it; a rerun with others is refused (or,
    with sample.restart, the old directory is set aside as SAMPLES.old-<n>). Files are `batch` images each (the
    recorded batch, also when the device count changed since), so the directory always ends with n_samples."""
    if config.sample.prompts:
        return sample_prompts(config, workdir)
    out_dir = config.sample.path or RunDir(workdir).samples
    cond = Conditioning.from_config(config)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    params, source = load_ema_params(config, workdir, mesh)
    settings = _settings(config, source)
    record, refusal = _resume_plan(config, out_dir, settings) if parallel.is_main_process() else ({}, None)
    refused = bool(_from_process_0(np.array(refusal is not None)))
    if refused and not config.sample.restart:
        raise SampleRecordError((refusal or "process 0 refused the samples directory") +
                                ": sample into another --config.sample.path, or pass --config.sample.restart=true "
                                "to set the old samples aside and start again")
    if parallel.is_main_process():
        if refused:
            logging.warning("%s; set aside as %s", refusal, _set_aside(out_dir))
        os.makedirs(out_dir, exist_ok=True)
        for path in files.remove_dead_leftovers(out_dir):
            logging.info("Removed %s, left by an interrupted write", path)
    n_total = int(config.sample.n_samples)
    rows = int(_from_process_0(np.array(record.get("batch", 0))))
    n_batches = -(-n_total // rows)
    done = _from_process_0(_finished(out_dir, record, n_batches) if parallel.is_main_process()
                           else np.zeros(n_batches, bool))
    if parallel.is_main_process() and record["device_count"] != jax.device_count() and not all(done):
        logging.info("%s was started on %d devices: its batches stay %d images (%d per device here)", out_dir,
                     record["device_count"], rows, parallel.padded_size(rows) // jax.device_count())
    decode = True
    if latent.is_latent(config) and config.sample.random_params and \
            not os.path.exists(config.autoencoder.pretrained_path or ""):
        logging.warning("sample.random_params without autoencoder weights: writing undecoded latents (timing)")
        decode = False
    label_probs = (generate.label_probabilities(config, workdir, cond.real_classes) if cond.kind == "class"
                   else None)
    sampler = generate.Sampler(config, mesh, rows, decode=decode, label_probs=label_probs)
    todo = [i for i in range(n_batches) if not done[i]]
    logging.info("Sampling %d images (%s, %d steps) from %s into %s: %d batches of %d, %d already there",
                 n_total, config.sample.algorithm, config.sample.sample_steps, source, out_dir, n_batches, rows,
                 n_batches - len(todo))
    if sampler.texts is not None and not hasattr(sampler.texts.source, "captions"):
        logging.info("%s keeps no caption texts (official feature folder): recording caption_index only",
                     config.dataset.path)
    t0, made, written = time.time(), 0, 0
    with preemption.stop_guard():
        draws = sampler.batches(params, n_total, lambda i: rng.stream_key(config.seed, rng.SAMPLE, i),
                                label_key=lambda i: rng.stream_key(config.seed, rng.LABELS, i), indices=todo)
        for i, x, records in draws:
            if parallel.is_main_process():
                path = os.path.join(out_dir, _file_name(i))
                files.write_npz(path, {"images": x, **records})
                record["files"][_file_name(i)] = {"images": len(x), "bytes": os.path.getsize(path)}
                files.write_json(os.path.join(out_dir, RECORD), record)
            made, written = made + 1, written + len(x)
            elapsed = time.time() - t0
            logging.info("batch %d/%d  %.1f samples/s  ETA %s", i + 1, n_batches, written / elapsed,
                         console.format_duration((len(todo) - made) * elapsed / made))
            if preemption.should_stop(made) and made < len(todo):
                logging.info("Preemption requested: stopped after %d batches; run again to resume", made)
                break
    if parallel.is_main_process():
        total = sum(entry["images"] for entry in record["files"].values())
        grid = _save_sample_grid(out_dir, record, int(config.sample.grid_size))
        logging.info("Wrote %d samples this run; %s holds %d of %d (%s); the first %d are shown in %s", written,
                     out_dir, total, n_total, "complete" if total == n_total else "run again to finish", grid,
                     os.path.join(out_dir, "grid.png"))
    return out_dir


def _save_sample_grid(out_dir: str, record: dict, n: int) -> int:
    """SAMPLES/grid.png: the first n samples (from the first files, in order); returns how many it shows."""
    shown, count = [], 0
    for i in range(len(record["files"])):
        name = _file_name(i)
        if name not in record["files"] or count >= n:
            break
        with np.load(os.path.join(out_dir, name)) as f:
            shown.append(f["images"][:n - count])
        count += len(shown[-1])
    if shown:
        images.save_grid(np.concatenate(shown), os.path.join(out_dir, "grid.png"), int(math.ceil(math.sqrt(count))))
    return count


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
    sampler = generate.Sampler(config, mesh, generate.batch_size(config, len(prompts)), contexts=encoded[:-1],
                               null_context=encoded[-1])
    logging.info("Sampling %d prompts from %s (%s, %d steps, scale %s)", len(prompts), source,
                 config.sample.algorithm, config.sample.sample_steps, config.sample.scale if config.sample.cfg else 0)
    # fold 1 after i: keys of their own, never those of the validation-caption batches
    pictures = np.concatenate([x for _, x, _ in sampler.batches(
        params, len(prompts), lambda i: rng.stream_key(config.seed, rng.SAMPLE, i, 1))])
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        for path in files.remove_dead_leftovers(out_dir):
            logging.info("Removed %s, left by an interrupted write", path)
        index = []
        for j, (prompt, picture) in enumerate(zip(prompts, pictures)):
            name = f"prompt_{j:04d}.png"
            files.write_atomic(os.path.join(out_dir, name), lambda tmp, p=picture: Image.fromarray(p).save(tmp))
            index.append({"prompt": prompt, "file": name})
        files.write_json(os.path.join(out_dir, "prompts.json"), index)
        for j in images.captioned_grid(pictures, prompts, os.path.join(out_dir, "grid.png")):
            logging.info("Prompt %d is cut to fit the grid; prompts.json has it whole: %s", j, prompts[j])
    logging.info("Wrote %d images (one per prompt of %s) to %s/prompt_*.png; captioned grid %s/grid.png",
                 len(prompts), config.sample.prompts, out_dir, out_dir)
    return out_dir
