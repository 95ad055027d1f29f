"""Will it fit on a TPU pod? A config's programs compiled by XLA:TPU for a Cloud TPU topology, on any machine.

    python main.py --config configs/imagenet256_uvit_l2.py --workdir W --mode benchmark --benchmark_compile_only \
        --benchmark_topology=v5e:2x4 [--benchmark_slices=2]

With libtpu installed, `jax.experimental.topologies.get_topology_desc` gives the abstract devices of a TPU slice
(or of several, over DCN) without a TPU; the run's own mesh (`parallel.make_mesh`), shardings and jitted functions
are lowered from shapes alone and compiled by the TPU compiler, as MaxText's `train_compile.py` does. Compiled:
the train step at the config's global batch; the in-training FID sampler (`eval_mode.training_fid_sampler`) at
`sample.mini_batch_size` per device (or `train.fid_n_samples` padded to the device count, when fewer) and the final
sampler at `sample.mini_batch_size` per device, as `generate.batch_size` sizes them; for latent configs the
autoencoder decode of one final batch (one chip's share: the decode moves nothing between chips).

W/benchmark.json holds per chip (GiB): `memory_estimate_gb` (train step: arguments + temporaries + non-aliased
outputs, as benchmark.py counts them), `sample_memory_estimate_gb` (sample mode: EMA params and autoencoder weights
resident, the larger of the sampler's and the decoder's working set), `fid_memory_estimate_gb` (the same for the
FID sampler, with the whole train state resident as it is during training); `fits` when all three are within the
chip's HBM. XLA:TPU recomputes what it must to fit HBM; a program that still does not fit stops its compile with
the memory it needed, which is reported (and when that is the train step, the samplers are not compiled). Plus
XLA's FLOPs of the train step per image and the bytes its collectives move per step, by kind, within a slice and
across slices (DCN). The cost model's time estimate is not reported: it is not a measurement.
"""
from __future__ import annotations

import collections
import importlib.util
import math
import re
import resource
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from uvit_jax import models, parallel, rng, tpu_env
from uvit_jax.benchmark import flops, make_trainer, memory, synthetic_batch, write_result
from uvit_jax.conditioning import Conditioning
from uvit_jax.rundir import RunDir

LIBTPU_HELP = ('--benchmark_topology needs libtpu (the TPU compiler; Linux x86_64/aarch64): pip install '
               f'"jax[tpu]=={jax.__version__}"')
# HBM per chip, GiB (Cloud TPU system architecture pages: v4, v5e, v5p, v6e). A topology can show one device per
# TensorCore (v4 without megacore): per device, the chip's HBM is shared by its devices.
HBM_GIB_PER_CHIP = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


class TopologyError(ValueError):
    """No libtpu, an unknown topology name or a mesh that does not fit the topology: the message says which."""


_PLANAR = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology_name(name: str) -> str:
    """A topology name as libtpu takes it ("v5e:2x4"), also from a Cloud TPU accelerator type ("v5litepod-8",
    "v6e-16": chips; "v5p-32", "v4-32": TensorCores, two per chip) in its standard slice shape."""
    m = re.fullmatch(r"(v5litepod|v5e|v6e|v5p|v4)-(\d+)", name)
    if not m:
        return name
    gen, n = m.group(1), int(m.group(2))
    if gen in ("v5litepod", "v5e", "v6e"):
        if n not in _PLANAR:
            raise TopologyError(f"{name}: no {gen} slice has {n} chips ({sorted(_PLANAR)})")
        return f"{'v6e' if gen == 'v6e' else 'v5e'}:{_PLANAR[n]}"
    chips, dims = n // 2, [2, 2, 1]
    while math.prod(dims) < chips:  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...: double the last smallest axis
        i = max(a for a in range(3) if dims[a] == min(dims))
        dims[i] *= 2
    if n % 2 or math.prod(dims) != chips:
        raise TopologyError(f"{name}: not a {gen} slice size (TensorCores: 8, 16, 32, 64, 128, ...)")
    return f"{gen}:{'x'.join(map(str, dims))}"


