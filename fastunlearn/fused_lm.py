"""Fused IHL for Hugging Face causal LMs: the forget loss straight from the backbone's last hidden states.

``fused_causal_lm_ihl(model, input_ids, attention_mask)`` runs the backbone (``model.base_model``: GPT-2 and
GPT-Neo's ``transformer``, Llama / Qwen2's ``model``) to its last hidden states (B, T, H), shifts them by
one token exactly as :func:`fastunlearn.shift_causal` does (targets = next tokens of ``labels`` or
``input_ids``; padding targets -> ``ignore_index``) and returns :func:`fastunlearn.fused_linear_ihl` with the
output layer's weight and bias. Value and gradients (tied embeddings included) are those of
``causal_lm_ihl_loss(model(input_ids, attention_mask=attention_mask).logits, input_ids, attention_mask)``,
but the (B, T, V) logits never exist: the output layer is not called, only its weight is read.

``patch_fused_ihl(model)`` overrides ``forward`` on this instance only (the class and other instances are
untouched). A call with ``ihl=True`` takes the fused path:

    out = model(input_ids, attention_mask=mask, ihl=True)                 # IHL on the next input tokens
    out = model(input_ids, attention_mask=mask, labels=labels, ihl=True)  # on HF-style labels (-100 ignored)
    out.loss.backward()                                                   # only out.loss is set

Every other call (generation, cross-entropy with ``labels``, plain logits) goes to the original forward
unchanged; ``inspect.signature(model.forward)`` is the original one. ``unpatch_fused_ihl`` restores it.
Other keyword arguments of a fused call (``position_ids``, ...) go to the backbone; no cache is built.

The fused path refuses (ValueError, naming the reason) what it cannot honor: an output layer that is not a
plain ``nn.Linear`` (a LoRA adapter on it, a quantized layer), configs that transform the logits after the
output layer (final logit softcapping as in Gemma 2, logit scaling as in Cohere or Granite), encoder-decoder
models and models without a separate backbone. Logit transforms are recognized by the config attributes
in ``LOGIT_SOFTCAPS`` and ``LOGIT_SCALES``; one written in a model's code without such an attribute is not.
Hooks registered on the output layer do not run on the fused path, since it never calls that layer.
"""

from __future__ import annotations

import functools
import types

from torch import Tensor, nn

from . import _validate
from ._optional import missing
from .fused_linear import fused_linear_ihl
from .lora import LoRALinear
from .objectives import shift_causal

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:
    raise missing("transformers", "engine", "the fused IHL of Hugging Face models (fastunlearn.fused_lm)") from exc

# Config attributes that change the logits after the output layer: any value other than None is a softcap,
# any value other than None or 1 a scale.
LOGIT_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
LOGIT_SCALES = (
    "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "logits_mup_width_multiplier",
)  # fmt: skip
_PATCH_MARK = "fused_ihl_options"  # attribute of the patched forward: its default options


def _check_logit_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for cfg in configs:
        for attr in LOGIT_SOFTCAPS + LOGIT_SCALES:
            value = getattr(cfg, attr, None)
            if value is not None and (attr in LOGIT_SOFTCAPS or value != 1):
                raise ValueError(
                    f"{type(model).__name__} has config.{attr} = {value!r}: its logits are transformed after the "
                    f"output layer, which the fused IHL (logits = hidden @ weight.T + bias) cannot honor"
                )
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model: the fused IHL needs a causal LM")


def _backbone(model: nn.Module) -> nn.Module:
    """The model without its output layer (``model.base_model``), mapping input_ids to last hidden states."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        raise ValueError(
            f"model ({type(model).__name__}) has no backbone separate from itself (model.base_model): "
            f"pass a Hugging Face causal LM such as LlamaForCausalLM"
        )
    return backbone


def _output_layer(model: nn.Module) -> nn.Linear:
    """``model.get_output_embeddings()``, checked to compute exactly hidden @ weight.T + bias."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"model ({type(model).__name__}) has no output layer (get_output_embeddings() is None)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        hint = " (merge the LoRA adapter or leave the output layer out of the targets)"
        raise ValueError(
            f"the output layer of {type(model).__name__} must be a plain nn.Linear for the fused IHL, got "
            f"{type(head).__name__}{hint if isinstance(head, LoRALinear) else ''}"
        )
    if "forward" in vars(head):
        raise ValueError(
            f"the output layer of {type(model).__name__} has its forward overridden on the instance (e.g. by "
            f"accelerate offloading hooks): the fused IHL reads its weight directly"
        )
    return head


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    _check_logit_config(model)
    return _backbone(model), _output_layer(model)


