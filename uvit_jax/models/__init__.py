"""U-ViT networks (Flax NNX, used functionally) and the helpers the trainer uses.

A network is described by an `nnet` mapping: constructor kwargs plus "name" ("uvit" or "uvit_t2i"), as in
`PRESETS`. The trainer keeps parameters as a plain nested dict (`init_params`) and calls the network through a
pure function (`make_apply`), which rebuilds the module inside the traced function with `nnx.merge`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from clu import parameter_overview
from flax import nnx

from uvit_jax.models.flops import forward_macs
from uvit_jax.models.layers import ATTENTION_CHOICES, Precision, pin_activations, resolve_attention
from uvit_jax.models.presets import PRESETS
from uvit_jax.models.uvit import REMAT_POLICIES, UViT
from uvit_jax.models.uvit_t2i import UViTT2I

__all__ = ["ATTENTION_CHOICES", "PRESETS", "Precision", "REMAT_POLICIES", "UViT", "UViTT2I", "abstract_params",
           "build_model",
           "count_params", "forward_macs", "init_params", "make_apply", "nnet_kwargs", "resolve_attention"]

_MODELS = {"uvit": UViT, "uvit_t2i": UViTT2I}


def nnet_kwargs(nnet: Mapping) -> tuple[type, dict[str, Any]]:
    """Split an nnet mapping into (module class, constructor kwargs); unknown names/keys raise a ValueError."""
    nnet = dict(nnet.to_dict() if hasattr(nnet, "to_dict") else nnet)  # also accepts an ml_collections ConfigDict
    name = nnet.pop("name", "uvit")
    if name not in _MODELS:
        raise ValueError(f"unknown network name {name!r}; expected one of {sorted(_MODELS)}")
    cls = _MODELS[name]
    params = inspect.signature(cls.__init__).parameters
    allowed = {k for k, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD and k != "self"}
    unknown = sorted(set(nnet) - allowed)
    if unknown:
        raise ValueError(f"unknown {name} network option(s) {unknown}; allowed: {sorted(allowed)}")
    return cls, nnet


def build_model(nnet: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str = "auto",
                training: bool = True, remat_policy: str | None = None, precision: Mapping | None = None,
                activation_sharding: jax.sharding.Sharding | None = None, rngs: nnx.Rngs):
    """Construct the UViT / UViTT2I module described by `nnet` (its "name" key selects the class).

    attention_impl: the config key `attention` ("auto", "xla", "cudnn", "einsum"), resolved for the default
    backend, `dtype` and whether the network is differentiated (`training`) by `resolve_attention`.
    remat_policy: the config key `remat_policy` ("none", "block", "dots"; None follows nnet.use_checkpoint).
    precision: the config group `precision` (which parts stay float32; layers.Precision; None: its defaults).
    activation_sharding: what every Linear's output is constrained to (parallel.activation_sharding; None: nothing).
    """
    cls, kwargs = nnet_kwargs(nnet)
    defaults = inspect.signature(cls.__init__).parameters
    dim, heads = (kwargs.get(k, defaults[k].default) for k in ("embed_dim", "num_heads"))
    policy = Precision(**dict(precision or {}))
    impl = resolve_attention(attention_impl, backend=jax.default_backend(),
                             dtype=policy.part_dtype("attention", dtype), training=training, head_dim=dim // heads)
    model = cls(**kwargs, dtype=dtype, param_dtype=param_dtype, attention_impl=impl, remat_policy=remat_policy,
                precision=policy, rngs=rngs)
    return pin_activations(model, activation_sharding)


def _abstract_model(nnet: Mapping, **kwargs):
    return nnx.eval_shape(lambda: build_model(nnet, **kwargs, rngs=nnx.Rngs(0)))


def init_params(nnet: Mapping, key: jax.Array, *, param_dtype=jnp.float32) -> dict:
    """Freshly initialised parameters as a pure nested dict of arrays. Jittable (key may be traced)."""
    model = build_model(nnet, param_dtype=param_dtype, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(nnet: Mapping, *, param_dtype=jnp.float32) -> dict:
    """The params dict's structure as ShapeDtypeStructs, without allocating (e.g. as an orbax restore target)."""
    return jax.eval_shape(lambda: init_params(nnet, jax.random.key(0), param_dtype=param_dtype))


def count_params(nnet: Mapping) -> int:
    """Number of parameters, computed from shapes only (no allocation)."""
    return int(parameter_overview.count_parameters(abstract_params(nnet)))


def _leaf_paths(tree) -> set[str]:
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def make_apply(nnet: Mapping, *, dtype=jnp.float32, attention_impl: str = "auto", training: bool = False,
               remat_policy: str | None = None, precision: Mapping | None = None,
               activation_sharding: jax.sharding.Sharding | None = None) -> Callable[..., jax.Array]:
    """Pure function `apply(params, x, t, cond=None) -> eps` for the network `nnet`, computing in `dtype`.

    x is NHWC; t (B,) or scalar; cond is the int labels y for class models, the context (B, tokens, clip_dim) for
    text models, and is ignored for unconditional models. Works under jax.jit / jax.grad (w.r.t. params) and
    with sharded params; the graph definition is built once, here. `attention_impl` is the config key
    `attention`; pass `training=True` for the function the loss differentiates (see `resolve_attention`).
    `remat_policy` is the config key of that name (None follows nnet.use_checkpoint); `precision` the config group
    (layers.Precision); `activation_sharding` the FSDP rule for activations (parallel.activation_sharding(mesh)).
    """
    cls, kwargs = nnet_kwargs(nnet)
    uses_cond = cls is UViTT2I or kwargs.get("num_classes", -1) > 0
    graphdef, abstract_state = nnx.split(_abstract_model(nnet, dtype=dtype, attention_impl=attention_impl,
                                                         training=training, remat_policy=remat_policy,
                                                         precision=precision,
                                                         activation_sharding=activation_sharding))
    template = nnx.to_pure_dict(abstract_state)
    structure = jax.tree.structure(template)

    def apply(params: dict, x: jax.Array, t: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        if jax.tree.structure(params) != structure:  # checked while tracing; free under jit
            want, got = _leaf_paths(template), _leaf_paths(params)
            raise ValueError(f"params do not match the network: missing {sorted(want - got)}, "
                             f"unexpected {sorted(got - want)}")
        state = jax.tree.map(lambda v: v, abstract_state)  # fresh Variables: never mutate the shared template
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        return model(x, t, cond) if uses_cond else model(x, t)

    return apply
