"""Official checkpoint conversion: .pth reading/writing without torch, strict name/layout mapping, the CLI."""
import json
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from uvit_jax import parallel
from uvit_jax.convert import (from_official, load_converted, load_state_dict, load_torch_file, params_from_official,
                              params_to_official, save_torch_file, to_official)
from uvit_jax.convert import save_converted

FIX = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIX / "uvit_manifest.json").read_text())
CASES = ["cls_d5_conv_perturbed", "t2i_small_perturbed"]


def case(name):
    """(official ctor kwargs, official state dict as numpy) of one reference case."""
    return MANIFEST[name]["ctor_kwargs"], load_state_dict(FIX / f"uvit_{name}.params.npz")


def nnet_of(kwargs):
    return dict(kwargs, name="uvit_t2i" if "clip_dim" in kwargs else "uvit")


def assert_same_state_dict(a, b):
    assert list(a) == list(b)  # same keys, in the official order
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", CASES)
def test_official_roundtrip_is_bit_exact(name, tmp_path):
    kwargs, sd = case(name)
    assert_same_state_dict(to_official(from_official(sd, **kwargs)), sd)
    params = params_from_official(sd, nnet_of(kwargs))
    assert params["patch_embed"]["proj"]["kernel"].shape == (2, 2, kwargs["in_chans"], 64)  # OIHW -> HWIO
    assert params["in_blocks"][0]["attn"]["qkv"]["kernel"].shape == (64, 192)  # (out, in) -> (in, out)
    assert_same_state_dict(params_to_official(params, nnet_of(kwargs)), sd)
    save_torch_file(sd, tmp_path / "nnet_ema.pth")
    assert_same_state_dict(load_state_dict(tmp_path / "nnet_ema.pth"), sd)


def test_reads_real_torch_file(tmp_path):
    """tests/fixtures/uvit_torch_written.pth was written by torch 2.13 torch.save (views, offsets, dtypes)."""
    sd = load_torch_file(FIX / "uvit_torch_written.pth")
    base = np.arange(35, dtype=np.float32).reshape(5, 7) / 8 - 2
    expected = {
        "w_t": base.T, "w_slice": base[1:4, 2:6],
        "half": np.array([1.5, -2.25, 65504.0, 6e-5], np.float16),
        "bf16": np.array([1.0, -3.140625, 1e30], ml_dtypes.bfloat16),
        "f64": np.array([[1 / 3, -2.5e-300]]), "i64": np.array([-1, 2 ** 40, 7]),
        "scalar": np.array(3.25, np.float32), "empty": np.zeros((0, 3), np.float32),
        "param.weight": np.array([[0.5, -1.0, 2.0], [4.0, 8.0, -16.0]], np.float32),
    }
    assert_same_state_dict(sd, expected)
    # ... and what we write reads back identically (torch.load reads it too: checked once with torch 2.13).
    path = tmp_path / "ours.pth"
    save_torch_file(sd, path)
    assert_same_state_dict(load_torch_file(path), expected)
    with zipfile.ZipFile(path) as zf:  # records 64-byte aligned, as torch writes them (mmap loading)
        for info in zf.infolist():
            assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0


