"""Every Table 1 config: loads, validates, matches the official network preset and the spec's training/sampling."""
import pytest

from helpers import load_config
from uvit_jax.conditioning import Conditioning
from uvit_jax.config import ConfigError, validate
from uvit_jax.models import PRESETS, count_params

# config file -> (preset, schedule, sampler, method, steps, cfg scale, batch, lr, betas, warm-up, n_steps, p_uncond)
TABLE_1 = {
    "cifar10_uvit_s2": ("cifar10_uvit_small", "vp", "euler_maruyama_sde", None, 1000, 0.0, 128, 2e-4, (0.99, 0.999),
                        2500, 500_000, 0.0),
    "celeba64_uvit_s4": ("celeba64_uvit_small", "vp", "euler_maruyama_sde", None, 1000, 0.0, 128, 2e-4,
                         (0.99, 0.99), 5000, 500_000, 0.0),
    "imagenet64_uvit_m4": ("imagenet64_uvit_mid", "vp", "dpm_solver", "fast", 50, 0.0, 1024, 3e-4, (0.99, 0.99), 5000,
                           300_000, 0.0),
    "imagenet64_uvit_l4": ("imagenet64_uvit_large", "vp", "dpm_solver", "fast", 50, 0.0, 1024, 3e-4, (0.99, 0.99),
                           5000, 300_000, 0.0),
    "imagenet256_uvit_l2": ("imagenet256_uvit_large", "vp", "dpm_solver", "fast", 50, 0.4, 1024, 2e-4, (0.99, 0.99),
                            5000, 300_000, 0.15),
    "imagenet256_uvit_h2": ("imagenet256_uvit_huge", "discrete", "dpm_solver_pp", "fast_grid", 50, 0.4, 1024, 2e-4,
                            (0.99, 0.99), 5000, 500_000, 0.1),
    "imagenet512_uvit_l4": ("imagenet512_uvit_large", "vp", "dpm_solver", "fast", 50, 0.7, 1024, 2e-4, (0.99, 0.99),
                            5000, 500_000, 0.15),
    "imagenet512_uvit_h4": ("imagenet512_uvit_huge", "discrete", "dpm_solver_pp", "fast_grid", 50, 0.7, 1024, 2e-4,
                            (0.99, 0.99), 5000, 500_000, 0.1),
    "mscoco_uvit_s2": ("mscoco_uvit_small", "discrete", "dpm_solver_pp", "fast_grid", 50, 1.0, 256, 2e-4, (0.9, 0.9),
                       5000, 1_000_000, 0.1),
    "mscoco_uvit_s2_deep": ("mscoco_uvit_small_deep", "discrete", "dpm_solver_pp", "fast_grid", 50, 1.0, 256, 2e-4,
                            (0.9, 0.9), 5000, 1_000_000, 0.1),
}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table1_config(name):
    preset, schedule, sampler, method, steps, scale, batch, lr, betas, warmup, n_steps, p_uncond = TABLE_1[name]
    c = load_config(name)
    validate(c, device_count=8)
    assert c.nnet.to_dict() == PRESETS[preset]
    assert (c.schedule, c.sample.algorithm, c.sample.sample_steps) == (schedule, sampler, steps)
    if method:
        assert c.sample.method == method and c.sample.order == 3
        assert c.sample.skip_type == ("logSNR" if schedule == "vp" else "time_uniform")
    assert c.sample.scale == scale and c.sample.cfg == (scale > 0)
    assert (c.train.batch_size, c.optimizer.lr, tuple(c.optimizer.betas)) == (batch, lr, betas)
    assert (c.lr_scheduler.warmup_steps, c.train.n_steps, c.dataset.p_uncond) == (warmup, n_steps, p_uncond)
    assert (c.optimizer.weight_decay, c.ema_rate, c.seed) == (0.03, 0.9999, 1234)
    assert c.sample.n_samples == (30_000 if name.startswith("mscoco") else 50_000)
    if name.startswith("mscoco"):
        assert c.autoencoder.scale_factor == pytest.approx(0.23010)


@pytest.mark.parametrize("name", ["quickstart", "test_tiny"])
def test_small_configs_validate(name):
    c = load_config(name)
    validate(c, device_count=8)
    assert count_params(c.nnet) < 5_000_000


@pytest.mark.parametrize("key,value,message", [
    ("schedule", "cosine", "config.schedule"),
    ("sample.algorithm", "ddim", "config.sample.algorithm"),
    ("dataset.p_uncond", 1.5, "config.dataset.p_uncond"),
    ("train.grad_accum_steps", 3, "config.train.batch_size"),
])
def test_invalid_values_name_the_key(key, value, message):
    c = load_config("cifar10_uvit_s2")
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(c)


def test_unknown_key_is_rejected_by_the_locked_config():
    c = load_config("cifar10_uvit_s2")
    c.lock()
    with pytest.raises(AttributeError):
        c.train.n_stepz = 3


