"""The ops, each with one signature on every backend: the Inverted Hinge Loss (``ihl``), IHL from hidden states
without the logits (``fused_linear``), per-token log-probabilities (``logprob``), per-example Fisher accumulation
(``fisher``) and the batched row-weighted low-rank SVD (``lowrank``). ``dispatch`` picks the backend: Triton
kernels (``fastunlearn.kernels``), C++ kernels (``fastunlearn._C``, from ``csrc/``) or the plain-PyTorch
implementations in ``reference`` that every fast path is tested against."""
