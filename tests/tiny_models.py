"""Tiny randomly initialized causal LMs for the adapter tests: GPT-Neo (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

VOCAB = 64
KINDS = ("gpt_neo", "gpt2")


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """The same weights for the same (kind, seed), in eval mode, no dropout."""
    torch.manual_seed(seed)
    if kind == "gpt_neo":
        config = GPTNeoConfig(
            vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32, num_layers=2, num_heads=2,
            attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=64,
            embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return GPTNeoForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def token_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
