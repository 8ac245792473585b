"""A tiny Llama GGUF file built in the tests: every writable type among its tensors, a byte-level BPE tokenizer,
q/k rows in llama.cpp's order (``write_template``), for ``fastunlearn.models.load_model`` and
``fastunlearn.gguf_io``."""

from __future__ import annotations

import numpy as np
from transformers import LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fastunlearn import gguf_io
from fastunlearn.ops import quant
from tests.helpers import tiny_models

MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or"]
TOKENS = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in MERGES), "<|endoftext|>"]
EOS = len(TOKENS) - 1
HEADS, KV_HEADS, HIDDEN, FFN = 4, 2, 256, 512  # heads as tiny_models.tiny_llama's
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
# every writable type at least once; norms stay F32 as in llama.cpp's files
TYPES = {
    "token_embd.weight": "q8_0", "output_norm.weight": "f32",
    "blk.0.attn_q.weight": "q4_0", "blk.0.attn_k.weight": "q4_1", "blk.0.attn_v.weight": "q5_0",
    "blk.0.attn_output.weight": "q5_1", "blk.0.ffn_gate.weight": "q4_k", "blk.0.ffn_up.weight": "q6_k",
    "blk.0.ffn_down.weight": "q4_1", "blk.1.attn_q.weight": "q4_k", "blk.1.attn_k.weight": "q6_k",
    "blk.1.attn_v.weight": "f16", "blk.1.attn_output.weight": "bf16", "blk.1.ffn_gate.weight": "q8_0",
    "blk.1.ffn_up.weight": "f32", "blk.1.ffn_down.weight": "q4_k",
}  # fmt: skip


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tests' tiny Llama, wide enough for the 256-weight K-quant blocks, over this file's tokenizer."""
    return tiny_models.tiny_llama(seed, vocab_size=len(TOKENS), hidden_size=HIDDEN, intermediate_size=FFN,
                                  special_id=EOS)  # fmt: skip


def hf_to_gguf_names(model: LlamaForCausalLM) -> dict[str, str]:
    """{transformers weight name: llama.cpp tensor name} of every tensor ``write_template`` writes."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(model.config.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in LAYER_NAMES.items()}
    return names


def write_template(model: LlamaForCausalLM, path, types: dict[str, str] = TYPES, extra=()) -> None:
    """``model`` as a GGUF file: llama.* hyperparameters, a gpt2 BPE tokenizer, tensors under llama.cpp's names
    and row order, each in ``types`` (F32 where not named); ``extra``: (name, float32 array) tensors appended."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([1] * EOS + [3])
    writer.add_bos_token_id(EOS)
    writer.add_eos_token_id(EOS)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.add_array("tiny.float_list", [0.5, -1.25])
    state = model.state_dict()
    for hf_name, gguf_name in hf_to_gguf_names(model).items():
        w = state[hf_name]
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            w = gguf_io.llama_cpp_permute(w, HEADS if ".attn_q." in gguf_name else KV_HEADS)
        fmt = types.get(gguf_name, "f32")
        if fmt in quant.SPECS:
            raw = quant.quantize_blocks(w, fmt).numpy()
            writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType(quant.SPECS[fmt].ggml_type))
        else:  # a type fastunlearn does not write: zero blocks of its size
            qtype = gguf.GGMLQuantizationType[fmt]
            writer.add_tensor(gguf_name, np.zeros(gguf.quants.quant_shape_to_byte_shape(w.shape, qtype), np.uint8),
                              raw_dtype=qtype)  # fmt: skip
    for name, array in extra:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
