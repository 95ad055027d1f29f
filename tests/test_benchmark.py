"""Benchmark mode: the timed run on the tiny config, compile-only on large presets (no allocation), FLOP counts."""
import importlib
import json

import jax
import pytest

from uvit_jax import benchmark


def preset_config(module: str, batch: int, dtype: str = "bfloat16"):
    config = importlib.import_module(f"configs.{module}").get_config()
    config.train.batch_size = batch
    config.dtype = dtype
    return config


def test_timed_benchmark_tiny_writes_consistent_figures(tmp_path):
    """benchmark.json holds what run() returns, and its figures agree with each other and with the config: images/s
    from the step time, TFLOP/s from the analytic count (3 x forward), XLA's memory parts, the parameter count."""
    from uvit_jax import models
    config = importlib.import_module("configs.test_tiny").get_config()
    result = benchmark.run(config, str(tmp_path), steps=2)
    r = json.load(open(tmp_path / "benchmark.json"))
    assert r == json.loads(json.dumps(result))
    batch = config.train.batch_size
    assert (r["global_batch"], r["per_device_batch"], r["devices"]) == (batch, batch // 8, 8)
    assert r["params"] == models.count_params(config.nnet)
    assert r["analytic_forward_flops"] == 2 * models.forward_macs(dict(config.nnet))
    assert r["train_images_per_s"] == pytest.approx(batch / r["step_s"])
    assert r["train_tflops_per_s_per_device"] == pytest.approx(
        r["train_images_per_s"] * 3 * r["analytic_forward_flops"] / 8 / 1e12)
    assert r["forward_images_per_s"] == pytest.approx(batch / r["forward_s"])
    assert r["memory_estimate_gb"] == pytest.approx(r["argument_gb"] + r["temp_gb"] + r["output_gb"] - r["alias_gb"])
    assert r["loss"] == pytest.approx(1.0, abs=0.5)  # eps-prediction loss of a fresh network: about E|eps|^2 = 1


def test_compile_only_large_preset_allocates_nothing(tmp_path):
    """U-ViT-L/2 (ImageNet 256): 4.3 GiB of train state, never allocated; the estimate comes from XLA."""
    before = sum(a.nbytes for a in jax.live_arrays())
    config = preset_config("imagenet256_uvit_l2", batch=jax.device_count())
    benchmark.run(config, str(tmp_path), compile_only=True)
    assert sum(a.nbytes for a in jax.live_arrays()) - before < 2 ** 20
    r = json.load(open(tmp_path / "benchmark.json"))
    assert r["compile_only"] and "step_s" not in r
    state_gb = 4 * r["params"] * 4 / 2 ** 30  # params, EMA and two Adam moments in float32, over 8 devices
    assert r["argument_gb"] == pytest.approx(state_gb, rel=0.02)  # replicated: the whole state on each device
    assert r["memory_estimate_gb"] >= r["argument_gb"] + r["temp_gb"] - 1e-6
    assert r["use_checkpoint"] and r["xla_train_step_flops_per_image"] > 3 * r["analytic_forward_flops"]


@pytest.mark.parametrize("module", ["cifar10_uvit_s2", "imagenet64_uvit_m4", "imagenet256_uvit_h2"])
def test_analytic_forward_flops_match_xla_cost_analysis(module):
    """2 x forward_macs (what MFU is computed from) equals XLA's count of the compiled forward within 5%."""
    xla, analytic = benchmark.forward_flops(preset_config(module, batch=2), batch=2)
    assert abs(xla - analytic) / analytic < 0.05, (module, xla, analytic)


def test_input_pipeline_fake_cifar10_fast_png_path_matches_tfds_decoder(tmp_path):
    """benchmarks/input_pipeline.py's fake CIFAR-10 read through PixelSource's batched PNG decoder gives exactly
    the arrays of TFDS's per-example decoder (flips included), and its rate report runs."""
    import numpy as np

    from benchmarks import input_pipeline
    from uvit_jax.data.datasets import PixelSource
    input_pipeline.make_fake_cifar10(str(tmp_path), 64)
    source = PixelSource("cifar10", str(tmp_path), 32, True)
    assert source._png_decoder is not None
    idx, bits = np.arange(40)[::-1], np.arange(40, dtype=np.uint64) * 7919
    fast = source.read(idx, bits, True)
    source._png_decoder = None
    slow = source.read(idx, bits, True)
    assert fast.keys() == slow.keys() == {"image", "label"}
    for key in fast:
        np.testing.assert_array_equal(fast[key], slow[key])
    # The rates quoted in the README: 8 H100s at 45% MFU, U-ViT-S/2 on CIFAR-10 and U-ViT-H/2 on latents.
    assert input_pipeline.required_images_per_s("cifar10") == pytest.approx(48_636, abs=1)
    assert input_pipeline.required_images_per_s("latents") == pytest.approx(4_455, abs=1)


def _activation_all_gathers(config) -> list[str]:
    """Shapes of the floating-point all-gathers in the compiled train step whose result spans the global batch
    (the label indices of the class embedding, s32[B, 1], are gathered too, and are tiny)."""
    import re
    trainer = benchmark.make_trainer(config)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
             for k, v in benchmark.synthetic_batch(config, config.train.batch_size).items()}
    hlo = trainer.step_fn.lower(trainer.abstract_with_shardings(), batch).compile().as_text()
    return re.findall(rf"= ((?:f32|bf16)\[{config.train.batch_size},\d+[,\d]*\])\S* all-gather\(", hlo)