def topology_devices(name: str, slices: int = 1) -> list:
    """The abstract devices of `slices` copies of the TPU slice `name` (e.g. "v5e:2x4", "v5p:4x4x4" or an
    accelerator type, `topology_name`)."""
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(LIBTPU_HELP)
    if slices < 1:
        raise TopologyError(f"--benchmark_slices={slices}: must be >= 1")
    tpu_env.quiet_libtpu_off_tpu()  # in case JAX has not loaded libtpu yet (tests: jax_platforms=cpu)
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(topology_name=topology_name(name), platform="tpu",
                                            **({"num_slices": slices} if slices > 1 else {}))
    except Exception as e:  # libtpu's errors are XlaRuntimeError / JaxRuntimeError with a bare message
        raise TopologyError(f"--benchmark_topology={name}: libtpu does not know this TPU topology "
                            f"({' '.join(str(e).split())[:200]}); e.g. v5e:2x4, v5e:16x16, v5p:2x2x2, v4:2x2x4") from e
    return list(desc.devices)


def hbm_gib_per_device(devices: list) -> float | None:
    """The HBM one device of this topology may use: its chip's HBM over the devices sharing that chip."""
    per_chip = HBM_GIB_PER_CHIP.get(devices[0].device_kind)
    if per_chip is None:
        return None
    chips = len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices})
    return per_chip * chips / len(devices)


def per_device_gib(tree) -> float:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs, in GiB."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves) / 2 ** 30


# ---- collectives read from the compiled HLO text ----

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_DCN = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')


def _shapes_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) * _BYTES[t] for t, dims in _SHAPE.findall(text)]


