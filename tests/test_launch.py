"""Launch and benchmark scripts: syntax, shellcheck, usage on bad arguments, and their logic against stand-ins.

No network, no gcloud, no SLURM: `gcloud`, `srun`, `scancel`, `scontrol`, `uv`, `curl` and the Python that would run
main.py are small fakes on PATH that record what they were asked to do. The TPU workers' scripts run under `sh`
(dash here), as they would in a worker's login shell.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*")) + glob.glob(os.path.join(REPO, "benchmarks", "*.sh")))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
LOCAL = os.path.join(REPO, "launch", "local_multiprocess.sh")
BENCH = os.path.join(REPO, "benchmarks", "accelerator_benchmark.sh")
CONFIG = "configs/cifar10_uvit_s2.py"

# Stands in for `python`: main.py is faked (prints its arguments and environment, then behaves as FAKE_* and the
# flags say); anything else (python -c, python - <<EOF) is handed to the real interpreter.
FAKE_PYTHON = f"""#!/usr/bin/env bash
[ "${{1:-}}" = main.py ] || exec {sys.executable} "$@"
shift
echo "fake main.py $*"
echo "env UVIT_DISTRIBUTED=${{UVIT_DISTRIBUTED:-}} JAX_PROCESS_ID=${{JAX_PROCESS_ID:-}} \\
JAX_NUM_PROCESSES=${{JAX_NUM_PROCESSES:-}} JAX_COORDINATOR_ADDRESS=${{JAX_COORDINATOR_ADDRESS:-}} \\
JAX_LOCAL_DEVICE_IDS=${{JAX_LOCAL_DEVICE_IDS:-}} XLA_FLAGS=${{XLA_FLAGS:-}}"
workdir="" mode=train attn="" topology=""
for a in "$@"; do
  case "$a" in --workdir) next=w ;; --mode) next=m ;; --config.attention=*) attn=${{a#*=}} ;;
    --benchmark_topology=*) topology=${{a#*=}} ;;
    *) case "${{next:-}}" in w) workdir=$a ;; m) mode=$a ;; esac; next="" ;; esac
done
if [ -n "${{FAKE_PIDFILE:-}}" ]; then  # wait for SIGTERM like a training run: "save" and exit 0
  trap 'echo "saved at SIGTERM"; kill $sleeper; exit 0' TERM
  echo $$ > "$FAKE_PIDFILE.tmp${{JAX_PROCESS_ID:-}}" && mv "$FAKE_PIDFILE.tmp${{JAX_PROCESS_ID:-}}" "$FAKE_PIDFILE${{JAX_PROCESS_ID:-}}"
  sleep 60 & sleeper=$!
  wait $sleeper
  exit 5
fi
if [ -n "$topology" ]; then  # the launcher's fit check: fits as FAKE_FITS says
  echo "$topology" >> "$FAKE_DIR/topologies.log"
  echo '{{"fits": '"${{FAKE_FITS:-true}}"', "memory_estimate_gb": 19.3, "sample_memory_estimate_gb": 3.5,
        "fid_memory_estimate_gb": 15.0, "hbm_gb": 16.0}}' > "$workdir/benchmark.json"
  exit 0
fi
if [ "$mode" = benchmark ]; then
  [ "$attn" = cudnn ] && {{ echo "RuntimeError: cuDNN attention is not available here" >&2; exit 1; }}
  [ "$attn" = einsum ] && exec sleep 30
  mkdir -p "$workdir"
  echo '{{"device": "FakeGPU", "compile_s": 3.5, "train_images_per_s": 1234.5, "mfu": 0.41,
        "train_tflops_per_s_per_device": 400.2, "peak_device_memory_gb": 12.0, "forward_images_per_s": 5000.0}}' \\
    > "$workdir/benchmark.json"
