"""uvit-jax entry point.

    python main.py --config configs/quickstart.py --workdir runs/quickstart             # train (resumes)
    python main.py --config configs/X.py --workdir W --mode sample                       # W/samples/*.npz + grid
    python main.py --config configs/X.py --workdir W --mode eval                         # W/eval/metrics_*.json
    python main.py --config configs/X.py --workdir W --mode benchmark                    # W/benchmark.json
    python main.py --config configs/X.py --workdir W --mode convert --convert_input nnet_ema.pth   # W/converted/
    python main.py --config configs/X.py --workdir W --mode extract                      # latent features

Any config value can be overridden: --config.train.batch_size=256. Unknown keys and invalid values stop before
JAX starts, in one line. SIGTERM or Ctrl-C saves at the next step and exits 0 (during start-up it exits at once,
with a line; a second Ctrl-C exits at once without saving). Launched as several processes (JAX_COORDINATOR_ADDRESS
/ JAX_NUM_PROCESSES / JAX_PROCESS_ID, or the flags below, or UVIT_DISTRIBUTED=1 on TPU pods and SLURM), it
initialises jax.distributed first; a single process needs nothing.
"""
import ast
import errno
import os
import sys
import traceback

from uvit_jax import host_malloc, tpu_env

host_malloc.tune_for_xla_cpu()  # before any thread starts (a thread keeps its malloc arena): see the module

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tpu_env.quiet_libtpu_off_tpu()  # libtpu installed on a machine without a TPU: no start-up warnings
# TensorFlow only decodes images and writes TensorBoard here; with its oneDNN ops on it prints a notice at import
# that TF_CPP_MIN_LOG_LEVEL does not silence.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, grids, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "benchmark", "convert", "extract"],
                          "What to do.")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
_PID = flags.DEFINE_integer("process_id", None, "jax.distributed index of this process.")
_CONVERT_INPUT = flags.DEFINE_string(
    "convert_input", None, "--mode convert: the official nnet(_ema).pth (or .npz) to convert; with "
    "--convert_to_official, a converted dir to turn back into a .pth.")
_CONVERT_OUTPUT = flags.DEFINE_string("convert_output", None, "--mode convert: output (default WORKDIR/converted, "
                                      "or WORKDIR/nnet_ema.pth with --convert_to_official).")
_TO_OFFICIAL = flags.DEFINE_bool("convert_to_official", False, "--mode convert: our converted dir -> official .pth.")
_BENCH_STEPS = flags.DEFINE_integer("benchmark_steps", 10, "--mode benchmark: timed steps after warm-up.",
                                    lower_bound=1)
_BENCH_COMPILE_ONLY = flags.DEFINE_bool("benchmark_compile_only", False, "--mode benchmark: compile the train step "
                                        "without running it; report XLA's memory and FLOP estimates.")
_BENCH_TOPOLOGY = flags.DEFINE_string(
    "benchmark_topology", None, "--mode benchmark --benchmark_compile_only: compile for this Cloud TPU topology "
    "instead (e.g. v5e:2x4, v5e:16x16, v5p:2x2x2; needs libtpu, no TPU): per-chip memory against HBM, collectives.")
_BENCH_SLICES = flags.DEFINE_integer("benchmark_slices", 1, "--benchmark_topology: how many such slices (over DCN).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl parsing, with a one-line message for a bad flag, config file or --config.* override (instead of a
    traceback)."""
    from uvit_jax import console
    path = _config_path(argv)
    problem = _config_file_problem(path) if path else None
    if problem:
        console.user_error(problem)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        console.user_error(f"{e} (pass --helpfull to see the flags)")
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised
        in_file = [f for f in traceback.extract_tb(e.__traceback__)
                   if path and os.path.abspath(f.filename) == os.path.abspath(path)]
        if in_file:
            console.user_error(f"--config {path}: get_config() failed at line {in_file[-1].lineno}: "
                               f"{type(e).__name__}: {' '.join(str(e).split())}")
        if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
            raise
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        try:  # ml_collections raises with the repr of its message ('\'key\'\nDid you mean ...')
            detail = ast.literal_eval(detail)
        except (ValueError, SyntaxError):
            pass
        detail = " ".join(str(detail).split())
        console.user_error(f"bad config override among {', '.join(overrides)}: {type(e).__name__} {detail} "
                           "(uvit_jax/config.py lists every key)")


def _config_path(argv) -> str | None:
    """The --config file named in `argv` (without config_flags' ":argument" suffix)."""
    path = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1]
    return path.split(":")[0] if path else None