@pytest.mark.parametrize("key,value,message", [
    ("nnet.num_classes", 1000, "must be 1001 for 1000 classes of imagenet_latents plus the null label"),
    ("dataset.name", "imagenet", "config.dataset.name: must be one of"),
    ("train.fid_interval", 1000, "config.train.fid_interval: must be a multiple of train.save_interval=50000"),
    ("attention", "flash", "config.attention"),
])
def test_guards_name_the_key(key, value, message):
    """A class model trained with condition drop needs its null label; FID only at save steps; known names only."""
    c = load_config("imagenet256_uvit_h2")
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(c)


def test_imagenet64_has_no_null_label_and_rejects_guidance():
    """ImageNet-64 is trained without condition drop: its 1000 embeddings are all real classes."""
    c = load_config("imagenet64_uvit_m4")
    cond = Conditioning.from_config(c)
    assert (cond.kind, cond.real_classes, cond.null_label) == ("class", 1000, None)
    c.sample.cfg, c.sample.scale = True, 0.4
    with pytest.raises(ConfigError, match="config.sample.cfg"):
        validate(c)
    c = load_config("imagenet256_uvit_l2")
    assert Conditioning.from_config(c).null_label == 1000
    assert Conditioning.from_config(load_config("cifar10_uvit_s2")).kind == "none"
    assert Conditioning.from_config(load_config("mscoco_uvit_s2")).context_shape == (77, 768)



# The official evaluation of each row (docs/official_behaviour.md §2, §4, §5): in-training FID sampler
# (train*.py: 50-step DPM-Solver, guided only in train_t2i_discrete.py) and final sampler (eval*.py). Columns:
# script pair, (in-training algorithm, method, steps, scale), (final algorithm, method, steps, scale, n_samples,
# labels).
OFFICIAL_EVAL = {
    "cifar10_uvit_s2": ("train.py / eval.py", ("dpm_solver", "fast", 50, 0.0),
                        ("euler_maruyama_sde", None, 1000, 0.0, 50_000, None)),
    "celeba64_uvit_s4": ("train.py / eval.py", ("dpm_solver", "fast", 50, 0.0),
                         ("euler_maruyama_sde", None, 1000, 0.0, 50_000, None)),
    "imagenet64_uvit_m4": ("train.py / eval.py", ("dpm_solver", "fast", 50, 0.0),
                           ("dpm_solver", "fast", 50, 0.0, 50_000, "dataset")),
    "imagenet64_uvit_l4": ("train.py / eval.py", ("dpm_solver", "fast", 50, 0.0),
                           ("dpm_solver", "fast", 50, 0.0, 50_000, "dataset")),
    "imagenet256_uvit_l2": ("train_ldm.py / eval_ldm.py", ("dpm_solver", "fast", 50, 0.0),
                            ("dpm_solver", "fast", 50, 0.4, 50_000, "uniform")),
    "imagenet256_uvit_h2": ("train_ldm_discrete.py / eval_ldm_discrete.py", ("dpm_solver_pp", "fast_grid", 50, 0.0),
                            ("dpm_solver_pp", "fast_grid", 50, 0.4, 50_000, "uniform")),
    "imagenet512_uvit_l4": ("train_ldm.py / eval_ldm.py", ("dpm_solver", "fast", 50, 0.0),
                            ("dpm_solver", "fast", 50, 0.7, 50_000, "uniform")),
    "imagenet512_uvit_h4": ("train_ldm_discrete.py / eval_ldm_discrete.py", ("dpm_solver_pp", "fast_grid", 50, 0.0),
                            ("dpm_solver_pp", "fast_grid", 50, 0.7, 50_000, "uniform")),
    "mscoco_uvit_s2": ("train_t2i_discrete.py / eval_t2i_discrete.py", ("dpm_solver_pp", "fast_grid", 50, 1.0),
                       ("dpm_solver_pp", "fast_grid", 50, 1.0, 30_000, None)),
    "mscoco_uvit_s2_deep": ("train_t2i_discrete.py / eval_t2i_discrete.py", ("dpm_solver_pp", "fast_grid", 50, 1.0),
                            ("dpm_solver_pp", "fast_grid", 50, 1.0, 30_000, None)),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_EVAL))
def test_in_training_and_final_samplers_follow_the_official_scripts(name):
    from uvit_jax.eval_mode import training_fid_sampler
    _, (t_alg, t_method, t_steps, t_scale), (alg, method, steps, scale, n, labels) = OFFICIAL_EVAL[name]
    c = load_config(name)
    fid = training_fid_sampler(c)
    assert (fid["algorithm"], fid["method"], fid["steps"], fid["order"], fid["scale"]) == (
        t_alg, t_method, t_steps, 3, t_scale)
    assert (c.sample.algorithm, c.sample.sample_steps, c.sample.scale, c.sample.n_samples) == (alg, steps, scale, n)
    if method:
        assert c.sample.method == method
    if labels:
        assert c.sample.label_distribution == labels
    assert c.train.fid_n_samples == 10_000 and c.train.save_interval == c.train.fid_interval == 50_000
