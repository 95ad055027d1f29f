"""Every Table 1 config: exactly the official values, validated; guards on bad values; the official samplers."""
import pytest

from helpers import load_config
from uvit_jax.conditioning import Conditioning
from uvit_jax.config import ConfigError, base_config, validate
from uvit_jax.models import PRESETS, count_params

# What each paper config sets on top of base_config(), written out here from the official sources, independently of
# configs/table1.py (which must reproduce them): the official repository's (github.com/baofff/U-ViT) configs/*.py
# for the network and training values, its README's commands for the training/eval script (hence the schedule and
# final sampler, docs/official_behaviour.md §8 item 5), eval*.py for the final evaluation. Every config also sets
# train.fid_interval = save_interval (FID-10k at every save, as the official training scripts).


def official(preset, steps, batch, lr, betas, warmup, **rest):
    return {"nnet": PRESETS[preset], "train.n_steps": steps, "train.batch_size": batch, "optimizer.lr": lr,
            "optimizer.betas": betas, "lr_scheduler.warmup_steps": warmup, "train.fid_interval": 50_000, **rest}


EULER_1000 = {"schedule": "vp", "sample.algorithm": "euler_maruyama_sde", "sample.sample_steps": 1000}  # eval.py
DPM_SOLVER_50 = {"schedule": "vp", "sample.algorithm": "dpm_solver", "sample.method": "fast", "sample.order": 3,
                 "sample.skip_type": "logSNR", "sample.sample_steps": 50}  # eval.py, eval_ldm.py
DPM_SOLVER_PP_50 = {"schedule": "discrete", "sample.algorithm": "dpm_solver_pp", "sample.method": "fast_grid",
                    "sample.order": 3, "sample.skip_type": "time_uniform",
                    "sample.sample_steps": 50}  # eval_ldm_discrete.py, eval_t2i_discrete.py
IMAGENET64 = {"dataset.name": "imagenet2012", "dataset.image_size": 64, "dataset.random_flip": True,
              "sample.label_distribution": "dataset", "sample.mini_batch_size": 200,
              "eval.ref_stats": "assets/fid_stats/fid_stats_imagenet64_guided_diffusion.npz"}


def latents(res, autoencoder, scale, p_uncond):
    return {"dataset.name": "imagenet_latents", "dataset.path": f"assets/datasets/imagenet{res}_features",
            "dataset.p_uncond": p_uncond, "autoencoder.pretrained_path": f"assets/stable-diffusion/{autoencoder}",
            "autoencoder.scale_factor": 0.18215, "sample.cfg": True, "sample.scale": scale,
            "sample.mini_batch_size": 50,
            "eval.ref_stats": f"assets/fid_stats/fid_stats_imagenet{res}_guided_diffusion.npz"}


MSCOCO = {"dataset.name": "mscoco_latents", "dataset.path": "assets/datasets/coco256_features",
          "dataset.p_uncond": 0.1, "autoencoder.pretrained_path": "assets/stable-diffusion/autoencoder_kl.pth",
          "autoencoder.scale_factor": 0.23010,
          "clip.pretrained_path": "assets/clip-vit-large-patch14", "sample.cfg": True, "sample.scale": 1.0,
          "sample.n_samples": 30_000, "sample.mini_batch_size": 50,
          "eval.ref_stats": "assets/fid_stats/fid_stats_mscoco256_val.npz", **DPM_SOLVER_PP_50}

