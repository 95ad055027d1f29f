"""Analytic forward cost of U-ViT: multiply-accumulates per sample (matmuls, convs, attention QKᵀ and AV).

Counts what torch.utils.flop_counter counts on the official module (docs/official_behaviour.md §1.4): element-wise
ops, LayerNorm, softmax and the embedding lookup are free. FLOPs = 2 × MACs; the paper's "GFLOPs" are these GMACs.
"""
from __future__ import annotations

from collections.abc import Mapping


def forward_macs(nnet: Mapping) -> int:
    """MACs of one forward pass for one sample of the network described by `nnet` (a preset-style dict)."""
    nnet = dict(nnet)
    name = nnet.get("name", "uvit")
    img, p = nnet["img_size"], nnet["patch_size"]
    c, d = nnet.get("in_chans", 3), nnet.get("embed_dim", 768)
    depth, ratio = nnet.get("depth", 12), nnet.get("mlp_ratio", 4.0)
    n = (img // p) ** 2
    if name == "uvit_t2i":
        ctx = nnet.get("num_clip_token", 77)
        extras = 1 + ctx
        cond = ctx * nnet.get("clip_dim", 768) * d  # context_embed
    else:
        extras = 2 if nnet.get("num_classes", -1) > 0 else 1
        cond = 0  # label embedding is a lookup
    tokens = extras + n
    hidden = int(d * ratio)

    macs = n * c * p * p * d + cond  # patch_embed conv
    if nnet.get("mlp_time_embed", False):
        macs += 2 * d * 4 * d  # one time token
    per_block = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * hidden
    macs += (2 * (depth // 2) + 1) * per_block
    if nnet.get("skip", True):
        macs += (depth // 2) * tokens * 2 * d * d  # skip_linear
    macs += tokens * d * p * p * c  # decoder_pred runs on every token before the extras are dropped
    if nnet.get("conv", True):
        macs += img * img * c * c * 9
    return macs
