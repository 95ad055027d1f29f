"""The frozen networks around the latent configs: the KL-f8 autoencoder and the CLIP text encoder.

The KL-f8 autoencoder (`autoencoder.*`) and the CLIP text encoder (`clip.*`) are loaded from the files the config
names and jitted over the mesh (batch split over every device, weights replicated) in float32 under
`jax.default_matmul_precision("highest")`: on GPU/TPU the default float32 matmul uses TF32 / bf16 passes and would
move the features and the decoded pixels by ~1e-3. Extraction encodes with them; sample mode, FID during training
and the training grids decode with `make_decoder`, the one place latents become images.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from uvit_jax import console, convert, data, parallel
from uvit_jax.models import clip_tokenizer
from uvit_jax.models.clip_text import CLIPTextModel

AUTOENCODER_SOURCE = ("the official U-ViT README's Google Drive folder assets/stable-diffusion/ (autoencoder_kl.pth; "
                      "autoencoder_kl_ema.pth for the H configs), or a diffusers sd-vae-ft-ema "
                      "diffusion_pytorch_model.safetensors")
CLIP_SOURCE = ("Hugging Face openai/clip-vit-large-patch14 (model.safetensors or pytorch_model.bin, or the snapshot "
               "dir with its config.json)")


def is_latent(config) -> bool:
    """Whether the network works in the autoencoder's latent space."""
    return config.dataset.name in data.LATENT_DATASETS


def downsampling(config) -> int:
    """Image side / latent side of the configured autoencoder (8 for KL-f8)."""
    return 2 ** (len(config.autoencoder.ddconfig.ch_mult) - 1)


def _weights(path: str | None, key: str, source: str) -> str:
    """The weights file `config.<key>` names; FileNotFoundError naming the key, the path and where it comes from."""
    if not path:
        raise console.MissingFileError(f"config.{key} is not set: point it at {source}")
    if not os.path.exists(path):
        raise console.MissingFileError(f"config.{key}={path} not found: get it from {source}")
    return path


def check_weights(config, mode: str) -> None:
    """The weights files `mode` will load exist, or FileNotFoundError now (not after a checkpoint restore): the
    autoencoder of a latent config (train: grids and FID decode; sample; extract), CLIP for a prompts file or a
    text dataset's extraction."""
    if not is_latent(config) or mode not in ("train", "sample", "extract"):
        return
    _weights(config.autoencoder.pretrained_path, "autoencoder.pretrained_path", AUTOENCODER_SOURCE)
    if (mode == "sample" and config.sample.prompts) or (mode == "extract" and
                                                        data.LATENT_DATASETS[config.dataset.name].captions):
        _weights(config.clip.pretrained_path, "clip.pretrained_path", CLIP_SOURCE)


def load_autoencoder(config):
    """The configured FrozenAutoencoderKL holding the weights of `autoencoder.pretrained_path` (float32)."""
    path = _weights(config.autoencoder.pretrained_path, "autoencoder.pretrained_path", AUTOENCODER_SOURCE)
    return convert.autoencoder_from_official(path, ddconfig=config.autoencoder.ddconfig.to_dict(),
                                             embed_dim=config.autoencoder.embed_dim,
                                             scale_factor=config.autoencoder.scale_factor)


def clip_architecture(path: str) -> dict:
    """CLIPTextModel kwargs from the config.json beside the weights (a HF snapshot's), else {} (ViT-L/14)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, "config.json")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        cfg = json.load(f)
    text = cfg.get("text_config", cfg)  # CLIPModel nests the text tower's; a CLIPTextModel's is top level
    allowed = set(inspect.signature(CLIPTextModel.__init__).parameters) - {"self", "dtype", "param_dtype", "rngs"}
    return {k: v for k, v in text.items() if k in allowed}


def load_clip(config) -> CLIPTextModel:
    """The CLIP text encoder of `clip.pretrained_path` (float32)."""
    path = _weights(config.clip.pretrained_path, "clip.pretrained_path", CLIP_SOURCE)
    return convert.clip_text_from_hf(path, **clip_architecture(path))


def _jit_frozen(module: nnx.Module, call: Callable, mesh) -> Callable[[jax.Array], jax.Array]:
    """`call(module, x)` jitted with the weights replicated over `mesh` and the batch split over it, run at
    "highest" matmul precision."""
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, parallel.replicated(mesh))
    fn = jax.jit(lambda s, x: call(nnx.merge(graphdef, s), x), out_shardings=parallel.batch_sharding(mesh))

    def run(x):
        with jax.default_matmul_precision("highest"):
            return fn(state, x)

    return run


def make_decoder(config, mesh) -> Callable[[jax.Array], jax.Array]:
    """decode(z) -> images: scaled latents (B, h, w, 4), batch-sharded over `mesh` -> NHWC in about [-1, 1]."""
    return _jit_frozen(load_autoencoder(config), lambda m, z: m.decode(z), mesh)


def make_encoder(config, mesh) -> Callable[[jax.Array], jax.Array]:
    """encode(x) -> moments: images (B, H, W, 3) in [-1, 1], batch-sharded -> (B, H/f, W/f, 8) [mean | logvar]."""
    return _jit_frozen(load_autoencoder(config), lambda m, x: m.encode_moments(x), mesh)


def host_to_global(x: np.ndarray, mesh) -> jax.Array:
    """The same host array on every process -> a global array split over `mesh` along the batch axis."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, parallel.batch_sharding(mesh), lambda index: x[index])


def make_text_encoder(config, mesh) -> Callable[[list[str]], np.ndarray]:
    """encode(texts) -> CLIP last_hidden_state (n, 77, D) float32 on the host: tokenised as U-ViT does (77 ids
    padded with the end token), encoded on the mesh in rows padded to a multiple of the device count."""
    run = _jit_frozen(load_clip(config), lambda m, ids: m(ids), mesh)

    def encode(texts: list[str]) -> np.ndarray:
        ids = clip_tokenizer.tokenize(list(texts))
        n = len(ids)
        ids = np.concatenate([ids, np.repeat(ids[:1], parallel.padded_size(n) - n, axis=0)])
        return parallel.gather_to_host(run(host_to_global(ids, mesh)))[:n].astype(np.float32)

    return encode

