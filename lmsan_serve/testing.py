"""A tiny random BERT built from a config (no download), for the test suite and the benchmarks'
smoke modes: real computation in seconds."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_bert(folder: Path, seed: int = 0, hidden: int = 128) -> Path:
    """Write a random 2-layer BERT of width `hidden`, with the MiniLM tokenizer, to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from .backbone import minilm_path

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        # a larger init than BERT's 0.02 lets token content reach [CLS] in an untrained model
        initializer_range=0.2,
    )
    BertModel(config).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
