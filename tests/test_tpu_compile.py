"""The tiny config compiled by XLA:TPU (libtpu) for Cloud TPU v5e topologies on this CPU machine: one slice and
two, the FSDP split, HBM fits, the mesh over slices. libtpu comes with requirements.txt (Linux), so CI runs these."""
import json

import pytest

from tests.helpers import load_config
from uvit_jax import parallel, tpu_plan

KEYS = {"device_kind", "devices", "slices", "per_device_batch", "memory_estimate_gb", "sample_memory_estimate_gb",
        "hbm_gb", "fits", "compile_s", "xla_train_step_flops_per_image", "collectives"}


def tiny(**mesh):
    """The tiny config with 256-wide blocks, so that its kernels are large enough for the FSDP rule to split."""
    c = load_config("test_tiny")
    c.nnet = dict(c.nnet, embed_dim=256)
    c.mesh.update(mesh)
    return c


@pytest.fixture(scope="module")
def two_slices(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_slices")
    tpu_plan.run(tiny(), str(workdir), "v5e:2x2", slices=2)
    return json.load(open(workdir / "benchmark.json"))


def test_two_slices_compile_train_step_and_samplers(two_slices):
    r = two_slices
    assert KEYS <= set(r)
    assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 8 and r["slices"] == 2 and r["hbm_gb"] == 16
    assert r["per_device_batch"] == 16 // 8 and r["fits"]
    assert 0 < r["sample_memory_estimate_gb"] < r["fid_memory_estimate_gb"]  # training also holds the whole state
    # Data parallel over two slices: the gradients are summed over DCN as well as within each slice.
    assert r["collectives"]["all-reduce"]["across_slices"] > 0 and r["collectives"]["all-reduce"]["within_slice"] > 0


def test_fsdp_halves_the_parameter_bytes_per_chip(two_slices, tmp_path):
    """fsdp=2 on one v5e-4 slice: the compiler's argument bytes (train state + batch) are half those of the
    replicated state, less the small arrays that stay replicated."""
    r = tpu_plan.run(tiny(fsdp=2), str(tmp_path), "v5e:2x2")
    assert r["devices"] == 4 and r["slices"] == 1 and r["mesh"] == {"data": 2, "fsdp": 2}
    assert 0.5 <= r["argument_gb"] / two_slices["argument_gb"] < 0.52
    assert r["collectives"]["all-gather"]["total"] > 0  # the split parameters are gathered for the forward


def test_fits_turns_false_when_the_train_step_exceeds_hbm(tmp_path, caplog):
    """8192-wide blocks: 1.6e9 parameters, 26 GiB of train state on each 16 GiB chip. XLA:TPU recomputes what it
    can to fit HBM and, when nothing can, stops with the memory it needed: kept as the estimate, and said."""
    c = tiny()
    c.nnet = dict(c.nnet, embed_dim=8192, num_heads=8)
    with caplog.at_level("INFO"):
        r = tpu_plan.run(c, str(tmp_path), "v5litepod-4")  # an accelerator type names the same v5e:2x2 slice
    assert r["topology"] == "v5e:2x2" and r["train_state_gb"] > 16
    assert r["memory_estimate_gb"] > r["hbm_gb"] == 16 and not r["fits"]
    assert r["collectives"] is None and r["sample_memory_estimate_gb"] is None  # nothing more compiled
    said = caplog.text  # a person waiting minutes sees what is compiling and the verdict
    assert "XLA:TPU compiling the train step (4 images per chip)" in said
    assert f"train step (4 images per chip): out of HBM, needs {r['memory_estimate_gb']:.2f} GiB" in said
    assert "does NOT fit on v5e:2x2" in said and "benchmark.json" in said


def test_two_slice_mesh_keeps_each_fsdp_group_inside_a_slice():
    devices = tpu_plan.topology_devices("v5e:2x2", slices=2)
    mesh = parallel.make_mesh(2, devices)
    assert mesh.shape == {"data": 4, "fsdp": 2}
    slices = [[d.slice_index for d in row] for row in mesh.devices]
    assert all(len(set(row)) == 1 for row in slices) and {row[0] for row in slices} == {0, 1}
    with pytest.raises(ValueError, match="fsdp=8"):
        parallel.make_mesh(8, devices)  # a group of 8 would span both 4-chip slices


def test_without_libtpu_one_line_says_what_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(tpu_plan.TopologyError, match=r'pip install "jax\[tpu\]=='):
        tpu_plan.topology_devices("v5e:2x2")


def test_unknown_topology_is_named():
    with pytest.raises(tpu_plan.TopologyError, match="v5e:3x3"):
        tpu_plan.topology_devices("v5e:3x3")
