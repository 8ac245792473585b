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

A call with ``logprob=True`` returns the per-token log-probabilities of the next tokens (B, T - 1) float32 in
``out.logprobs`` (0 at ignored targets; :func:`fused_causal_lm_logprob`), for NPO, SimNPO and GA-style terms:

    out = model(input_ids, attention_mask=mask, logprob=True)             # out.logprobs (B, T - 1)

For evaluation, :func:`fused_causal_lm_logprob_argmax` returns the log-probabilities and the greedy next tokens
together (no gradient; ``fastunlearn.evals.metrics.score_sequences`` uses it for MA and perplexity).

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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastunlearn.lora.layer import LoRALinear
from fastunlearn.losses import shift_causal
from fastunlearn.ops.fused_linear import fused_linear_ihl
from fastunlearn.ops.logprob import fused_linear_logprob, fused_linear_logprob_argmax
from fastunlearn.utils import validate
from fastunlearn.utils.optional import missing

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput
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
    validate.check_reduction_and_margin(reduction, margin)  # before the backbone's forward runs
    head, shifted, targets = _head_inputs(model, input_ids, attention_mask, labels, ignore_index, backbone_kwargs)
    return fused_linear_ihl(
        shifted, head.weight, targets, head.bias, ignore_index=ignore_index, reduction=reduction, margin=margin,
        chunk_rows=chunk_rows,
    )  # fmt: skip


def _head_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None,
                 ignore_index: int, backbone_kwargs: dict) -> tuple[nn.Module, Tensor, Tensor]:  # fmt: skip
    """(LM head, its inputs (B, T-1, H), next-token targets (B, T-1)): the backbone's last hidden states shifted
    against their targets, both on the head's device (the backbone's last layer may sit on another device under
    model parallelism). No KV cache: nothing is generated."""
    backbone, head = _backbone_and_head(model)
    backbone_kwargs = {"use_cache": False, **backbone_kwargs}
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs).last_hidden_state
    shifted, targets = shift_causal(hidden, input_ids, attention_mask, labels, ignore_index)  # (B, T-1, H), (B, T-1)
    device = head.weight.device
    return head, shifted.to(device), targets.to(device)


@dataclass
class LogprobOutput(ModelOutput):
    """What a patched model's ``logprob=True`` call returns: ``logprobs`` (B, T - 1) float32."""

    logprobs: torch.Tensor | None = None


def fused_causal_lm_logprob(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    **backbone_kwargs,
) -> Tensor:
    """log p(next token) per position of a causal LM (B, T - 1) float32 from its last hidden states, 0 where
    the target is ignored (padding, ``ignore_index`` labels); never builds the (B, T, V) logits. Equals
    ``token_logprob(*shift_causal(model(input_ids, attention_mask=attention_mask).logits, ...))`` (up to
    rounding); gradients flow as through the logits. ``backbone_kwargs`` go to the backbone's forward."""
    head, shifted, targets = _head_inputs(model, input_ids, attention_mask, labels, ignore_index, backbone_kwargs)
    return fused_linear_logprob(
        shifted, head.weight, targets, head.bias, ignore_index=ignore_index, chunk_rows=chunk_rows
    )


def fused_causal_lm_logprob_argmax(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    **backbone_kwargs,
) -> tuple[Tensor, Tensor]:
    """(log p(next token) float32, greedy next token int64), each (B, T - 1), from the last hidden states in one
    pass over each chunk of logits: what evaluation needs (the NLL and memorization accuracy), never the
    (B, T, V) logits. Equals ``token_logprob_argmax(*shift_causal(model(...).logits, ...))`` (up to rounding);
    ignored targets give (0, -1). No gradient: call it under ``torch.no_grad()`` or ``torch.inference_mode()``
    (:func:`fastunlearn.ops.logprob.fused_linear_logprob_argmax`). ``backbone_kwargs`` go to the backbone."""
    head, shifted, targets = _head_inputs(model, input_ids, attention_mask, labels, ignore_index, backbone_kwargs)
    return fused_linear_logprob_argmax(
        shifted, head.weight, targets, head.bias, ignore_index=ignore_index, chunk_rows=chunk_rows
    )


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
    """Give this instance a forward whose ``ihl=True`` calls return the fused IHL and whose ``logprob=True``
    calls return the fused per-token log-probabilities (:class:`LogprobOutput`); returns ``model``.

    The options are the defaults of the fused calls (a fused call may override them by keyword, e.g.
    ``reduction="none"``; ``logprob=True`` calls take ``ignore_index`` and ``chunk_rows`` of them).
    Patching again replaces the options; the original forward is kept. Alias: :func:`patch_fused_lm`.
    """
    check_fused_ihl_support(model)
    validate.check_reduction_and_margin(reduction, margin)
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
    def forward(self, *args, ihl: bool = False, logprob: bool = False, **kwargs):
        if not (ihl or logprob):
            return class_forward(self, *args, **kwargs)
        flag = "ihl" if ihl else "logprob"
        if ihl and logprob:
            raise TypeError("ihl=True and logprob=True are two different fused calls: pass one")
        if len(args) > 1:
            raise TypeError(f"with {flag}=True only input_ids may be positional, got {len(args)} positional arguments")
        if logprob:
            defaults = {k: options[k] for k in ("ignore_index", "chunk_rows")}
            return LogprobOutput(logprobs=fused_causal_lm_logprob(self, *args, **{**defaults, **kwargs}))
        return CausalLMOutputWithPast(loss=fused_causal_lm_ihl(self, *args, **{**options, **kwargs}))

    setattr(forward, _PATCH_MARK, options)
    model.forward = types.MethodType(forward, model)  # bound per instance: deepcopy rebinds it to the copy
    return model


patch_fused_lm = patch_fused_ihl  # the patch serves every forget term, not only IHL


def unpatch_fused_ihl(model: nn.Module) -> nn.Module:
    """Restore the class's forward on ``model`` (no-op if it is not patched); returns ``model``."""
    if is_fused_ihl_patched(model):
        del model.forward
    return model
