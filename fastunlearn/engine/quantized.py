"""A model's weights as they are deployed: every weight matrix round-tripped through a quantization format
(``fastunlearn.ops.quant``), with LoRA / FILA adapters folded in first, and undone exactly afterwards.

    weights = DeployWeights.of(model, "q4_1")             # before adapters: which weights, in which format
    with weights.deployed(model):                         # the merged model, quantized (evaluation)
        measure(model)
    with weights.straight_through(model):                 # forward / backward at the quantized weights,
        loss(model).backward()                            # gradients reach the trained ones as through identity

The format is one of ``quant.FORMATS`` for every weight matrix (2-D floating parameters, embeddings included, as
llama-quantize picks them; norms and biases stay float; a K-quant on rows that are no multiple of 256 takes
llama-quantize's substitute; ``nf4`` as bitsandbytes' ``load_in_4bit``: the linear layers but the output layer), or
a mapping parameter name -> format (``gguf_io.formats_like``: the types of the GGUF file the
model came from). Names are the model's own, before adapters are injected: an adapted layer's base weight is
found under its original name.

**The adapted layers**: the deployed weight is the merged one, ``W0 + scale B A`` (not W0 and the adapter
apart): ``deployed`` merges each adapter into its base weight (``LoRALinear.merge``), then quantizes;
``straight_through`` sets the base weight to ``Q(W0 + scale B A) - scale B A``, so the layer computes
``Q(W) x`` while the adapter path stays live: the gradient of the factors is the plain one taken at the
quantized weight (straight-through estimator, identity Jacobian of Q). Frozen weights are quantized too, as
the deployed model has them. A transformers ``Conv1D`` (GPT-2) stores its weight (in, out): it is quantized
transposed, in rows of (out, in) as a GGUF converter writes it.

**Restoring**: each context copies the weights it changes to the CPU first (their size in host memory) and
puts them back bit for bit when it ends, however it ends. Nothing is left changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastunlearn.lora.layer import LoRALinear, lora_layers
from fastunlearn.lora.targets import is_conv1d, is_linear_like
from fastunlearn.ops import quant

IDENTITY = ("f32",)  # formats whose round trip of a float32 / bf16 / fp16 weight changes nothing: skipped


def linear_weights(model: nn.Module):
    """NF4's selection, as bitsandbytes' ``load_in_4bit`` applies it: the weights of the linear layers (``nn.Linear``,
    GPT-2's ``Conv1D``) other than the output layer; embeddings, the output layer, norms and biases stay float."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {f"{name}.weight" for name, module in model.named_modules()
             if is_linear_like(module) and module is not output}  # fmt: skip
    return lambda name, param: name in names