def _config_file_problem(path: str) -> str | None:
    """What keeps `path` from being a config file, found without running it; None if nothing does."""
    example = "give a config file such as configs/quickstart.py"
    if not os.path.exists(path):
        return f"--config {path}: no such file; {example}"
    if os.path.isdir(path):
        return f"--config {path} is a directory; {example}"
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as e:
        return f"--config {path}:{e.lineno}: {e.msg}; fix the file"
    except (OSError, ValueError) as e:
        return f"--config {path}: cannot be read ({e}); {example}"
    if not any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
        return f"--config {path} defines no get_config() (a config file returns its ConfigDict from get_config())"
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from uvit_jax import console
    from uvit_jax.config import ConfigError, validate

    config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
    console.setup(flags.FLAGS.verbosity)
    try:
        validate(config, workdir=workdir)  # before JAX starts: a bad config costs under a second
    except ConfigError as e:
        console.user_error(str(e))
    if mode == "convert" and _CONVERT_INPUT.value and not _TO_OFFICIAL.value and os.path.isdir(_CONVERT_INPUT.value):
        console.user_error(f"--convert_input {_CONVERT_INPUT.value} is a directory: give the official nnet_ema.pth "
                           "(or .npz) file; a converted directory goes back to a .pth with --convert_to_official")
    errors = _user_errors()
    if flags.FLAGS.verbosity < 1:
        console.quiet_orbax_logging()
    from uvit_jax import preemption
    preemption.exit_on_stop_signals()  # until a loop takes over: a stop signal ends start-up in one line
    try:
        import jax
        from uvit_jax import parallel

        parallel.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
        console.setup(flags.FLAGS.verbosity, main_process=parallel.is_main_process())
        parallel.check_device_count(config.mesh.expect_devices)
        if not _BENCH_TOPOLOGY.value:  # a topology's mesh is checked against its own device count
            validate(config, jax.device_count())
        logging.info("uvit-jax %s: workdir %s, %d devices (%s) in %d process(es)", mode, workdir,
                     jax.device_count(), jax.devices()[0].device_kind, jax.process_count())
        _run_mode(mode, config, workdir)
    except errors as e:
        _stop(str(e), 2)
    except _failures() as e:  # the run stopped on something the user can fix; finished work is kept
        _stop(str(e), 1)
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            _stop_multi_process()
            raise
        _stop(f"{e.filename or 'a file'}: {e.strerror} ({errno.errorcode[e.errno]}); free space or fix the "
              "permissions, then run the same command again (finished work is kept)", 1)
    except Exception:
        _stop_multi_process()
        raise


def _stop(message: str, code: int) -> "NoReturn":  # noqa: F821
    """One `error:` line and exit. In a multi-process run every process meets its own line at the same agreement
    point (uvit_jax/agreement.py) and leaves at once: JAX's shutdown barrier would wait for those already gone."""
    from uvit_jax import console
    import jax
    if jax.distributed.is_initialized():
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        os._exit(code)
    console.user_error(message.replace("\n", " "), code)


