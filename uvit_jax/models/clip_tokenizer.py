"""CLIP's BPE tokenizer, giving the ids U-ViT feeds its CLIP text encoder (docs/official_behaviour.md §6.4).

U-ViT's `libs/clip.py` calls the slow `transformers.CLIPTokenizer` of openai/clip-vit-large-patch14 with
`padding="max_length", max_length=77, truncation=True`, in an environment with ftfy (its README pins ftfy==6.1.1,
transformers==4.23.1), so the text is cleaned as `ftfy.fix_text(text)`, runs of whitespace -> one space, stripped,
lowercased. Then: the CLIP regex split (contractions, letter runs, single digits, other non-space runs), GPT-2's
byte-to-character map, BPE with a `</w>` end-of-word marker; ids are wrapped as [<|startoftext|> = 49406, up to 75
tokens, <|endoftext|> = 49407] and padded to 77 with 49407 (that checkpoint's pad token is <|endoftext|>).

The cleaning runs in Python (ftfy is Python, and Python's `str.lower` handles the Greek final sigma as transformers
does); the split, byte map, BPE, truncation and padding run in the `tokenizers` library.

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (assets/, MIT licence, Copyright (c) 2021 OpenAI;
taken from the clip-anytorch 2.6.0 wheel): ids 0-255 the 256 byte characters, 256-511 the same with `</w>`, then
one token per merge (the first 48894 merges after the header line), then the two special tokens: 49408 in all.
"""
from __future__ import annotations

import functools
import gzip
import os
import pathlib
import re
from collections.abc import Sequence

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

BPE_PATH = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
PAD_ID = EOS_ID
NUM_MERGES = 49152 - 256 - 2  # as OpenAI slices the file: 2 * 256 byte tokens + 48894 merges + 2 specials = 49408
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_characters() -> list[str]:
    """The printable stand-ins for bytes 0..255, in CLIP's id order (GPT-2's byte-level map).

    Printable Latin-1 bytes stand for themselves and come first; the other 68 map to chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def load_vocab(bpe_path: str | os.PathLike = BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id for all 49408 tokens, the merges in rank order) from OpenAI's gzipped merges file."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or vocab[EOS] != EOS_ID:
        raise ValueError(f"{bpe_path} is not CLIP's BPE file: {len(tokens)} tokens, {len(vocab)} distinct")
    return vocab, merges


def clean(text: str) -> str:
    """transformers' CLIPTokenizer text cleanup with ftfy installed: fix_text, collapse whitespace, strip, lower."""
    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


class CLIPTokenizer:
    """Text -> (B, 77) int32 ids, as transformers.CLIPTokenizer(padding="max_length", max_length=77,
    truncation=True) for openai/clip-vit-large-patch14."""

    def __init__(self, bpe_path: str | os.PathLike = BPE_PATH, context_length: int = CONTEXT_LENGTH):
        vocab, merges = load_vocab(bpe_path)
        tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>"))
        # Text between the regex matches (whitespace) is dropped; each match becomes one BPE word.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.add_special_tokens([BOS, EOS])  # literal "<|endoftext|>" in a caption is the token, as in transformers
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                           special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
        tok.enable_truncation(context_length)  # keeps room for both special tokens
        tok.enable_padding(length=context_length, pad_id=PAD_ID, pad_token=EOS)
        self.context_length, self._tok = context_length, tok

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """A list of captions -> int32 array (len(texts), context_length)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got one string")
        encodings = self._tok.encode_batch([clean(t) for t in texts])
        return np.array([e.ids for e in encodings], np.int32).reshape(len(texts), self.context_length)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """The shared tokenizer built from the bundled vocabulary (built once: ~1 s)."""
    return CLIPTokenizer()


def tokenize(texts: Sequence[str]) -> np.ndarray:
    """Captions -> (B, 77) int32 CLIP ids, as U-ViT's FrozenCLIPEmbedder tokenizes them."""
    return default_tokenizer()(texts)
