"""A tiny randomly initialised CLIP text model and tokenizer, written to a folder, for tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def write_tiny_clip(folder: Path, seed: int = 0, width: int = 32) -> Path:
    """A randomly initialised 2-layer CLIP text model and a small BPE tokenizer, saved to ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
