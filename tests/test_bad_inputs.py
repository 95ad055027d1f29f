"""Every bad input in one line, before anything is written: a table of (input -> exit code, `error:` lines, files
written), run through main.py's entry in one worker process (tests/bad_inputs_worker.py) so JAX starts once."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

TINY = ["--config", "configs/test_tiny.py", "--workdir", "{W}"]
COCO = ["--config", "configs/mscoco_uvit_s2.py", "--workdir", "{W}"]


def _case(id, *args, setup=None, raise_=None, rc=2, needs=()):
    return pytest.param(dict(id=id, args=list(args), setup=setup, **({"raise": raise_} if raise_ else {})), rc,
                        needs, id=id)


# (case, exit code, fragments the one error line must hold)
CASES = [
    _case("sample.scale=inf", *TINY, "--config.sample.scale=inf", needs=("config.sample.scale", "finite")),
    _case("sample.scale=nan", *TINY, "--config.sample.scale=nan", needs=("config.sample.scale",)),
    _case("sample.mini_batch_size=-8", *TINY, "--config.sample.mini_batch_size=-8",
          needs=("config.sample.mini_batch_size", "positive")),
    _case("sample.mini_batch_size=0", *TINY, "--config.sample.mini_batch_size=0",
          needs=("config.sample.mini_batch_size",)),
    _case("sample.mini_batch_size=1e8", *TINY, "--config.sample.mini_batch_size=100000000",
          needs=("config.sample.mini_batch_size", "at most")),
    _case("sample.n_samples=0", *TINY, "--config.sample.n_samples=0", needs=("config.sample.n_samples",)),
    _case("sample.n_samples=-5", *TINY, "--config.sample.n_samples=-5", needs=("config.sample.n_samples",)),
    _case("sample.n_samples=1e11", *TINY, "--config.sample.n_samples=100000000000",
          needs=("config.sample.n_samples", "at most")),
    _case("train.batch_size=1e8", *TINY, "--config.train.batch_size=100000000",
          needs=("config.train.batch_size", "at most")),
    _case("train.fid_n_samples=0", *TINY, "--config.train.fid_n_samples=0", needs=("config.train.fid_n_samples",)),
    _case("optimizer.lr=inf", *TINY, "--config.optimizer.lr=inf", needs=("config.optimizer.lr",)),
    _case("optimizer.lr=1e30", *TINY, "--config.optimizer.lr=1e30", needs=("config.optimizer.lr", "(0, 1]")),
    _case("optimizer.lr=nan", *TINY, "--config.optimizer.lr=nan", needs=("config.optimizer.lr",)),
    _case("optimizer.weight_decay=inf", *TINY, "--config.optimizer.weight_decay=inf",
          needs=("config.optimizer.weight_decay",)),
    _case("eval.pr_k=0", *TINY, "--config.eval.pr_k=0", needs=("config.eval.pr_k",)),
    _case("eval.batch_size=0", *TINY, "--config.eval.batch_size=0", needs=("config.eval.batch_size",)),
    _case("dataset.image_size=0", *TINY, "--config.dataset.image_size=0", needs=("config.dataset.image_size",)),
    _case("dataset.image_size=-32", *TINY, "--config.dataset.image_size=-32", needs=("config.dataset.image_size",)),
    _case("dataset.image_size!=nnet.img_size", *TINY, "--config.dataset.image_size=28",
          needs=("config.dataset.image_size", "nnet.img_size=32")),
    _case("seed=2^64", *TINY, f"--config.seed={2 ** 64}", needs=("config.seed",)),
    _case("seed=-1", *TINY, "--config.seed=-1", needs=("config.seed",)),
    _case("sample.grid_size=0", *TINY, "--config.sample.grid_size=0", needs=("config.sample.grid_size",)),
    _case("benchmark_steps=0", *TINY, "--mode", "benchmark", "--benchmark_steps=0", needs=("--benchmark_steps",)),
    _case("config missing", "--config", "{IN}/missing.py", "--workdir", "{W}", needs=("missing.py", "no such file")),
    _case("config syntax error", "--config", "{IN}/c.py", "--workdir", "{W}", setup="config_syntax",
          needs=("c.py:1", "syntax")),
    _case("config is a directory", "--config", "{IN}", "--workdir", "{W}", needs=("is a directory",)),
    _case("config without get_config", "--config", "{IN}/c.py", "--workdir", "{W}", setup="config_no_get_config",
          needs=("defines no get_config()",)),
    _case("config get_config raises", "--config", "{IN}/c.py", "--workdir", "{W}", setup="config_raises",
          needs=("get_config() failed at line 2", "boom")),
    _case("prompts not UTF-8", *COCO, "--mode", "sample", "--config.sample.prompts={IN}/prompts.txt",
          setup="prompts_latin1", needs=("config.sample.prompts", "not UTF-8")),
    _case("prompts is a directory", *COCO, "--mode", "sample", "--config.sample.prompts={IN}/prompts.txt",
          setup="prompts_dir", needs=("config.sample.prompts", "a directory")),
    _case("file:// workdir", "--config", "configs/test_tiny.py", "--workdir", "file://{W}", needs=("file://",)),
    _case("convert_input is a directory", *TINY, "--mode", "convert", "--convert_input={IN}/converted",
          setup="input_dir", needs=("--convert_input", "is a directory", "--convert_to_official")),
    _case("convert_input missing", *TINY, "--mode", "convert", "--convert_input={IN}/missing.pth",
          needs=("missing.pth",)),
    _case("sample.step=999 (5, 10 saved)", *TINY, "--mode", "sample", "--config.sample.step=999",
          setup="steps_5_10", needs=("step 999", "5, 10", "sample.step")),
    _case("disk full in a run", *TINY, "--mode", "sample", raise_="ENOSPC", rc=1,
          needs=("batch_000001.npz", "No space left on device", "ENOSPC")),
    _case("NonFiniteLossError", *TINY, raise_="NonFiniteLossError", rc=1, needs=("non-finite loss", "optimizer.lr")),
]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    cases = [p.values[0] for p in CASES]
    (folder / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bad_inputs_worker.py"), ROOT,
                           str(folder / "cases.json"), str(folder / "rows.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {row["id"]: row for row in json.loads((folder / "rows.json").read_text())}


@pytest.mark.parametrize("case,rc,needs", CASES)
def test_a_bad_input_is_one_line_and_writes_nothing(table, case, rc, needs):
    row = table[case["id"]]
    assert (row["rc"], row["error_lines"], row["traceback"], row["written"]) == (rc, 1, False, []), row
    line = next(l for l in row["stderr"].splitlines() if l.startswith("error:"))
    for fragment in needs:
        assert fragment in line, line
