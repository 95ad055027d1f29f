"""uvit-jax: U-ViT (Bao et al., CVPR 2023) in JAX/Flax.

Data flows one way: host_malloc (set before JAX starts) -> dataset_specs -> config -> parallel / rng / files /
rundir / images -> data -> models -> diffusion -> conditioning -> preemption / workdir_lock / checkpoint ->
train_step -> train -> generate / latent -> sample / eval_mode / extract -> main. A module imports only what is to its left.
"""