def check_fused_ihl_support(model: nn.Module) -> None:
    """Raise ValueError, naming the reason, if the fused IHL cannot reproduce ``model``'s logits."""
    _backbone_and_head(model)


def fused_causal_lm_ihl(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    margin: float = 1.0,
    chunk_rows: int | None = None,
    **backbone_kwargs,
) -> Tensor:
    """IHL of a causal LM on its next tokens, from its last hidden states; never builds the (B, T, V) logits.

    input_ids (B, T), attention_mask (B, T) or None, labels (B, T) aligned with input_ids (HF style) or
    None. Returns what :func:`fastunlearn.causal_lm_ihl_loss` returns on the model's logits: a scalar, or
    (B, T - 1) for ``reduction="none"``. ``backbone_kwargs`` go to the backbone's forward.
    """
    backbone, head = _backbone_and_head(model)
    _validate.check_reduction_and_margin(reduction, margin)  # before the backbone's forward runs
    backbone_kwargs = {"use_cache": False, **backbone_kwargs}  # no cache: nothing is generated
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)
    hidden = outputs.last_hidden_state  # (B, T, H)
    shifted, targets = shift_causal(hidden, input_ids, attention_mask, labels, ignore_index)  # (B, T-1, H), (B, T-1)
    device = head.weight.device  # the backbone's last layer may sit on another device (model parallel)
    return fused_linear_ihl(
        shifted.to(device), head.weight, targets.to(device), head.bias, ignore_index=ignore_index,
        reduction=reduction, margin=margin, chunk_rows=chunk_rows,
    )  # fmt: skip


def is_fused_ihl_patched(model: nn.Module) -> bool:
    """Whether ``patch_fused_ihl`` patched this instance (and ``unpatch_fused_ihl`` did not undo it)."""
    return hasattr(vars(model).get("forward"), _PATCH_MARK)


def patch_fused_ihl(
    model: nn.Module,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    margin: float = 1.0,
    chunk_rows: int | None = None,
) -> nn.Module:
    """Give this instance a forward whose ``ihl=True`` calls return the fused IHL; returns ``model``.

    The options are the defaults of the fused calls (a fused call may override them by keyword, e.g.
    ``reduction="none"``). Patching again replaces the options; the original forward is kept.
    """
    check_fused_ihl_support(model)
    _validate.check_reduction_and_margin(reduction, margin)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if "forward" in vars(model) and not is_fused_ihl_patched(model):
        raise ValueError(
            f"model.forward is already overridden on this {type(model).__name__} instance (e.g. by accelerate "
            f"hooks): patch_fused_ihl wraps the class's forward only; call fused_causal_lm_ihl(model, ...) instead"
        )
    options = {"ignore_index": ignore_index, "reduction": reduction, "margin": margin, "chunk_rows": chunk_rows}
    class_forward = type(model).forward

    @functools.wraps(class_forward)  # inspect.signature(model.forward) stays the original one
    def forward(self, *args, ihl: bool = False, **kwargs):
        if not ihl:
            return class_forward(self, *args, **kwargs)
        if len(args) > 1:
            raise TypeError(f"with ihl=True only input_ids may be positional, got {len(args)} positional arguments")
        return CausalLMOutputWithPast(loss=fused_causal_lm_ihl(self, *args, **{**options, **kwargs}))

    setattr(forward, _PATCH_MARK, options)
    model.forward = types.MethodType(forward, model)  # bound per instance: deepcopy rebinds it to the copy
    return model


def unpatch_fused_ihl(model: nn.Module) -> nn.Module:
    """Restore the class's forward on ``model`` (no-op if it is not patched); returns ``model``."""
    if is_fused_ihl_patched(model):
        del model.forward
    return model