def _stop_multi_process() -> None:
    """An unexpected error in a multi-process run: its traceback, then exit at once (see `_stop`)."""
    import jax
    if jax.distributed.is_initialized():
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _run_mode(mode, config, workdir):
    from uvit_jax import latent
    latent.check_weights(config, mode)  # a missing weights file is news before a restore or a data listing
    if mode == "train":
        from uvit_jax import train
        callback = None
        if config.train.fid_interval:
            from uvit_jax import eval_mode
            problem = eval_mode.reference_stats_problem(config)
            if problem:  # training itself needs no statistics: train without FID rather than not at all
                logging.warning("train.fid_interval=%d but FID during training is off: %s",
                                config.train.fid_interval, problem)
            elif config.eval.inception_path or config.eval.feature_fn:
                callback = eval_mode.make_training_fid_callback(config, workdir)
            else:
                logging.warning("train.fid_interval=%d but no feature network: FID during training is off (%s)",
                                config.train.fid_interval, eval_mode.INCEPTION_HELP)
        train.train_and_evaluate(config, workdir, eval_callback=callback)
    elif mode == "sample":
        from uvit_jax import sample
        sample.sample_to_dir(config, workdir)
    elif mode == "eval":
        from uvit_jax import eval_mode
        eval_mode.evaluate_workdir(config, workdir)
    elif mode == "benchmark":
        if _BENCH_TOPOLOGY.value:
            from uvit_jax import tpu_plan
            tpu_plan.run(config, workdir, _BENCH_TOPOLOGY.value, _BENCH_SLICES.value)
            return
        from uvit_jax import benchmark
        benchmark.run(config, workdir, steps=_BENCH_STEPS.value, compile_only=_BENCH_COMPILE_ONLY.value)
    elif mode == "extract":
        from uvit_jax import extract
        extract.run(config, workdir)
    else:
        _convert(config, workdir)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (refused pickle, missing or mis-shaped key): the message says which."""


def _convert(config, workdir):
    try:
        _convert_files(config, workdir)
    except (ValueError, KeyError) as e:  # the converters' strict checks and the pickle guard name the problem
        raise ConversionError(str(e).strip("'\"")) from e


def _convert_files(config, workdir):
    from uvit_jax import convert
    from uvit_jax.rundir import RunDir
    if not _CONVERT_INPUT.value:
        raise app.UsageError("--mode convert needs --convert_input=PATH (official nnet_ema.pth or .npz, or a "
                             "converted dir with --convert_to_official)")
    nnet = dict(config.nnet)
    if _TO_OFFICIAL.value:
        out = _CONVERT_OUTPUT.value or RunDir(workdir).official_params
        saved_nnet, params = convert.load_converted(_CONVERT_INPUT.value)
        convert.save_torch_file(convert.params_to_official(params), out)
        logging.info("Converted %s (%s) -> %s (official state dict; load with nnet.load_state_dict(torch.load(...)))",
                     _CONVERT_INPUT.value, saved_nnet.get("name"), out)
        return
    out = _CONVERT_OUTPUT.value or RunDir(workdir).converted
    convert.save_converted(out, convert.params_from_official(convert.load_state_dict(_CONVERT_INPUT.value), nnet),
                           nnet)
    logging.info("Converted %s -> %s; sample from it with --mode sample --config.sample.params_dir=%s",
                 _CONVERT_INPUT.value, out, out)


# Storage errors a person fixes (a full disk, a quota, a read-only or forbidden path), whatever writes the file.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _failures() -> tuple:
    """Exceptions that end a run that went wrong (not a usage mistake): one line, exit code 1."""
    from uvit_jax.agreement import PeerFailedError
    from uvit_jax.train import NonFiniteLossError
    return (NonFiniteLossError, PeerFailedError)


def _user_errors() -> tuple:
    """Exceptions that mean "the user can fix this": printed as one line, no traceback. A FileNotFoundError is one
    only when raised for user input (console.MissingFileError): any other is a bug and keeps its traceback."""
    from uvit_jax import checkpoint, console, parallel, workdir_lock
    from uvit_jax.config import ConfigError
    from uvit_jax.data.datasets import DatasetNotPreparedError
    from uvit_jax.eval_mode import MissingFeatureNetworkError
    from uvit_jax.sample import NoParamsError
    from uvit_jax.tpu_plan import TopologyError
    return (ConversionError, TopologyError, ConfigError, parallel.DeviceCountError, DatasetNotPreparedError,
            MissingFeatureNetworkError, NoParamsError,
            workdir_lock.WorkdirLockedError, checkpoint.CheckpointMismatchError, checkpoint.CheckpointCorruptError,
            checkpoint.CheckpointIdentityError, console.UserError)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