def _replica_groups(line: str) -> list[list[int]] | None:
    """The device groups of a collective: explicit {{0,1},{2,3}} or iota [G,S]<=[dims]T(perm) form."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        g, s = int(m.group(1)), int(m.group(2))
        ids = np.arange(g * s).reshape([int(d) for d in m.group(3).split(",")])
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(g, s).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
    if m:
        return [[int(i) for i in grp.split(",") if i] for grp in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return None


def _times_run(comps: dict, entry: str) -> collections.Counter:
    """How often each computation runs per execution: a while body with a known trip count (the gradient-
    accumulation scan) that many times per run of its caller."""
    calls = collections.defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = _TRIP.search(line)
            for kind, callee in _CALLS.findall(line):
                calls[name].append((callee, int(trip.group(1)) if trip and kind == "body" else 1))
            for group in _BRANCHES.findall(line):
                calls[name].extend((c.strip().lstrip("%"), 1) for c in group.split(","))
    order, seen = [entry], {entry}
    for name in order:  # breadth-first, so callers come before callees (HLO's call graph is a DAG)
        for callee, _ in calls[name]:
            if callee not in seen:
                seen.add(callee)
                order.append(callee)
    times = collections.Counter({entry: 1})
    for name in order:
        for callee, n in calls[name]:
            times[callee] += times[name] * n
    return times


def collective_bytes(hlo_text: str, slice_of_device: list[int] | None = None) -> dict:
    """Bytes per execution moved by each kind of collective of a compiled (SPMD, per-device) TPU HLO module.

    A collective counts the size of its full buffer on one device (the all-gather's result, the reduce-scatter's
    operand, the all-reduce's and all-to-all's result) times how often it runs (`_times_run`). With
    `slice_of_device` (the slice of each device of the program, in device-assignment order) each kind is split
    into "within_slice" (ICI) and "across_slices": XLA:TPU moves those over DCN as host-transfer sends to the
    Megascale runtime, which name the collective they implement."""
    comps, sizes, entry, current = {}, {}, None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and " = " not in line:
            current = m.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and (ins := _INSTRUCTION.match(line)):
            comps[current].append(line)
            sizes[ins.group(1)] = _shapes_bytes(ins.group(2))
    times = _times_run(comps, entry)
    out = {kind: {} for kind in COLLECTIVES}

    def add(kind, where, n):
        out[kind][where] = out[kind].get(where, 0) + n

    for name, lines in comps.items():
        for line in lines:
            name_, result, op, rest = _INSTRUCTION.match(line).groups()
            dcn = _DCN.search(line) if op == "send" else None
            if dcn:  # (operand, context, token): the operand crosses slices
                add(dcn.group(1).lower().replace("_", "-"), "across_slices", sizes[name_][0] * times[name])
                continue
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            operands = sum(sum(sizes.get(o, [0])) for o in re.findall(r"%([\w.\-]+)", rest.split(")")[0]))
            result_bytes = sum(sizes[name_])
            size = {"reduce-scatter": operands,
                    "all-gather": result_bytes - operands if op.endswith("-start") else result_bytes}.get(kind,
                                                                                                        result_bytes)
            where = "total"
            if slice_of_device is not None:
                groups = _replica_groups(line) or [list(range(len(slice_of_device)))]
                spans = any(len({slice_of_device[i] for i in g}) > 1 for g in groups)
                where = "across_slices" if spans else "within_slice"
            add(kind, where, size * times[name])
    return out


# ---- the programs ----

def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Program(NamedTuple):
    compiled: Any  # None when the program does not fit in HBM
    seconds: float
    memory_gb: float  # per device: memory_analysis's estimate, or what the compiler said it needed beyond HBM


_OUT_OF_HBM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)|Used ([\d.]+)([KMGT]) of")


def _compile(lowered, what: str) -> Program:
    """XLA:TPU rematerialises (recomputes) what it must to fit the chip's HBM; a program that still does not fit
    stops the compile with RESOURCE_EXHAUSTED and the memory it needed, which is kept here."""
    logging.info("XLA:TPU compiling the %s ...", what)  # minutes each on a CPU: say what the wait is for
    t0 = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        m = _OUT_OF_HBM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        number, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        needed = float(number) * 1024 ** "KMGT".index(unit) / 2 ** 20
        logging.info("  %s: out of HBM, needs %.2f GiB per chip (%.0f s)", what, needed, time.time() - t0)
        return Program(None, time.time() - t0, needed)
    program = Program(compiled, time.time() - t0, memory(compiled)["memory_estimate_gb"])
    logging.info("  %s: %.2f GiB per chip (%.0f s)", what, program.memory_gb, program.seconds)
    return program


def _sampler_programs(config, mesh, ema) -> dict:
    """Compiled final sampler, FID sampler and (latent configs) decoder over `mesh`, at their batch sizes."""
    from uvit_jax import eval_mode, generate, latent
    from uvit_jax.train_step import make_apply
    n = mesh.size
    batch = int(config.sample.mini_batch_size) * n  # generate.batch_size on this mesh's device count
    fid_batch = min(batch, -(-int(config.train.fid_n_samples) // n) * n)
    cond = Conditioning.from_config(config)
    null_context = np.zeros(cond.context_shape, np.float32) if cond.kind == "text" else None
    shape = generate.image_shape(config)
    key = _abstract(jax.eval_shape(lambda: rng.stream_key(0, rng.SAMPLE, 0)), parallel.replicated(mesh))

    def condition(rows):
        if cond.kind == "class":
            return jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=parallel.batch_sharding(mesh))
        if cond.kind == "text":
            return jax.ShapeDtypeStruct((rows, *cond.context_shape), jnp.float32,
                                        sharding=parallel.batch_sharding(mesh))
        return None

    def program(settings, rows, what):
        fn = generate.make_generate_from_config(config, make_apply(config, mesh=mesh), image_shape=shape,
                                                settings=settings, null_context=null_context)
        return _compile(generate.jit_generate(fn, rows, mesh).lower(ema, key, condition(rows)),
                        f"{what} ({rows // n} images per chip)")

    out = {"sample_batch": batch, "fid_batch": fid_batch, "sample": program(None, batch, "final sampler"),
           "fid": program(eval_mode.training_fid_sampler(config), fid_batch, "FID sampler")}
    if latent.is_latent(config):
        from uvit_jax.models.autoencoder import FrozenAutoencoderKL
        ae = config.autoencoder
        module = nnx.eval_shape(lambda: FrozenAutoencoderKL(ae.ddconfig.to_dict(), ae.embed_dim, ae.scale_factor,
                                                            rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(module)
        # The decode moves nothing between chips (weights replicated, images split by batch), so every chip runs
        # the same program: one chip's, compiled on one device at the batch per chip (the TPU compiler takes
        # minutes for this decoder even at one image; there is no partitioning to add to that).
        one_chip = parallel.make_mesh(1, [mesh.devices.flat[0]])
        weights = _abstract(state, parallel.replicated(one_chip))
        z = jax.ShapeDtypeStruct((batch // n, *shape), jnp.float32, sharding=parallel.batch_sharding(one_chip))
        decode = jax.jit(lambda s, x: nnx.merge(graphdef, s).decode(x),  # as latent.make_decoder
                         out_shardings=parallel.batch_sharding(one_chip))
        with jax.default_matmul_precision("highest"):
            out["decode"] = _compile(decode.lower(weights, z), f"autoencoder decode ({batch // n} per chip)")
        out["decoder_weights_gb"] = per_device_gib(weights)
    return out


def run(config, workdir: str, topology: str, slices: int = 1) -> dict:
    """Compile the run's programs for `slices` x `topology`; write and return WORKDIR/benchmark.json's figures."""
    # JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) stores a program compiled for a topology but
    # cannot load it back without a TPU client ("PjRtCompiler must be constructed with a Client", a warning per
    # program): leave it out rather than fill it with entries no run can use.
    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _run(config, workdir, topology, slices)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)


def _run(config, workdir: str, topology: str, slices: int) -> dict:
    devices = topology_devices(topology, slices)
    try:
        mesh = parallel.make_mesh(config.mesh.fsdp, devices)
    except ValueError as e:
        raise TopologyError(f"config.mesh.fsdp={config.mesh.fsdp} on {topology}: {e}") from e
    trainer = make_trainer(config, mesh)
    global_batch = config.train.batch_size
    abstract_batch = {k: jax.ShapeDtypeStruct((global_batch, *v.shape[1:]), v.dtype, sharding=trainer.batch_sharding)
                      for k, v in synthetic_batch(config, 1).items()}
    state = trainer.abstract_with_shardings()
    logging.info("Compiling for %s%s (%d %s chips, mesh %s) on this machine's CPU: 5 to 35 minutes for a paper "
                 "config", topology_name(topology), f" x {slices} slices" if slices > 1 else "", len(devices),
                 devices[0].device_kind, dict(mesh.shape))
    train = _compile(trainer.step_fn.lower(state, abstract_batch),
                     f"train step ({global_batch // len(devices)} images per chip)")
    train_mem = memory(train.compiled) if train.compiled else {"memory_estimate_gb": train.memory_gb}
    ema_gb, state_gb = per_device_gib(state["ema_params"]), per_device_gib(state)
    # A train step out of HBM already settles it: the samplers are not compiled (the launcher's check stays short).
    programs = _sampler_programs(config, mesh, state["ema_params"]) if train.compiled else {}
    if not train.compiled:
        logging.info("The samplers are not compiled: the train step does not fit already")
    sample_gb = fid_gb = decode_gb = None
    if programs:
        ae_gb = programs.get("decoder_weights_gb", 0.0)
        decode_gb = programs["decode"].memory_gb if "decode" in programs else 0.0
        # Resident while one program runs: the other program's weights (and, in training, the whole state).
        sample_gb = max(programs["sample"].memory_gb + ae_gb, decode_gb + ema_gb)
        fid_gb = max(programs["fid"].memory_gb - ema_gb + state_gb + ae_gb, decode_gb + state_gb)
    hbm = hbm_gib_per_device(devices)
    slice_of = [getattr(d, "slice_index", 0) for d in mesh.devices.flat]
    nnet = dict(config.nnet)
    result = {
        "topology": topology_name(topology), "device_kind": devices[0].device_kind, "devices": len(devices),
        "slices": slices,
        "mesh": dict(mesh.shape), "dtype": config.dtype, "remat_policy": config.get("remat_policy", None),
        "use_checkpoint": bool(nnet.get("use_checkpoint", False)),
        "grad_accum_steps": int(config.train.grad_accum_steps), "global_batch": global_batch,
        "per_device_batch": global_batch // len(devices), "params": int(models.count_params(nnet)),
        "train_state_gb": state_gb, **train_mem,
        "sample_batch": programs.get("sample_batch"), "fid_batch": programs.get("fid_batch"),
        "sample_memory_estimate_gb": sample_gb,
        "fid_memory_estimate_gb": fid_gb, "decode_memory_estimate_gb": decode_gb if "decode" in programs else None,
        "hbm_gb": hbm,
        "fits": None if hbm is None else all(gb is not None and gb <= hbm
                                             for gb in (train_mem["memory_estimate_gb"], sample_gb, fid_gb)),
        "compile_s": train.seconds,
        "sample_compile_s": sum(programs[k].seconds for k in ("sample", "fid", "decode") if k in programs) or None,
        # A train step out of HBM has no compiled program to count.
        "xla_train_step_flops_per_image": flops(train.compiled) / global_batch * len(devices) if train.compiled
        else None,
        "collectives": collective_bytes(train.compiled.as_text(), slice_of if slices > 1 else None)
        if train.compiled else None,
        "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    }
    write_result(workdir, result)
    gib = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    verdict = {True: "fits", False: "does NOT fit", None: "fit unknown"}[result["fits"]]
    logging.info("%s on %s: train step %s, sample mode %s, training with FID %s GiB per chip of %s HBM -> %s",
                 verdict, result["topology"], gib(train_mem["memory_estimate_gb"]), gib(sample_gb), gib(fid_gb),
                 gib(hbm), RunDir(workdir).benchmark)
    return result
