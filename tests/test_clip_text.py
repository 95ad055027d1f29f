"""CLIP text encoder: equivalence with transformers' CLIPTextModel, strict HF conversion, the tokenizer."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
import safetensors.numpy
from flax import nnx

from uvit_jax.convert import clip_text_from_hf, load_state_dict, save_torch_file
from uvit_jax.convert.clip_text import params_from_hf
from uvit_jax.models.clip_text import CLIPTextModel
from uvit_jax.models.clip_tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, load_vocab, tokenize

FIX = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIX / "clip_text_manifest.json").read_text())
CASE = MANIFEST["clip_small_a"]
CONFIG = CASE["config_kwargs"]  # CLIPTextConfig kwargs, including fields that do not affect the output
PARAMS = FIX / "clip_text_small_a.params.npz"  # text_model.* keys, as in openai/clip-vit-large-patch14
IO = np.load(FIX / "clip_text_small_a.io.npz")


def run(model, ids):
    return np.asarray(jax.jit(lambda m, x: m(x))(model, ids))


def full_clip_layout(sd):
    """A CLIPModel-style state dict: the text tower plus image-tower / head tensors and the position_ids buffer."""
    return {**sd, "text_model.embeddings.position_ids": np.arange(77)[None],
            "vision_model.embeddings.class_embedding": np.zeros(8, np.float32),
            "vision_model.post_layernorm.weight": np.ones(8, np.float32),
            "visual_projection.weight": np.zeros((4, 8), np.float32),
            "text_projection.weight": np.zeros((4, 64), np.float32), "logit_scale": np.array(2.6592, np.float32)}


def test_matches_transformers_float32():
    model = clip_text_from_hf(PARAMS, **CONFIG)
    out = run(model, IO["input_ids"])
    assert out.shape == (2, 77, 64) and out.dtype == np.float32
    err = rel_err(out, IO["last_hidden_state_f32"])
    print(f"CLIP text float32 max rel err {err:.3e}")
    assert err <= 1e-5


def test_matches_transformers_float64(x64):
    model = clip_text_from_hf(PARAMS, dtype=jnp.float64, param_dtype=jnp.float64, **CONFIG)
    ids = jnp.asarray(IO["input_ids"])
    out = run(model, ids)
    assert out.dtype == np.float64
    err = rel_err(out, IO["last_hidden_state_f64"])
    print(f"CLIP text float64 max rel err {err:.3e}")
    assert err <= 1e-12  # float64 throughout: a float32 softmax or LayerNorm would show as ~1e-7
    # hidden_states[0] is the embeddings' output (token + position), before any layer.
    assert rel_err(model.embeddings(ids), IO["hidden_states_f64"][0]) <= 1e-12


def test_causal_without_padding_mask():
    """Position i sees ids 0..i only, and end-token padding is attended like any token (no attention_mask)."""
    model = clip_text_from_hf(PARAMS, **CONFIG)
    ids = IO["input_ids"][1:2]  # 23 caption tokens, then end-token padding
    changed = ids.copy()
    changed[0, 40] = 500  # inside the padding
    a, b = run(model, ids), run(model, changed)
    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert (np.abs(a[0, 40:] - b[0, 40:]).max(axis=-1) > 0).all()
    assert not np.allclose(a[0, 30], a[0, 31])  # two pad positions differ: position embedding + context


def test_param_counts():
    full = nnx.eval_shape(lambda: CLIPTextModel(rngs=nnx.Rngs(0)))  # ViT-L/14's text tower, nothing allocated
    count = sum(x.size for x in jax.tree.leaves(nnx.state(full, nnx.Param)))
    assert count == MANIFEST["_full_size_clip_vit_l14_text"]["n_params_CLIPTextModel"] == 123_060_480
    small = clip_text_from_hf(PARAMS, **CONFIG)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param))) == CASE["n_params"]
    assert not jax.tree.leaves(nnx.state(small, nnx.Not(nnx.Param)))  # no RNG state to trip orbax


def test_key_layouts_and_files(tmp_path):
    sd = load_state_dict(PARAMS)
    want = params_from_hf(sd, CONFIG)
    assert want["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"].shape == (64, 256)  # (out, in) -> (in, out)
    np.testing.assert_array_equal(want["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"],
                                  sd["text_model.encoder.layers.0.mlp.fc1.weight"].T)
    text_only = {k[len("text_model."):]: v for k, v in sd.items()}
    layouts = {"CLIPModel": full_clip_layout(sd), "CLIPTextModel without prefix": text_only,
               "unprefixed with buffer": {**text_only, "embeddings.position_ids": np.arange(77)[None]}}
    for name, layout in layouts.items():
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name), params_from_hf(layout, CONFIG),
                     want)
    safetensors.numpy.save_file(full_clip_layout(sd), str(tmp_path / "model.safetensors"))
    save_torch_file(full_clip_layout(sd), tmp_path / "pytorch_model.bin")
    ref = run(clip_text_from_hf(PARAMS, **CONFIG), IO["input_ids"])
    for source in [tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin", tmp_path]:  # dir: safetensors
        np.testing.assert_array_equal(run(clip_text_from_hf(source, **CONFIG), IO["input_ids"]), ref)


def test_mismatched_checkpoints_raise_clear_errors(tmp_path):
    sd = load_state_dict(PARAMS)
    missing = {k: v for k, v in sd.items() if k != "text_model.final_layer_norm.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['text_model.final_layer_norm.bias'\]"):
        params_from_hf(missing, CONFIG)
    extra = {**sd, "text_model.encoder.layers.2.mlp.fc1.weight": np.zeros((256, 64), np.float32)}
    with pytest.raises(ValueError, match=r"unexpected keys \['text_model.encoder.layers.2.mlp.fc1.weight'\]"):
        params_from_hf(extra, CONFIG)
    with pytest.raises(ValueError, match=r"unexpected keys \['final_layer_norm.weight'\]"):  # outside the prefix
        params_from_hf({**sd, "final_layer_norm.weight": np.ones(64, np.float32)}, CONFIG)
    bad = {**sd, "text_model.encoder.layers.1.mlp.fc1.weight": np.zeros((128, 64), np.float32)}
    with pytest.raises(ValueError, match=r"'text_model.encoder.layers.1.mlp.fc1.weight'.*\(128, 64\).*\(256, 64\)"):
        params_from_hf(bad, CONFIG)
    no_prefix = {k[len("text_model."):]: v for k, v in sd.items() if "position_embedding" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['embeddings.position_embedding.weight'\]"):
        clip_text_from_hf(no_prefix, **CONFIG)
    with pytest.raises(ValueError, match=r"missing keys \['text_model.encoder.layers.2"):
        clip_text_from_hf(sd, **dict(CONFIG, num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"shape mismatch for 'text_model.embeddings.token_embedding.weight'"):
        clip_text_from_hf(sd, **dict(CONFIG, vocab_size=49408))
    with pytest.raises(ValueError, match=r"unknown CLIP text config option\(s\) \['num_layers'\]"):
        clip_text_from_hf(sd, **dict(CONFIG, num_layers=2))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        clip_text_from_hf(sd, **dict(CONFIG, hidden_act="relu"))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        clip_text_from_hf(tmp_path, **CONFIG)


def test_tokenizer_matches_transformers():
    """Ids of transformers' CLIPTokenizer (4.23.1 with ftfy 6.1.1, U-ViT's environment), made by
    tests/fixtures/clip_tokenizer_make_fixture.py."""
    cases = json.loads((FIX / "clip_tokenizer_ids.json").read_text())["cases"]
    captions = [c["caption"] for c in cases]
    assert len(captions) >= 50 and "" in captions
    ids = tokenize(captions)
    assert ids.shape == (len(captions), 77) and ids.dtype == np.int32
    for caption, got, case in zip(captions, ids, cases):
        assert got.tolist() == case["input_ids"], caption
    assert ids[captions.index("")].tolist() == [BOS_ID] + [EOS_ID] * 76  # U-ViT's null context
    too_long = ids[captions.index("a " * 80)]
    assert too_long[0] == BOS_ID and too_long[76] == EOS_ID and (too_long[1:76] == too_long[1]).all()


def test_tokenizer_vocabulary_and_errors():
    vocab, merges = load_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == BOS_ID
    assert tokenize([]).shape == (0, 77)
    with pytest.raises(TypeError, match="list of strings"):
        tokenize("a cat")
    short = CLIPTokenizer(context_length=8)(["a b c d e f g h i"])  # truncated, the end token kept
    assert short.tolist() == [tokenize(["a b c d e f"])[0, :7].tolist() + [EOS_ID]]
