"""uvit-jax entry point.

    python main.py --config configs/quickstart.py --workdir runs/quickstart             # train (resumes)
    python main.py --config configs/X.py --workdir W --mode sample                       # W/samples/*.npz + grid
    python main.py --config configs/X.py --workdir W --mode eval                         # W/eval/*.json
    python main.py --config configs/X.py --workdir W --mode benchmark                    # images/s, TFLOP/s, MFU
    python main.py --config configs/X.py --workdir W --mode convert --convert_input nnet_ema.pth

Any config value can be overridden: --config.train.batch_size=256. Unknown keys stop at flag parsing.
Launched as several processes (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or the flags below, or
UVIT_DISTRIBUTED=1 on TPU pods and SLURM), it initialises jax.distributed first; a single process needs nothing.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, grids, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "benchmark", "convert", "extract"],
                          "What to do.")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
_PID = flags.DEFINE_integer("process_id", None, "jax.distributed index of this process.")
_CONVERT_INPUT = flags.DEFINE_string("convert_input", None, "--mode convert: official nnet(_ema).pth or .npz.")
_BENCH_STEPS = flags.DEFINE_integer("benchmark_steps", 10, "--mode benchmark: timed steps after warm-up.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl parsing, with a one-line message for a bad --config.* override (instead of a traceback)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        overrides = [a for a in argv if a.startswith("--config.")]
        raise SystemExit(f"error: bad config override among {overrides}: {type(e).__name__}: {e} "
                         f"(unknown key or wrong type; uvit_jax/config.py lists every key)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from uvit_jax import parallel
    from uvit_jax.config import validate

    parallel.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
    validate(config, jax.device_count())
    logging.info("mode=%s workdir=%s process %d/%d, %d devices (%s)", mode, workdir, jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)

    if mode == "train":
        from uvit_jax import train
        callback = None
        if config.train.fid_interval and config.eval.inception_path:
            from uvit_jax import sample
            callback = sample.make_training_fid_callback(config, workdir)
        train.train_and_evaluate(config, workdir, eval_callback=callback)
    elif mode == "sample":
        from uvit_jax import sample
        sample.sample_to_dir(config, workdir)
    elif mode == "eval":
        from uvit_jax import sample
        sample.evaluate_workdir(config, workdir)
    elif mode == "benchmark":
        from uvit_jax import benchmark
        benchmark.run(config, workdir, steps=_BENCH_STEPS.value)
    elif mode == "convert":
        from uvit_jax import convert
        if not _CONVERT_INPUT.value:
            raise app.UsageError("--mode convert needs --convert_input=PATH (official nnet_ema.pth or .npz)")
        nnet, out = dict(config.nnet), os.path.join(workdir, "converted")
        convert.save_converted(out, convert.params_from_official(convert.load_state_dict(_CONVERT_INPUT.value), nnet),
                               nnet)
        logging.info("Converted %s -> %s (use --config.sample.params_dir=%s)", _CONVERT_INPUT.value, out, out)
    else:  # extract
        raise app.UsageError("--mode extract (latent feature extraction) needs the KL-f8 autoencoder port, which is "
                             "not in this release; use the official scripts/extract_imagenet_feature.py output.")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
