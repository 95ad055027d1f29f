"""uvit-jax: U-ViT (Bao et al., CVPR 2023) in JAX/Flax.

Data flows one way: tpu_env -> host_malloc (set before JAX starts) -> dataset_specs -> config -> parallel /
agreement / rng / files / console -> images -> rundir -> data -> models -> diffusion -> conditioning -> preemption ->
workdir_lock / integrity -> checkpoint -> convert -> train_step -> evaluate -> latent -> generate -> train -> sample ->
eval_mode / extract -> benchmark -> tpu_plan -> main. A module imports only modules of the groups to its left
(tests/test_structure.py checks it).
"""