@dataclass(frozen=True)
class DeployWeights:
    """Which weights a deployment quantizes and how: ``formats`` (parameter name, before adapters -> the format
    applied), ``transposed`` (names stored (in, out), quantized transposed)."""

    formats: dict[str, str]
    transposed: frozenset[str]

    @classmethod
    def of(cls, model: nn.Module, fmt: str | Mapping[str, str]) -> DeployWeights:
        """The plan for ``model`` (without adapters yet) in ``fmt``; ValueError naming a weight that cannot be
        stored so (its rows are no multiple of the format's block), or a mapping naming an unknown parameter."""
        if lora_layers(model):
            raise ValueError("DeployWeights.of needs the model before adapters are injected (its own names)")
        params = dict(model.named_parameters(remove_duplicate=False))
        owners = dict(model.named_modules())
        if isinstance(fmt, Mapping):
            unknown = sorted(set(fmt) - set(params))
            if unknown:
                raise ValueError(f"the formats name parameters the model does not have: {', '.join(unknown[:3])}")
            wanted = {name: f for name, f in fmt.items() if f not in IDENTITY}
        else:
            quant.spec_of(fmt)
            chosen = linear_weights(model) if fmt == "nf4" else quant.is_weight_matrix
            wanted = {name: fmt for name, p in params.items() if chosen(name, p)}
        formats, transposed, seen = {}, set(), set()
        for name, f in wanted.items():
            param = params[name]
            if param.data_ptr() in seen:  # tied weights: once
                continue
            seen.add(param.data_ptr())
            flipped = is_conv1d(owners.get(name.rpartition(".")[0])) and param.dim() == 2
            shape = tuple(param.shape[::-1]) if flipped else tuple(param.shape)
            applied = quant.llama_cpp_format(shape, f)
            if not quant.fits(shape, applied):
                block = quant.spec_of(applied).block
                raise ValueError(f"parameter {name!r} of shape {shape} cannot be stored as {applied}: its rows of "
                                 f"{shape[-1]} weights are no multiple of the format's block of {block}")  # fmt: skip
            formats[name] = applied
            if flipped:
                transposed.add(name)
        return cls(formats, frozenset(transposed))

    def describe(self) -> dict[str, int]:
        """{format: number of weights} of the plan (for logs)."""
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        return counts

    # -----------------------------------------------------------------------------------------------------
    def _targets(self, model: nn.Module) -> dict[str, tuple[Tensor, LoRALinear | None]]:
        """name -> (the live parameter holding that weight, its LoRA layer or None)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        layers = lora_layers(model)
        out = {}
        for name in self.formats:
            owner = name.rpartition(".")[0]
            if owner in layers and name.endswith(".weight"):
                out[name] = (layers[owner].base.weight, layers[owner])
            elif name in params:
                out[name] = (params[name], None)
            else:
                raise ValueError(f"the model has no parameter {name!r} any more (its layers changed since the plan)")
        return out

    def _roundtrip(self, name: str, weight: Tensor) -> Tensor:
        """Q(weight) in this plan's format for ``name``, in weight's layout, dtype and device."""
        fmt = self.formats[name]
        if name in self.transposed:
            return quant.roundtrip(weight.t().contiguous(), fmt).t()
        return quant.roundtrip(weight, fmt)

    @contextlib.contextmanager
    def _saved(self, model: nn.Module) -> Iterator[dict[str, tuple[Tensor, LoRALinear | None]]]:
        """The targets, backed up on the CPU; restored bit for bit (and every adapter unmerged) at the end."""
        targets = self._targets(model)
        backup = {name: t.detach().to("cpu", copy=True) for name, (t, _) in targets.items()}
        layers = [layer for _, layer in targets.values() if layer is not None]
        try:
            yield targets
        finally:
            with torch.no_grad():
                for name, (tensor, _) in targets.items():
                    tensor.copy_(backup[name])
                for layer in layers:
                    layer.merged = False  # its base weight is the unmerged one again

    @contextlib.contextmanager
    def deployed(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` computes with its deployed weights: adapters merged, every planned weight
        round-tripped through its format. Restored exactly when the block ends."""
        with self._saved(model) as targets:
            with torch.no_grad():
                for name, (tensor, layer) in targets.items():
                    if layer is not None:
                        layer.merge()  # W0 + scale B A into the base weight, float32 arithmetic
                    tensor.copy_(self._roundtrip(name, tensor.detach()))
            yield model

    @contextlib.contextmanager
    def straight_through(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the forward of ``model`` sees the deployed (quantized) weights and the backward
        passes through Q as identity: a trained full weight holds Q(W) (its gradient lands on it and is applied
        to W once the block ends, restoring W); an adapted layer's base weight holds Q(W0 + s B A) - s B A.
        The optimizer must step after the block, on the restored weights."""
        with self._saved(model) as targets:
            with torch.no_grad():
                for name, (tensor, layer) in targets.items():
                    if layer is None:
                        tensor.copy_(self._roundtrip(name, tensor.detach()))
                        continue
                    merged = layer.merged_weight()  # W0 + s B A in the base layout and dtype (a new tensor)
                    delta = layer.scale * (layer.lora_b.detach().float() @ layer.lora_a.detach().float())  # (out, in)
                    delta = delta.t() if layer.is_conv1d else delta
                    tensor.copy_(self._roundtrip(name, merged).float() - delta)
            yield model