def test_fsdp_gathers_kernels_not_activations(monkeypatch):
    """Parameters sharded over 8 devices (mesh.fsdp=8), batch 64 per device: no activation is all-gathered to the
    global batch in the train step. Unpinned, XLA's partitioner gathers the activations of U-ViT-L/2-sized
    Linears instead of their kernels (8x the activation memory and traffic), which the second half shows."""
    config = preset_config("imagenet256_uvit_l2", batch=8 * 64)
    config.nnet.depth, config.mesh.fsdp = 2, 8
    assert _activation_all_gathers(config) == []
    from uvit_jax import parallel
    monkeypatch.setattr(parallel, "activation_sharding", lambda mesh: None)  # the rule switched off
    assert len(_activation_all_gathers(config)) > 5


def test_sampler_with_fsdp_sharded_params_equals_replicated():
    """The samplers run with pinned activations when parameters are sharded (mesh.fsdp=8): same images as with
    replicated parameters, batch-sharded output."""
    import numpy as np

    from uvit_jax import generate, models, parallel
    from uvit_jax.generate import image_shape
    from uvit_jax.train_step import make_apply
    config = importlib.import_module("configs.test_tiny").get_config()
    config.nnet.embed_dim, config.nnet.num_heads = 256, 4  # kernels large enough to be sharded
    config.sample.algorithm, config.sample.sample_steps = "dpm_solver", 4
    nnet = dict(config.nnet)
    params = jax.jit(lambda k: models.init_params(nnet, k))(jax.random.key(0))
    labels = jax.numpy.arange(16) % 10
    out = {}
    for fsdp in (1, 8):
        mesh = parallel.make_mesh(fsdp)
        fn = generate.make_generate_from_config(config, make_apply(config, mesh=mesh), image_shape=image_shape(config))
        sharded = jax.device_put(params, parallel.tree_param_shardings(params, mesh))
        out[fsdp] = generate.jit_generate(fn, 16, mesh)(sharded, jax.random.key(1), labels)
        assert out[fsdp].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 4)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
        parallel.tree_param_shardings(params, parallel.make_mesh(8))))
    np.testing.assert_allclose(np.asarray(out[8]), np.asarray(out[1]), rtol=1e-4, atol=1e-5)
