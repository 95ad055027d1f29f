"""Official PyTorch U-ViT checkpoints <-> our parameters. CLI: `python main.py --mode convert` (see main.py)."""
from uvit_jax.convert.autoencoder import autoencoder_from_official, autoencoder_to_official
from uvit_jax.convert.clip_text import clip_text_from_hf
from uvit_jax.convert.pth import load_state_dict, load_torch_file, save_torch_file
from uvit_jax.convert.uvit import (from_official, load_converted, params_from_official, params_to_official,
                                   save_converted, to_official)

__all__ = ["from_official", "to_official", "params_from_official", "params_to_official", "load_state_dict",
           "load_torch_file", "save_torch_file", "save_converted", "load_converted",
           "autoencoder_from_official", "autoencoder_to_official", "clip_text_from_hf"]