fi
[ "$mode" = sample ] && echo "I1130 sample.py:156] batch 1/1  12.50 samples/s  ETA 0s"
exit "${{FAKE_EXIT:-0}}"
"""

# Stands in for gcloud: logs every call; `ssh` runs the worker script with sh in FAKE_HOME (one fake worker),
# `scp` copies into FAKE_HOME, `describe` answers READY when FAKE_TPU_STATE says so.
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "gcloud $*" >> "$FAKE_DIR/gcloud.log"
case "$3 $4" in
  "tpu-vm describe") [ -n "${FAKE_TPU_STATE:-}" ] || exit 1
    case "$*" in *acceleratorType*) echo "${FAKE_ACCELERATOR:-v5litepod-8}" ;; *) echo "$FAKE_TPU_STATE" ;; esac ;;
  "queued-resources describe") exit 1 ;;
  "tpu-vm scp") cp "$5" "$FAKE_HOME/${6#*:}" ;;
  "tpu-vm ssh")
    for a in "$@"; do case "$a" in --command=*) script=${a#--command=} ;; esac; done
    HOME=$FAKE_HOME exec sh -c "$script" ;;
  *) exit 0 ;;
esac
"""
FAKE_UV = """#!/usr/bin/env bash
echo "uv $*" >> "$FAKE_DIR/uv.log"
if [ "$1" = venv ]; then mkdir -p "${@: -1}/bin" && cp "$FAKE_DIR/python" "${@: -1}/bin/python"; fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_DIR/srun.log"
while [ "${1#--}" != "$1" ]; do shift; done  # drop srun's own options
SLURM_LOCALID=0 SLURM_PROCID=0 "$@"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_DIR/scancel.log"
kill -TERM "$(cat "$FAKE_PIDFILE")"
"""
FAKES = {"python": FAKE_PYTHON, "gcloud": FAKE_GCLOUD, "uv": FAKE_UV, "srun": FAKE_SRUN, "scancel": FAKE_SCANCEL,
         "scontrol": '#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_DIR/scontrol.log"\n',
         "curl": "#!/usr/bin/env bash\necho 0\n"}


@pytest.fixture
def fakes(tmp_path):
    """A directory of fakes first on PATH; returns (env, fake_dir)."""
    d = tmp_path / "fakes"
    d.mkdir()
    for name, text in FAKES.items():
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "UVIT_", "JAX_"))}
    env.update(PATH=f"{d}:{env['PATH']}", FAKE_DIR=str(d), PYTHON=str(d / "python"))
    return env, d