def test_mismatched_checkpoints_raise_clear_errors():
    kwargs, sd = case(CASES[0])
    nnet = nnet_of(kwargs)
    missing = dict(sd)
    del missing["out_blocks.1.skip_linear.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['out_blocks.1.skip_linear.weight'\]"):
        params_from_official(missing, nnet)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        params_from_official(dict(sd, **{"extra.weight": np.zeros(3)}), nnet)
    bad = dict(sd, **{"mid_block.mlp.fc1.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(ValueError, match=r"'mid_block.mlp.fc1.weight'.*\(128, 64\).*\(256, 64\)"):
        params_from_official(bad, nnet)
    with pytest.raises(ValueError, match=r"missing keys \['label_emb.weight'\]"):
        from_official({k: v for k, v in sd.items() if k != "label_emb.weight"}, **kwargs)
    # A checkpoint of another network (here two blocks deeper) lists the first keys of each kind and counts the rest.
    deeper = nnet_of(dict(kwargs, depth=kwargs["depth"] + 2))
    with pytest.raises(ValueError, match=r"missing keys \['in_blocks\.\d.*, \.\.\. \(\+\d+ more\)\], "
                                         r"unexpected keys \[\]") as err:
        params_from_official(sd, deeper)
    assert str(err.value).count("blocks.") == 10
    with pytest.raises(ValueError, match=r"shape mismatch for 'pos_embed'"):
        from_official(sd, **dict(kwargs, img_size=16))
    # A DataParallel-saved checkpoint ("module." prefix) converts like the plain one.
    prefixed = {"module." + k: v for k, v in sd.items()}
    assert_same_state_dict(params_to_official(params_from_official(prefixed, nnet)), sd)
    params = params_from_official(sd, nnet)
    params["decoder_pred"]["kernel"] = np.zeros((64, 13), np.float32)
    del params["out_blocks"][0]["skip_linear"]
    with pytest.raises(ValueError, match=r"missing out_blocks.0.skip_linear.bias.*"
                                         r"decoder_pred.weight: shape \(64, 13\), expected \(64, 12\)"):
        params_to_official(params, nnet)


def test_non_checkpoints_raise_clear_errors(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match=f"{text} is not a PyTorch checkpoint"):
        load_state_dict(text)
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        load_state_dict(tmp_path / "nope.pth")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="legacy"):
        load_state_dict(legacy)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(ValueError, match="no <name>/data.pkl"):
        load_state_dict(other_zip)
    # A pickle that would call a foreign function is refused, not run.
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(print, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"evil.pth: refusing to unpickle .*print"):
        load_state_dict(evil)


def test_float64_weights_roundtrip():
    kwargs, sd = case(CASES[1])
    sd64 = {k: v.astype(np.float64) + 1e-12 for k, v in sd.items()}  # values float32 cannot hold
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        model = from_official(sd64, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
        assert_same_state_dict(to_official(model), sd64)
    finally:
        jax.config.update("jax_enable_x64", before)


def test_converted_dir_roundtrip(tmp_path):
    """official .pth -> converted dir (what `main.py --mode convert` writes) -> official, bit-exact; FSDP restore."""
    kwargs, sd = case(CASES[0])
    out_dir = tmp_path / "converted"
    pth = tmp_path / "nnet_ema.pth"
    save_torch_file(sd, pth)
    save_converted(out_dir, params_from_official(load_state_dict(pth), nnet_of(kwargs)), nnet_of(kwargs))
    nnet, params = load_converted(out_dir)
    assert nnet == nnet_of(kwargs) and json.loads((out_dir / "nnet.json").read_text()) == nnet
    assert_same_state_dict(params_to_official(params, nnet), sd)
    # Restored straight onto an FSDP layout when shardings are given.
    mesh = parallel.make_mesh(fsdp=2)
    shardings = jax.tree.map(lambda a: parallel.param_sharding(a.shape, mesh, min_size=1), params)
    _, sharded = load_converted(out_dir, shardings=shardings)
    assert sharded["mid_block"]["mlp"]["fc1"]["kernel"].sharding == shardings["mid_block"]["mlp"]["fc1"]["kernel"]
    assert_same_state_dict(params_to_official(jax.tree.map(np.asarray, sharded), nnet), sd)
    back = tmp_path / "back.pth"
    save_torch_file(params_to_official(params, nnet), back)
    assert_same_state_dict(load_torch_file(back), sd)


def test_reads_legacy_torch_file(tmp_path):
    """tests/fixtures/uvit_torch_legacy.pth: the same tensors torch.save'd in the legacy (pre-1.6) format."""
    legacy = load_torch_file(FIX / "uvit_torch_legacy.pth")
    assert_same_state_dict(legacy, load_torch_file(FIX / "uvit_torch_written.pth"))  # values pinned above
    base = np.arange(35, dtype=np.float32).reshape(5, 7) / 8 - 2
    np.testing.assert_array_equal(legacy["w_t"], base.T)  # non-contiguous view of a shared storage
    np.testing.assert_array_equal(legacy["w_slice"], base[1:4, 2:6])  # storage offset 9
    assert legacy["i64"].dtype == np.int64 and legacy["i64"][1] == 2 ** 40
    assert legacy["half"].dtype == np.float16 and legacy["half"][2] == 65504.0
    assert_same_state_dict(load_state_dict(FIX / "uvit_torch_legacy.pth"), legacy)
    data = (FIX / "uvit_torch_legacy.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated.pth: truncated legacy PyTorch file"):
        load_torch_file(truncated)
    bad_version = tmp_path / "bad_version.pth"  # protocol version 1001 is pickled as BININT2 0x03e9
    bad_version.write_bytes(data.replace(b"M\xe9\x03", b"M\xea\x03", 1))
    with pytest.raises(ValueError, match="unsupported legacy PyTorch protocol version 1002"):
        load_torch_file(bad_version)
