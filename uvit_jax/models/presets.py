"""The ten official U-ViT network configs (docs/official_behaviour.md §1, §2), as constructor kwargs plus "name".

"name" is "uvit" (UViT: unconditional / class-conditional) or "uvit_t2i" (UViTT2I: text). Parameter counts and
MACs of each are pinned in tests against the instantiated official modules (tests/fixtures/uvit_param_counts.json).
"""
from __future__ import annotations


def _uvit(img_size, patch_size, embed_dim, depth, num_heads, *, in_chans=3, num_classes=-1, conv=True,
          use_checkpoint=False):
    return dict(name="uvit", img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False,
                num_classes=num_classes, conv=conv, use_checkpoint=use_checkpoint)


def _uvit_t2i(depth):
    return dict(name="uvit_t2i", img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=depth, num_heads=8,
                mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77, conv=True,
                use_checkpoint=False)


PRESETS: dict[str, dict] = {
    "cifar10_uvit_small": _uvit(32, 2, 512, 12, 8),
    "celeba64_uvit_small": _uvit(64, 4, 512, 12, 8),
    "imagenet64_uvit_mid": _uvit(64, 4, 768, 16, 12, num_classes=1000, use_checkpoint=True),
    "imagenet64_uvit_large": _uvit(64, 4, 1024, 20, 16, num_classes=1000, use_checkpoint=True),
    # Latent models (4×32×32 / 4×64×64 KL-f8 latents); 1001 labels = 1000 classes + the CFG null label 1000.
    "imagenet256_uvit_large": _uvit(32, 2, 1024, 20, 16, in_chans=4, num_classes=1001, use_checkpoint=True),
    "imagenet256_uvit_huge": _uvit(32, 2, 1152, 28, 16, in_chans=4, num_classes=1001, conv=False,
                                   use_checkpoint=True),
    "imagenet512_uvit_large": _uvit(64, 4, 1024, 20, 16, in_chans=4, num_classes=1001, use_checkpoint=True),
    "imagenet512_uvit_huge": _uvit(64, 4, 1152, 28, 16, in_chans=4, num_classes=1001, conv=False,
                                   use_checkpoint=True),
    "mscoco_uvit_small": _uvit_t2i(12),
    "mscoco_uvit_small_deep": _uvit_t2i(16),
}
