"""The dispatch rule, lean import, and the custom ops' registration (torch.compile, opcheck)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastunlearn
from fastunlearn.ops import dispatch
from fastunlearn.ops.ihl import _ihl_forward_op


def test_import_is_lean():
    """Importing initializes no CUDA and imports neither Triton nor the kernels."""
    code = (
        "import sys, torch, fastunlearn\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'fastunlearn.kernels' not in sys.modules\n"
        "print('lean')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTUNLEARN_IMPL", raising=False)
    expected = "csrc" if dispatch.has_csrc() else "torch"
    assert fastunlearn.select_impl(torch.device("cpu")) == expected
    monkeypatch.setattr(dispatch, "HAS_CSRC", False)
    assert fastunlearn.select_impl(torch.device("cpu")) == "torch"


def test_env_forces_an_impl_and_fails_loudly(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_IMPL", "torch")
    assert fastunlearn.select_impl(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTUNLEARN_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="FASTUNLEARN_IMPL='cuda-magic'"):
        fastunlearn.select_impl(torch.device("cpu"))
    monkeypatch.setenv("FASTUNLEARN_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'triton' was requested but cannot run.*TRITON_INTERPRET"):
        fastunlearn.ihl_loss(torch.randn(2, 5), torch.tensor([0, 1]))
    monkeypatch.setenv("FASTUNLEARN_IMPL", "csrc")
    monkeypatch.setattr(dispatch, "HAS_CSRC", False)
    monkeypatch.setattr(dispatch, "CSRC_MISSING", "not built (test)")
    with pytest.raises(RuntimeError, match="'csrc' was requested.*not built"):
        fastunlearn.ihl_loss(torch.randn(2, 5), torch.tensor([0, 1]))
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.setenv("FASTUNLEARN_IMPL", "triton")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fastunlearn.select_impl(torch.device("cpu"))


def test_op_without_the_forced_path_raises(force_impl):
    with force_impl("csrc"), pytest.raises(RuntimeError, match="has no 'csrc' path"):
        dispatch.select_impl(torch.device("cpu"), available=("torch", "triton"))


def test_force_impl_override_wins_over_env(monkeypatch, force_impl):
    monkeypatch.setenv("FASTUNLEARN_IMPL", "triton")
    with force_impl("torch"):
        assert fastunlearn.select_impl(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        with force_impl("fast"):
            pass


def test_custom_op_registration_passes_opcheck(force_impl):
    logits = torch.randn(6, 17, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 16, 5, 5])
    torch.library.opcheck(_ihl_forward_op, (logits, labels, -100, 1.0, "torch", False))


def test_compiles_without_graph_breaks():
    logits = torch.randn(3, 4, 19)
    labels = torch.randint(0, 19, (3, 4))

    def step(z):
        return fastunlearn.ihl_loss(z * 2.0, labels) + fastunlearn.ihl_loss(z, labels, reduction="sum")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    eager, traced = step(z1), compiled(z2)
    eager.backward()
    traced.backward()
    assert torch.allclose(eager, traced) and torch.allclose(z1.grad, z2.grad)


def test_registry_backends_load_with_the_ops_attributes():
    expected = {
        "ihl": ("ihl_forward", "ihl_backward"),
        "fisher": (),
        "weighted_lowrank": (),
        "logprob": ("logprob_forward", "logprob_backward"),
        "logprob_argmax": (),
    }
    assert set(dispatch.OPS) == set(expected)
    for op, spec in dispatch.OPS.items():
        assert "torch" in spec.backends and set(spec.backends) <= set(dispatch.IMPLS)
        for impl in spec.backends:
            if (impl == "csrc" and not dispatch.has_csrc()) or (impl == "triton" and not dispatch.has_triton()):
                continue
            backend = dispatch.implementation(op, impl)
            if expected[op]:  # a module of functions
                assert all(callable(getattr(backend, name)) for name in expected[op]), (op, impl)
            else:  # one function
                assert callable(backend), (op, impl)


def test_impl_argument_runs_that_implementation(monkeypatch):
    """impl= wins over FASTUNLEARN_IMPL, and the loss then runs exactly that backend."""
    used = []
    load = dispatch.implementation
    monkeypatch.setattr(dispatch, "implementation", lambda op, impl: used.append((op, impl)) or load(op, impl))
    monkeypatch.setenv("FASTUNLEARN_IMPL", "triton")
    logits, labels = torch.randn(4, 9, requires_grad=True), torch.tensor([0, 3, -100, 8])
    fastunlearn.ihl_loss(logits, labels, impl="torch").backward()
    assert used and set(used) == {("ihl", "torch")}
    used.clear()
    fastunlearn.fused_linear_ihl(torch.randn(4, 6), torch.randn(9, 6), labels, impl="torch")
    assert set(used) == {("ihl", "torch")}


def test_unavailable_or_unknown_impl_raises_naming_it(monkeypatch):
    logits, labels = torch.randn(2, 5), torch.tensor([0, 1])
    monkeypatch.setattr(dispatch, "HAS_CSRC", False)
    monkeypatch.setattr(dispatch, "CSRC_MISSING", "not built (test)")
    with pytest.raises(RuntimeError, match="implementation 'csrc' was requested but cannot run: not built"):
        fastunlearn.ihl_loss(logits, labels, impl="csrc")
    with pytest.raises(RuntimeError, match="implementation 'csrc' was requested"):
        fastunlearn.fused_linear_ihl(torch.randn(2, 3), torch.randn(5, 3), labels, impl="csrc")
    with pytest.raises(ValueError, match=r"impl must be one of \('torch', 'triton', 'csrc'\) or None, got 'cuda'"):
        fastunlearn.ihl_loss(logits, labels, impl="cuda")


def test_triton_dtype_limits_come_from_the_registry():
    """The Fisher kernel takes half and float32 inputs only: float64 falls back, or raises when requested."""
    from fastunlearn.lora.fisher import accumulate_per_example

    cpu = torch.device("cpu")
    assert dispatch.select("fisher", cpu, dtypes=(torch.float64,)) == "torch"
    x, g = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'triton' was requested but cannot run: this op has no 'triton' path"):
        accumulate_per_example(torch.zeros(5, 4, dtype=torch.float64), x, g, 2**20, impl="triton")
    fisher = torch.zeros(5, 4, dtype=torch.float64)
    accumulate_per_example(fisher, x, g, 2**20, impl="torch")
    expected = (torch.einsum("bto,bti->boi", g, x) ** 2).sum(0)
    assert torch.allclose(fisher, expected, rtol=1e-12, atol=0)
