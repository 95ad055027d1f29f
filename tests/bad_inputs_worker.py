"""Runs main.py's entry (parse_flags + main) in this one process for each bad input of test_bad_inputs.py, so that
JAX is imported once for all of them; writes one JSON row per case.

    python tests/bad_inputs_worker.py REPO_ROOT CASES.json OUT.json

Each case: {"id", "args" (main.py's flags; {W} = its workdir, {IN} = its input folder), "setup" (files to create:
"prompts_latin1", "prompts_dir", "config_syntax", "config_no_get_config", "config_raises", "input_dir",
"steps_5_10"), "raise" (an error the run raises instead of running: "ENOSPC", "NonFiniteLossError")}.
Row: {"id", "rc", "error_lines", "traceback", "seconds", "written" (paths created under the case's folder)}.
"""
import contextlib
import errno
import io
import json
import os
import sys
import time
import traceback

root, cases_path, out_path = sys.argv[1:4]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, root)
os.chdir(root)
sys.argv = ["main.py"]

import main as entry  # noqa: E402
from absl import flags  # noqa: E402

SETUP = {
    "prompts_latin1": lambda d: open(os.path.join(d, "prompts.txt"), "wb").write("café\n".encode("latin-1")),
    "prompts_dir": lambda d: os.mkdir(os.path.join(d, "prompts.txt")),
    "config_syntax": lambda d: open(os.path.join(d, "c.py"), "w").write("def get_config(:\n"),
    "config_no_get_config": lambda d: open(os.path.join(d, "c.py"), "w").write("X = 1\n"),
    "config_raises": lambda d: open(os.path.join(d, "c.py"), "w").write(
        "def get_config():\n    raise RuntimeError('boom')\n"),
    "input_dir": lambda d: os.mkdir(os.path.join(d, "converted")),
    "steps_5_10": lambda d: [os.makedirs(os.path.join(d, "w", "checkpoints", s)) for s in ("5", "10")],
}


def _raiser(kind):
    def run_mode(mode, config, workdir):
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(workdir, "samples", "batch_000001.npz"))
        from uvit_jax.train import NonFiniteLossError
        raise NonFiniteLossError("non-finite loss or parameters at step 3; stopped without saving. The newest "
                                 "checkpoint is step 2 in W/checkpoints. Lower optimizer.lr or use dtype=float32")
    return run_mode


def _tree(folder):
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        out.update(os.path.relpath(os.path.join(dirpath, n), folder) for n in dirnames + filenames)
    return out


def run(case, folder):
    os.makedirs(os.path.join(folder, "in"))
    if case.get("setup"):
        SETUP[case["setup"]](os.path.join(folder, "in") if case["setup"] != "steps_5_10" else folder)
    before = _tree(folder)
    args = [a.replace("{W}", os.path.join(folder, "w")).replace("{IN}", os.path.join(folder, "in"))
            for a in case["args"]]
    run_mode = entry._run_mode
    if case.get("raise"):
        entry._run_mode = _raiser(case["raise"])
    err, rc, tb = io.StringIO(), 0, False
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            try:
                flags.FLAGS.unparse_flags()
                sys.argv = ["main.py", *args]  # config_flags finds the --config.* overrides in sys.argv
                entry.parse_flags(sys.argv)
                entry.main(["main.py"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - what the person would see: a traceback
                traceback.print_exc()
                rc, tb = 1, True
    finally:
        entry._run_mode = run_mode
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # overrides are defined as they are parsed
            delattr(flags.FLAGS, name)
    text = err.getvalue()
    return {"id": case["id"], "rc": rc, "traceback": tb or "Traceback" in text, "seconds": time.perf_counter() - start,
            "error_lines": sum(line.startswith("error:") for line in text.splitlines()),
            "written": sorted(_tree(folder) - before), "stderr": text[-1500:]}


cases = json.load(open(cases_path))
base = os.path.dirname(os.path.abspath(out_path))
rows = [run(case, os.path.join(base, f"case_{i:03d}")) for i, case in enumerate(cases)]
json.dump(rows, open(out_path, "w"), indent=1)
