"""The run directory: the one module that spells a run's paths, and the best-FID record it keeps."""
import io
import json
import os
import re
import tokenize

from uvit_jax import files
from uvit_jax.rundir import BestRecord, RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ("eval" is also a mode name, so it is not in the list; dict keys such as metrics["samples"] are not paths.)
RUN_NAMES = {"checkpoints", "samples", "prompts", "grids", "converted", "features", "best.json",
             "benchmark.json", ".lock", "nnet_ema.pth", "config_history.jsonl"}


def _sources():
    yield os.path.join(ROOT, "main.py")
    for folder, _, names in os.walk(os.path.join(ROOT, "uvit_jax")):
        yield from (os.path.join(folder, n) for n in names if n.endswith(".py"))


def test_run_paths_are_spelled_only_in_rundir():
    """No module but rundir.py names a file or folder of the run, or joins a path onto the workdir."""
    offenders = []
    for path in _sources():
        if path.endswith(os.path.join("uvit_jax", "rundir.py")):
            continue
        source = open(path).read()
        previous = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if (tok.type == tokenize.STRING and tok.string.strip("\"'") in RUN_NAMES
                    and not (previous is not None and previous.string == "[")):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{tok.start[0]} {tok.string}")
            previous = tok
        for m in re.finditer(r"os\.path\.join\(\s*workdir|Path\(workdir\)\s*/|f\"\{workdir\}/", source):
            offenders.append(f"{os.path.relpath(path, ROOT)}:{source[:m.start()].count(chr(10)) + 1} {m.group()}")
    assert not offenders, offenders


def test_best_is_the_lowest_recorded_fid_among_the_steps_on_disk(tmp_path):
    run = RunDir(tmp_path)
    files.write_json(run.best_record, {"step": 99, "fid": 0.0})  # stale: no record, no step 99
    record = BestRecord(run, writer=True)
    assert record.best([10, 20]) is None and not os.path.exists(run.best_record)
    for step, fid in ((10, 5.0), (20, 2.0), (30, 3.0)):
        record.add(step, {"fid": fid})
    assert record.best([10, 20, 30]) == {"step": 20, "fid": 2.0}
    assert json.load(open(run.best_record)) == {"step": 20, "fid": 2.0}
    assert json.load(open(run.fid_record(30)))["step"] == 30
    # Step 20 set aside (not on disk): the best is among the others; a record of an unfinished write is skipped.
    assert run.best([10, 30]) == {"step": 30, "fid": 3.0}
    with open(os.path.join(run.eval, "fid_40.json"), "w") as f:
        f.write('{"fid": 0.')
    assert run.best([10, 20, 30, 40]) == {"step": 20, "fid": 2.0}
    # Step 20 saved again: its old FID no longer describes it, on disk or in a record read afterwards.
    record.saved(20)
    assert record.best([10, 20, 30]) == {"step": 30, "fid": 3.0}
    assert json.load(open(run.best_record)) == {"step": 30, "fid": 3.0}
    assert BestRecord(run, writer=False).best([10, 20, 30]) == {"step": 30, "fid": 3.0}
    # A process that does not write keeps the same record in memory and writes nothing.
    reader = BestRecord(run, writer=False)
    reader.add(50, {"fid": 1.0})
    assert reader.best([30, 50]) == {"step": 50, "fid": 1.0} and not os.path.exists(run.fid_record(50))
