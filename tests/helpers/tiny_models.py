"""Tiny causal LMs for the tests: randomly initialized GPT-Neo (nn.Linear) and GPT-2 (Conv1D) for the adapter
tests, a Llama with tied input/output embeddings (as SmolLM2), and a GPT-Neo that memorized random token sequences
for the unlearning tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM

from fastunlearn.losses import retain_loss, shift_causal

VOCAB = 64
KINDS = ("gpt_neo", "gpt2")


def word_tokenizer(words, extra=(), split_punctuation: bool = True):
    """A word-level tokenizer with known ids: [PAD]=0, [UNK]=1, [EOS]=2, then ``extra``, then ``words``.
    ``split_punctuation``: pre-tokenize with ``Whitespace`` (":" is its own token), else ``WhitespaceSplit``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *extra, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


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


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB, tied: bool = True, hidden_size: int = 32,
               intermediate_size: int = 64, special_id: int = 0) -> LlamaForCausalLM:  # fmt: skip
    """2 layers, hidden 32 (``hidden_size``), 4 query heads / 2 KV heads (GQA), float32, eval mode, bos = eos =
    ``special_id``; norms perturbed away from 1 so that a norm lost or misplaced shows in the logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        bos_token_id=special_id, eos_token_id=special_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def is_tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def token_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class MemorizerConfig:
    """Random token sequences split into forget / retain / held-out, and the memorizer's training budget."""

    vocab_size: int = 96
    seq_len: int = 24
    n_forget: int = 4
    n_retain: int = 12
    n_heldout: int = 4  # never trained on: the "forgotten" level of MA and EL
    memorize_steps: int = 400
    lr: float = 3e-3
    seed: int = 0


def memorize(cfg: MemorizerConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer GPT-Neo trained (full batch) on forget + retain until it reproduces them; (model, {set: ids})."""
    torch.manual_seed(cfg.seed)
    data = torch.randint(0, cfg.vocab_size, (cfg.n_forget + cfg.n_retain + cfg.n_heldout, cfg.seq_len))
    sets = dict(zip(("forget", "retain", "heldout"), data.split([cfg.n_forget, cfg.n_retain, cfg.n_heldout])))
    config = GPTNeoConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.seq_len, hidden_size=64, num_layers=2,
        num_heads=4, attention_types=[[["global"], 2]], window_size=cfg.seq_len, intermediate_size=256,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPTNeoForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    train = torch.cat([sets["forget"], sets["retain"]])
    for _ in range(cfg.memorize_steps):
        loss = retain_loss(*shift_causal(model(train).logits, train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, sets
