"""``patch_fused_ihl`` for your own training loop; the implementation lives in :mod:`fastunlearn.fused_lm`."""

from fastunlearn.fused_lm import (
    LOGIT_SCALES,
    LOGIT_SOFTCAPS,
    check_fused_ihl_support,
    fused_causal_lm_ihl,
    is_fused_ihl_patched,
    patch_fused_ihl,
    unpatch_fused_ihl,
)

__all__ = [
    "LOGIT_SCALES",
    "LOGIT_SOFTCAPS",
    "check_fused_ihl_support",
    "fused_causal_lm_ihl",
    "is_fused_ihl_patched",
    "patch_fused_ihl",
    "unpatch_fused_ihl",
]