def run(args, env=None, cwd=REPO, timeout=120):
    env = env if env is not None else {k: v for k, v in os.environ.items()
                                       if not k.startswith(("SLURM_", "DRY_RUN"))}
    return subprocess.run(["bash", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def test_every_script_is_covered():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh", "accelerator_benchmark.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "--shell=bash", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_usage_on_missing_arguments_and_help(script):
    r = run([script])
    assert r.returncode != 0
    assert "usage:" in r.stderr and "error" in r.stderr, r.stderr
    r = run([script, "--help"])
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


# ---------------------------------------------------------------------------------------------------- tpu_pod.sh
def test_tpu_dry_run_prints_the_commands_and_runs_none(fakes):
    env, d = fakes
    r = run([TPU, "--dry-run", "--accelerator", "v5p-32", "--expect-devices", "16", "my-tpu", "us-east5-a", CONFIG,
             "gs://bucket/run", "--", "--config.train.n_steps=10", "--config.note=it's"], env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert not os.path.exists(d / "gcloud.log"), "a dry run called gcloud"
    assert "gcloud compute tpus tpu-vm describe my-tpu --zone=us-east5-a" in out
    assert "gcloud compute tpus tpu-vm create my-tpu --zone=us-east5-a --accelerator-type=v5p-32" in out
    assert "--version=v2-alpha-tpuv5" in out
    assert re.search(r"tpu-vm scp \S+uvit-jax.tgz my-tpu:uvit-jax.tgz --zone=us-east5-a --worker=all", out)
    jax_pin = re.search(r"^jax==(\S+)", read(os.path.join(REPO, "requirements.txt")), re.M).group(1)
    assert f"'jax[tpu]=={jax_pin}'" in out and "-r requirements.txt" in out
    launch = [l for l in out.splitlines() if "main.py" in l and "nohup" in l]
    assert len(launch) == 1, out
    for piece in ["'--config' 'configs/cifar10_uvit_s2.py'", "'--workdir' 'gs://bucket/run'",
                  "'--config.mesh.expect_devices=16'", "'--config.train.n_steps=10'", r"'--config.note=it'\''s'"]:
        assert piece in launch[0], piece
    assert "export UVIT_DISTRIBUTED=1" in out
    assert out.count("--worker=all") == 3  # scp, install, run
    # First the fit check, shown (with the run's --config overrides) but not run: a compile for the TPU type.
    check = out.index("main.py --config configs/cifar10_uvit_s2.py --workdir")
    assert check < out.index("tpu-vm create")
    assert "--benchmark_compile_only --benchmark_topology=v5p-32 --config.train.n_steps=10" in out[check:]
    assert not os.path.exists(d / "topologies.log")
    assert "--worker=0" in out and "tail -n +1 -F" in out  # then worker 0's log is streamed


def test_tpu_dry_run_variants(fakes):
    env, d = fakes
    r = run([TPU, "--queued", "--spot", "--accelerator", "v6e-16", "t", "z", CONFIG, "gs://b/r"],
            env={**env, "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "queued-resources create t --node-id=t --zone=z --accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --spot" in r.stdout
    assert "expect_devices" not in r.stdout  # only when asked for

    r = run([TPU, "--dry-run", "--git", "git@github.com:org/uvit-jax.git@v1.2", "t", "z", "configs/only_there.py",
             "gs://b/r"], env=env)
    assert r.returncode == 0, r.stderr
    assert "scp" not in r.stdout
    assert "git remote add origin 'git@github.com:org/uvit-jax.git'" in r.stdout
    assert "git fetch -q --depth=1 origin 'v1.2'" in r.stdout
    assert "no --accelerator" in r.stdout

    r = run([TPU, "delete", "--dry-run", "t", "z"], env=env)
    assert r.returncode == 0 and "gcloud compute tpus tpu-vm delete t --zone=z --quiet" in r.stdout
    r = run([TPU, "delete", "--queued", "--dry-run", "t", "z"], env=env)
    assert "gcloud compute tpus queued-resources delete t --zone=z --force --quiet" in r.stdout
    assert not os.path.exists(d / "gcloud.log")


@pytest.mark.parametrize("args, message", [
    (["t", "z", CONFIG], "need TPU_NAME ZONE CONFIG WORKDIR"),
    (["t", "z", "configs/missing.py", "gs://b/r"], "configs/missing.py not found"),
    (["--git", "https://example.com/repo.git", "t", "z", CONFIG, "gs://b/r"], "--git needs URL@REF"),
    (["--expect-devices", "many", "t", "z", CONFIG, "gs://b/r"], "positive integer"),
    (["--bogus", "t", "z", CONFIG, "gs://b/r"], "unknown option --bogus"),
    (["--accelerator"], "--accelerator needs a value"),
    (["delete", "t"], "delete needs TPU_NAME ZONE"),
])
def test_tpu_bad_arguments(fakes, args, message):
    env, d = fakes
    r = run([TPU, *args], env=env)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not os.path.exists(d / "gcloud.log")


@pytest.mark.parametrize("exit_code", [0, 3])
def test_tpu_launch_against_fake_workers(fakes, tmp_path, exit_code):
    """The whole launch on an existing TPU: copy, install, start under nohup, stream the log, pass on the status."""
    env, d = fakes
    home = tmp_path / "home"
    home.mkdir()
    env.update(FAKE_HOME=str(home), FAKE_TPU_STATE="READY", FAKE_EXIT=str(exit_code))
    r = run([TPU, "--expect-devices", "8", "t", "z", CONFIG, "gs://b/r", "--", "--config.train.n_steps=3"], env=env)
    said = r.stdout + r.stderr
    assert r.returncode == (0 if exit_code == 0 else 1), said
    assert "create" not in read(d / "gcloud.log") and "reusing TPU t" in r.stdout, said
    assert (home / "uvit-jax" / "main.py").exists() and not (home / "uvit-jax" / ".git").exists()
    assert "pip install" in read(d / "uv.log") and "jax[tpu]==" in read(d / "uv.log"), read(d / "uv.log")
    log = read(home / "uvit-jax-logs" / "latest" / "worker-0.log")
    assert f"--config {CONFIG} --workdir gs://b/r --config.mesh.expect_devices=8 --config.train.n_steps=3" in log, log
    assert "UVIT_DISTRIBUTED=1" in log, log
    assert "fake main.py" in r.stdout, said  # worker 0's log was streamed back
    assert f"exit status {exit_code}" in r.stdout, said
    assert read(d / "topologies.log") == "v5litepod-8\n"  # checked for the existing TPU's type first
    assert "fit check: configs/cifar10_uvit_s2.py on v5litepod-8 fits: train step 19.3 GiB" in r.stdout, said
    r = run([TPU, "logs", "t", "z"], env=env)  # streams the latest launch again
    assert r.returncode == (0 if exit_code == 0 else 1) and "fake main.py" in r.stdout, r.stdout + r.stderr


def test_tpu_preempted_tpu_stops_with_advice(fakes, tmp_path):
    env, d = fakes
    env.update(FAKE_HOME=str(tmp_path), FAKE_TPU_STATE="PREEMPTED")
    r = run([TPU, "--accelerator", "v5p-32", "t", "z", CONFIG, "gs://b/r"], env=env)
    assert r.returncode == 1 and "is PREEMPTED" in r.stderr and "launch/tpu_pod.sh delete t z" in r.stderr, r.stderr
    assert "scp" not in read(d / "gcloud.log") and "create" not in read(d / "gcloud.log")


def test_tpu_refuses_a_run_that_does_not_fit_before_creating_the_tpu(fakes, tmp_path):
    env, d = fakes
    env.update(FAKE_HOME=str(tmp_path), FAKE_FITS="false")
    r = run([TPU, "--accelerator", "v5litepod-8", "t", "z", CONFIG, "gs://b/r"], env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("does not fit: train step 19.3 GiB, sampler 3.5 GiB, FID sampler during training 15.0 GiB per chip "
            "against 16.0 GiB of HBM") in r.stderr and "--skip-fit-check" in r.stderr, r.stderr
    assert read(d / "topologies.log") == "v5litepod-8\n"
    assert "create" not in read(d / "gcloud.log") and "scp" not in read(d / "gcloud.log")
    r = run([TPU, "--skip-fit-check", "--detach", "--accelerator", "v5litepod-8", "t", "z", CONFIG, "gs://b/r"],
            env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tpu-vm create t" in read(d / "gcloud.log") and read(d / "topologies.log") == "v5litepod-8\n"


# ---------------------------------------------------------------------------------------------------- slurm
def slurm_dir(tmp_path):
    """A submit directory: the script needs main.py and the config relative to it."""
    sub = tmp_path / "submit"
    (sub / "configs").mkdir(parents=True)
    (sub / "main.py").write_text("")
    (sub / "configs" / "c.py").write_text("")
    return sub


@pytest.mark.parametrize("procs_per, tasks, cpus", [("gpu", 4, 16), ("node", 1, 64)])
def test_slurm_dry_run(fakes, procs_per, tasks, cpus):
    env, d = fakes
    env.update(DRY_RUN="1", SLURM_NNODES="3", GPUS_PER_NODE="4", SLURM_CPUS_ON_NODE="64", UVIT_PROCS_PER=procs_per)
    r = run([SLURM, CONFIG, "/shared/run", "--config.train.n_steps=7"], env=env)
    assert r.returncode == 0, r.stderr
    assert "UVIT_DISTRIBUTED=1" in r.stdout
    assert f"--ntasks-per-node={tasks} --cpus-per-task={cpus}" in r.stdout
    assert f"--config {CONFIG} --workdir /shared/run --config.mesh.expect_devices=12 --config.train.n_steps=7" in r.stdout
    assert not os.path.exists(d / "srun.log")


def test_slurm_argument_checks(fakes, tmp_path):
    env, _ = fakes
    r = run([SLURM, "configs/missing.py", "w"], env=env)
    assert r.returncode == 2 and "configs/missing.py not found" in r.stderr
    r = run([SLURM, CONFIG, ""], env=env)
    assert r.returncode == 2 and "usage:" in r.stderr
    r = run([SLURM, CONFIG, "w"], env=env)
    assert r.returncode == 2 and "submit it with sbatch" in r.stderr
    r = run([SLURM, "configs/c.py", "w"], env={**env, "SLURM_JOB_ID": "1"}, cwd=tmp_path)  # no main.py there
    assert r.returncode == 2


def test_slurm_sigterm_saves_then_requeues(fakes, tmp_path):
    env, d = fakes
    sub = slurm_dir(tmp_path)
    pidfile = tmp_path / "task.pid"
    env.update(SLURM_JOB_ID="42", SLURM_NNODES="1", GPUS_PER_NODE="2", FAKE_PIDFILE=str(pidfile))
    p = subprocess.Popen(["bash", SLURM, "configs/c.py", "w"], cwd=sub, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert pidfile.exists(), p.communicate(timeout=5)[0]
    p.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends before the time limit
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    assert "saved at SIGTERM" in out and "JAX_LOCAL_DEVICE_IDS=0" in out
    assert read(d / "scancel.log").strip() == "scancel --signal=TERM 42"
    assert read(d / "scontrol.log").strip() == "scontrol requeue 42"
    assert (sub / "slurm-logs" / "uvit-42").is_dir()


@pytest.mark.parametrize("exit_code", [0, 7])
def test_slurm_run_that_ends_by_itself_is_not_requeued(fakes, tmp_path, exit_code):
    env, d = fakes
    env.update(SLURM_JOB_ID="43", SLURM_NNODES="2", GPUS_PER_NODE="4", UVIT_PROCS_PER="node",
               FAKE_EXIT=str(exit_code))
    r = run([SLURM, "configs/c.py", "w"], env=env, cwd=slurm_dir(tmp_path))
    assert r.returncode == exit_code, r.stdout + r.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in r.stdout and "expect_devices=8" in r.stdout
    assert not os.path.exists(d / "scontrol.log") and not os.path.exists(d / "scancel.log")


# ---------------------------------------------------------------------------------------------------- local
def test_local_multiprocess_env_and_status(fakes):
    env, _ = fakes
    r = run([LOCAL, "2", "3", CONFIG, "runs/x", "--config.train.n_steps=1"], env={**env, "PORT": "23456"})
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert (f"JAX_PROCESS_ID={i} JAX_NUM_PROCESSES=2 JAX_COORDINATOR_ADDRESS=127.0.0.1:23456 "
                f"JAX_LOCAL_DEVICE_IDS= XLA_FLAGS=--xla_force_host_platform_device_count=3") in r.stdout
    assert r.stdout.count(f"--config {CONFIG} --workdir runs/x --config.train.n_steps=1") == 2
    assert run([LOCAL, "2", "1", CONFIG, "runs/x"], env={**env, "FAKE_EXIT": "4"}).returncode == 4
    r = run([LOCAL, "two", "1", CONFIG, "runs/x"], env=env)
    assert r.returncode == 2 and "positive integers" in r.stderr


def test_local_multiprocess_passes_sigterm_on(fakes, tmp_path):
    env, _ = fakes
    pidfile = str(tmp_path / "pid")
    p = subprocess.Popen(["bash", LOCAL, "2", "1", CONFIG, "runs/x"], cwd=REPO, env={**env, "FAKE_PIDFILE": pidfile},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not all(os.path.exists(pidfile + str(i)) for i in range(2)) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0 and out.count("saved at SIGTERM") == 2, out


# ---------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_rows_fail_gracefully_and_table_is_printed(fakes, tmp_path):
    env, _ = fakes
    env.update(TIMEOUT="2")
    out = tmp_path / "bench"
    r = run([BENCH, str(out)], env=env, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr  # some rows failed
    table = [l for l in r.stdout.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 3 * 3 + 1, r.stdout  # header, 3 models x 3 attentions, the sample row
    rows = {tuple(c.strip() for c in l.strip("|").split("|")[:2]): l for l in table[1:]}
    for model in ["S/2", "L/2", "H/2"]:
        assert "| ok |" in rows[(model, "xla")] and "1234.5" in rows[(model, "xla")] and "41.0%" in rows[(model, "xla")]
        assert "failed (exit 1): RuntimeError: cuDNN attention is not available here" in rows[(model, "cudnn")]
        assert "| timeout after 2s |" in rows[(model, "einsum")]
    assert "| ok |" in rows[("H/2", "auto")] and "12.50" in rows[("H/2", "auto")]
    assert "RuntimeError: cuDNN attention" in r.stdout.split("| model |")[0]  # printed when the row failed
    assert read(out / "results.md").count("\n| ") == 10
    commands = read(out / "h2-xla.log") + read(out / "h2-sample500.log")
    for piece in ["--config configs/imagenet256_uvit_h2.py", "--config.dtype=bfloat16", "--config.attention=xla",
                  "--mode sample", "--config.sample.random_params=True", "--config.sample.n_samples=500",
                  "--config.sample.mini_batch_size=500"]:
        assert piece in commands, piece


def test_benchmark_time_budget_skips_rows(fakes, tmp_path):
    env, _ = fakes
    env.update(ATTENTIONS="xla", BUDGET_S="200", SAMPLE_TIMEOUT="190")  # leaves < 20 s for the benchmark rows
    r = run([BENCH, str(tmp_path / "b")], env=env)
    assert r.returncode == 1
    assert r.stdout.count("skipped (time budget)") == 2 * 3  # announced, then in the table, for each model
    assert "| H/2 | auto | ok |" in r.stdout


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO, ".git")) and not os.path.isfile(os.path.join(REPO, ".git")),
                    reason="not a git checkout")
def test_weights_are_left_out_of_the_tree_the_tpu_launcher_copies():
    """tpu_pod.sh tars `git ls-files --cached --others --exclude-standard`: downloaded weights must not ride along."""
    weights = ["assets/stable-diffusion/autoencoder_kl.pth", "assets/fid_stats/fid_stats_imagenet256.npz",
               "clip/model.safetensors", "imagenet256_uvit_huge.pth", "runs/x/last.ckpt"]
    kept = ["tests/fixtures/uvit_torch_legacy.pth", "uvit_jax/train.py"]
    r = subprocess.run(["git", "-C", REPO, "check-ignore", "--no-index", *weights, *kept], capture_output=True,
                       text=True)
    assert sorted(r.stdout.split()) == sorted(weights)
