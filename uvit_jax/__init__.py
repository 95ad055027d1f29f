"""uvit-jax: U-ViT (Bao et al., CVPR 2023) in JAX/Flax.

Data flows one way (see README): config -> parallel -> data -> models -> diffusion -> train -> checkpoint
-> sample/evaluate -> main. A module imports only what is to its left.
"""
