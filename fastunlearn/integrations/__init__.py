"""Drop-ins for existing Hugging Face stacks; import the submodule you need (this package imports nothing):

- ``fastunlearn.integrations.patch``: the fused IHL straight from a causal LM's last hidden states
  (``patch_fused_ihl``), without materializing the (B, T, V) logits.
- ``fastunlearn.integrations.hf``: ``UnlearningTrainer`` (a ``transformers.Trainer`` optimizing IHL or GA +
  retain loss on paired forget / retain batches) and ``UnlearningCallback`` (stops at the paper's criterion).
"""
