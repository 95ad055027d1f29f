"""Convert official U-ViT checkpoints to this project's format, and back.

  python -m uvit_jax.convert --preset imagenet256_uvit_huge --input nnet_ema.pth --output DIR
  python -m uvit_jax.convert --nnet '{"name": "uvit", "img_size": 32, ...}' --input w.npz --output DIR
  python -m uvit_jax.convert --preset cifar10_uvit_small --nnet.depth=16 --input w.pth --output DIR
  python -m uvit_jax.convert --to-official --input DIR --output nnet_ema.pth      (or .npz)

--input takes a torch.save'd state dict (.pth, read without torch) or an .npz under the official names.
The output DIR holds `params` (orbax StandardCheckpointer, float32 pure dict) and `nnet.json` (the network kwargs
plus "name"); see uvit_jax.convert.uvit. `--to-official` reads such a DIR and writes a .pth that the official
code loads with `nnet.load_state_dict(torch.load(path))`.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from uvit_jax.convert.pth import load_state_dict, save_torch_file
from uvit_jax.convert.uvit import load_converted, params_from_official, params_to_official, save_converted
from uvit_jax.models import PRESETS, count_params, nnet_kwargs


def _parse_value(text: str):
    """'16' -> 16, 'false'/'False' -> False, 'null'/'None' -> None, anything else stays a string."""
    python_words = {"True": True, "False": False, "None": None}
    if text in python_words:
        return python_words[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_nnet(preset: str | None, nnet_json: str | None, overrides: list[str]) -> dict:
    """Network kwargs from a preset name and/or a JSON object, then `--nnet.KEY=VALUE` overrides; validated."""
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    nnet = dict(PRESETS[preset]) if preset else {}
    if nnet_json:
        nnet.update(json.loads(nnet_json))
    for item in overrides:
        if not item.startswith("--nnet.") or "=" not in item:
            raise SystemExit(f"unrecognised argument {item!r} (network overrides are --nnet.KEY=VALUE)")
        key, value = item[len("--nnet."):].split("=", 1)
        nnet[key] = _parse_value(value)
    if not nnet:
        raise SystemExit("say which network the checkpoint is for: --preset NAME or --nnet JSON")
    nnet.setdefault("name", "uvit_t2i" if "clip_dim" in nnet else "uvit")
    try:
        nnet_kwargs(nnet)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return nnet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uvit_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="official network config")
    parser.add_argument("--nnet", help="network kwargs as a JSON object (applied over --preset)")
    parser.add_argument("--input", required=True, help=".pth/.npz state dict, or a converted DIR (--to-official)")
    parser.add_argument("--output", required=True, help="converted DIR, or .pth/.npz (--to-official)")
    parser.add_argument("--to-official", action="store_true", help="convert DIR back to an official state dict")
    args, overrides = parser.parse_known_args(argv)

    if args.to_official:
        nnet, params = load_converted(args.input)
        state_dict = params_to_official(jax.tree.map(np.asarray, params), nnet)
        if args.output.endswith(".npz"):
            np.savez(args.output, **state_dict)
        else:
            save_torch_file(state_dict, args.output)
        n = sum(v.size for v in state_dict.values())
        print(f"wrote {len(state_dict)} tensors ({n:,} parameters, {nnet['name']}) to {args.output}")
        return 0

    nnet = resolve_nnet(args.preset, args.nnet, overrides)
    try:
        params = params_from_official(load_state_dict(args.input), nnet)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"conversion failed: {e}") from None
    save_converted(args.output, params, nnet)
    print(f"converted {args.input} -> {args.output}: {nnet['name']}, {count_params(nnet):,} parameters\n"
          f"network: {json.dumps(nnet, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