OFFICIAL = {
    "cifar10_uvit_s2": official("cifar10_uvit_small", 500_000, 128, 2e-4, (0.99, 0.999), 2500, **EULER_1000,
                                **{"dataset.name": "cifar10", "dataset.image_size": 32, "dataset.random_flip": True,
                                   "sample.mini_batch_size": 500,
                                   "eval.ref_stats": "assets/fid_stats/fid_stats_cifar10_train_pytorch.npz"}),
    "celeba64_uvit_s4": official("celeba64_uvit_small", 500_000, 128, 2e-4, (0.99, 0.99), 5000, **EULER_1000,
                                 **{"dataset.name": "celeb_a", "dataset.image_size": 64, "dataset.random_flip": True,
                                    "sample.mini_batch_size": 500,
                                    "eval.ref_stats": "assets/fid_stats/fid_stats_celeba64_train_50000_ddim.npz"}),
    "imagenet64_uvit_m4": official("imagenet64_uvit_mid", 300_000, 1024, 3e-4, (0.99, 0.99), 5000, **DPM_SOLVER_50,
                                   **IMAGENET64),
    "imagenet64_uvit_l4": official("imagenet64_uvit_large", 300_000, 1024, 3e-4, (0.99, 0.99), 5000,
                                   **DPM_SOLVER_50, **IMAGENET64),
    "imagenet256_uvit_l2": official("imagenet256_uvit_large", 300_000, 1024, 2e-4, (0.99, 0.99), 5000,
                                    **DPM_SOLVER_50, **latents(256, "autoencoder_kl.pth", 0.4, 0.15)),
    "imagenet256_uvit_h2": official("imagenet256_uvit_huge", 500_000, 1024, 2e-4, (0.99, 0.99), 5000,
                                    **DPM_SOLVER_PP_50, **latents(256, "autoencoder_kl_ema.pth", 0.4, 0.1)),
    "imagenet512_uvit_l4": official("imagenet512_uvit_large", 500_000, 1024, 2e-4, (0.99, 0.99), 5000,
                                    **DPM_SOLVER_50, **latents(512, "autoencoder_kl.pth", 0.7, 0.15)),
    "imagenet512_uvit_h4": official("imagenet512_uvit_huge", 500_000, 1024, 2e-4, (0.99, 0.99), 5000,
                                    **DPM_SOLVER_PP_50, **latents(512, "autoencoder_kl_ema.pth", 0.7, 0.1)),
    "mscoco_uvit_s2": official("mscoco_uvit_small", 1_000_000, 256, 2e-4, (0.9, 0.9), 5000, **MSCOCO),
    "mscoco_uvit_s2_deep": official("mscoco_uvit_small_deep", 1_000_000, 256, 2e-4, (0.9, 0.9), 5000, **MSCOCO),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_table1_config_is_the_official_one_and_validates(name):
    """The whole config (every key) equals base_config() with the official values above, nothing else changed."""
    want = base_config()
    for key, value in OFFICIAL[name].items():
        section, _, leaf = key.rpartition(".")
        (want[section] if section else want)[leaf] = value
    got = load_config(name)
    assert got.to_dict() == want.to_dict()
    validate(got, device_count=8)
    assert (got.optimizer.weight_decay, got.ema_rate, got.seed) == (0.03, 0.9999, 1234)  # base_config's defaults


def test_table1_rows_by_name_and_an_unknown_row():
    """`--config configs/table1.py:NAME` gives the same config as `--config configs/NAME.py`."""
    from configs import table1
    assert table1.get_config("imagenet512_uvit_h4").to_dict() == load_config("imagenet512_uvit_h4").to_dict()
    with pytest.raises(ValueError, match="unknown row 'imagenet256_uvit_xl'"):
        table1.get_config("imagenet256_uvit_xl")


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



# The sampler of the official training scripts' FID-10k (docs/official_behaviour.md §4): a 50-step DPM-Solver of
# the script's schedule, guided only in train_t2i_discrete.py, whatever the final sampler.
TRAINING_FID = {
    "cifar10_uvit_s2": ("train.py", "dpm_solver", "fast", 0.0),
    "celeba64_uvit_s4": ("train.py", "dpm_solver", "fast", 0.0),
    "imagenet64_uvit_m4": ("train.py", "dpm_solver", "fast", 0.0),
    "imagenet64_uvit_l4": ("train.py", "dpm_solver", "fast", 0.0),
    "imagenet256_uvit_l2": ("train_ldm.py", "dpm_solver", "fast", 0.0),
    "imagenet256_uvit_h2": ("train_ldm_discrete.py", "dpm_solver_pp", "fast_grid", 0.0),
    "imagenet512_uvit_l4": ("train_ldm.py", "dpm_solver", "fast", 0.0),
    "imagenet512_uvit_h4": ("train_ldm_discrete.py", "dpm_solver_pp", "fast_grid", 0.0),
    "mscoco_uvit_s2": ("train_t2i_discrete.py", "dpm_solver_pp", "fast_grid", 1.0),
    "mscoco_uvit_s2_deep": ("train_t2i_discrete.py", "dpm_solver_pp", "fast_grid", 1.0),
}


@pytest.mark.parametrize("name", sorted(TRAINING_FID))
def test_fid_during_training_uses_the_official_training_scripts_sampler(name):
    from uvit_jax.eval_mode import training_fid_sampler
    _, algorithm, method, scale = TRAINING_FID[name]
    c = load_config(name)
    fid = training_fid_sampler(c)
    assert (fid["algorithm"], fid["method"], fid["steps"], fid["order"], fid["scale"]) == (algorithm, method, 50, 3,
                                                                                           scale)
    assert c.train.fid_n_samples == 10_000 and c.train.save_interval == c.train.fid_interval == 50_000
