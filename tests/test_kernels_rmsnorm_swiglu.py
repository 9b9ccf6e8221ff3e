"""RMSNorm (plain and fused with the residual add) and SwiGLU Triton kernels vs PyTorch.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay tiny; STEELWORKS_TEST_DEVICE=cuda runs the same checks compiled on a GPU. Float32 results
are compared with the reference evaluated in float64; half types with a looser tolerance (the
interpreter also truncates fp32 -> bf16 where a GPU rounds to nearest: one ulp either way).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from steelworks.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from steelworks.kernels.runtime import interpreting  # noqa: E402
from steelworks.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

pytestmark = pytest.mark.kernels

DEVICE = os.environ.get("STEELWORKS_TEST_DEVICE", "cpu")
SHAPES = [(3, 7, 100), (5, 64), (1, 13, 1792), (2, 2048)]
# Half-type tolerances: a few ulps of the dtype (reduction order, one rounding mode apart).
HALF_TOL = {torch.float16: {"rtol": 5e-3, "atol": 5e-3},
            torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}
EPS = 1e-6


def _rand(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0,
          scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    return t.to(dtype=dtype, device=DEVICE).requires_grad_()


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_()


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_float32_matches_float64_reference(shape: tuple[int, ...]) -> None:
    x, w = _rand(shape, seed=1), _rand(shape[-1:], seed=2, scale=0.1, shift=1.0)
    dy = _rand(shape, seed=3).detach()
    y = rms_norm(x, w, EPS)
    x64, w64 = _leaf64(x), _leaf64(w)
    y64 = rms_norm_reference(x64, w64, EPS)
    assert y.dtype == torch.float32 and y.shape == shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 7, 100), (1, 13, 1792)])
def test_rms_norm_fused_residual_three_gradients(shape: tuple[int, ...]) -> None:
    x, r = _rand(shape, seed=4), _rand(shape, seed=5)
    w = _rand(shape[-1:], seed=6, scale=0.1, shift=1.0)
    dy, ds = _rand(shape, seed=7).detach(), _rand(shape, seed=8).detach()
    y, s = rms_norm(x, w, EPS, residual=r)
    x64, r64, w64 = _leaf64(x), _leaf64(r), _leaf64(w)
    y64, s64 = rms_norm_reference(x64, w64, EPS, residual=r64)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, (x + r).detach(), rtol=0, atol=0)  # same rounding as torch
    # Both outputs feed the loss: the incoming grad of s adds to the one through the norm.
    grads = torch.autograd.grad((y, s), (x, w, r), (dy, ds))
    grads64 = torch.autograd.grad((y64, s64), (x64, w64, r64), (dy.double(), ds.double()),
                                  retain_graph=True)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Only y used (s's grad is None inside backward).
    grads = torch.autograd.grad(rms_norm(x, w, EPS, residual=r)[0], (x, w, r), dy)
    grads64 = torch.autograd.grad(y64, (x64, w64, r64), dy.double())
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_half_precision(dtype: torch.dtype) -> None:
    shape = (3, 5, 100)
    x, r = _rand(shape, dtype, seed=9), _rand(shape, dtype, seed=10)
    w = _rand(shape[-1:], dtype, seed=11, scale=0.1, shift=1.0)
    dy = _rand(shape, dtype, seed=12).detach()
    y, s = rms_norm(x, w, EPS, residual=r)
    y_ref, s_ref = rms_norm_reference(x, w, EPS, residual=r)
    assert y.dtype == s.dtype == dtype
    # x + residual rounds exactly as torch does; the interpreter truncates to bf16 (1 ulp).
    exact = dtype != torch.bfloat16 or not interpreting()
    torch.testing.assert_close(s, s_ref, rtol=0 if exact else 2**-7, atol=0)
    torch.testing.assert_close(y, y_ref, **HALF_TOL[dtype])
    grads = torch.autograd.grad(y, (x, w, r), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, r), dy)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == dtype
        # dW sums 15 rows of half products: compare relative to its scale.
        torch.testing.assert_close(got.float(), want.float(), rtol=HALF_TOL[dtype]["rtol"],
                                   atol=HALF_TOL[dtype]["atol"] * want.abs().max().item())


def test_rms_norm_promotes_like_hf_and_frozen_weight() -> None:
    # bf16 activations with an fp32 weight: HF's ``weight * h.to(bf16)`` returns fp32.
    x = _rand((4, 64), torch.bfloat16, seed=13)
    w = _rand((64,), seed=14, scale=0.1, shift=1.0).detach()  # frozen: no dW kernel work
    y = rms_norm(x, w, EPS)
    y_ref = rms_norm_reference(x, w, EPS)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **HALF_TOL[torch.bfloat16])
    (dx,) = torch.autograd.grad(y.sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=3e-2, atol=3e-2)


def test_rms_norm_rejects_bad_shapes() -> None:
    x = _rand((2, 8))
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, _rand((7,)), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, _rand((8,)), EPS, residual=_rand((2, 8), torch.float16))


def test_rms_norm_gradcheck_float64() -> None:
    # Every gradcheck probe is an interpreted launch: keep it tiny (6 = non-power-of-two).
    x, r = _rand((2, 6), torch.float64, seed=15), _rand((2, 6), torch.float64, seed=16)
    w = _rand((6,), torch.float64, seed=17, scale=0.1, shift=1.0)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, EPS), (x, w))
    assert torch.autograd.gradcheck(lambda a, b, c: rms_norm(a, b, EPS, residual=c), (x, w, r))


# ---------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_float32_matches_float64_reference(shape: tuple[int, ...]) -> None:
    gate, up = _rand(shape, seed=20, scale=3.0), _rand(shape, seed=21)
    dy = _rand(shape, seed=22).detach()
    y = swiglu(gate, up)
    g64, u64 = _leaf64(gate), _leaf64(up)
    y64 = swiglu_reference(g64, u64)
    assert y.dtype == torch.float32 and y.shape == shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y, (gate, up), dy)
    grads64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_half_precision(dtype: torch.dtype) -> None:
    shape = (3, 7, 100)
    gate, up = _rand(shape, dtype, seed=23, scale=3.0), _rand(shape, dtype, seed=24)
    dy = _rand(shape, dtype, seed=25).detach()
    y, y_ref = swiglu(gate, up), swiglu_reference(gate, up)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **HALF_TOL[dtype])
    grads = torch.autograd.grad(y, (gate, up), dy)
    grads_ref = torch.autograd.grad(y_ref, (gate, up), dy)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **HALF_TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, interpreter
def test_swiglu_saves_only_inputs_and_handles_extremes() -> None:
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=DEVICE)
    gate.requires_grad_()
    up = _rand(tuple(gate.shape), seed=26)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu(gate, up)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}
    y_ref = swiglu_reference(gate, up)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(y.sum(), (gate, up))
    grads_ref = torch.autograd.grad(y_ref.sum(), (gate, up))
    for got, want in zip(grads, grads_ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_swiglu_non_contiguous_and_gradcheck_float64() -> None:
    fused = _rand((5, 2 * 33), seed=27)  # a fused gate_up projection's output, split in two
    gate, up = fused.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must match"):
        swiglu(gate, up[:, :-1])
    g, u = _rand((2, 7), torch.float64, seed=28, scale=3.0), _rand((2, 7), torch.float64, seed=29)
    assert torch.autograd.gradcheck(swiglu, (g, u))
