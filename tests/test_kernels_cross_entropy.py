"""Cross-entropy kernels against float64 PyTorch references.

On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are small; ``STEELWORKS_TEST_DEVICE=cuda`` runs the same tests compiled on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton")

import steelworks.kernels.cross_entropy as ce_mod  # noqa: E402
from steelworks.kernels.cross_entropy import (  # noqa: E402
    cross_entropy,
    cross_entropy_reference,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

pytestmark = pytest.mark.kernels
DEVICE = torch.device(os.environ.get("STEELWORKS_TEST_DEVICE", "cpu"))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest elementwise error relative to the largest reference magnitude."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()


def _labels(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100  # ignored
    y[2] = v - 1  # the last vocab id (the tail of the last, masked block)
    y[-1] = 0
    y[n // 2] = -100
    return y.to(DEVICE)


def _logits(n: int, v: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 4).to(DEVICE, dtype)


@pytest.fixture(params=[8192, 512], ids=["one-block", "many-blocks"])
def max_block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The vocab block cap: 512 streams V = 1000 / 4099 through 2 / 9 blocks, the last one
    partly masked, so the online softmax runs across blocks as it does at V = 152k."""
    monkeypatch.setattr(ce_mod, "MAX_BLOCK_V", request.param)
    return request.param


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("n", "v"), [(7, 1000), (33, 4099)])
def test_cross_entropy_forward_backward(n: int, v: int, smoothing: float, max_block: int) -> None:
    x, y = _logits(n, v, seed=n), _labels(n, v, seed=v)
    w = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5  # non-uniform grad_output
    ref_x = x.double().requires_grad_()
    ref = F.cross_entropy(ref_x, y, ignore_index=-100, label_smoothing=smoothing, reduction="none")
    (ref * w.double()).sum().backward()

    got_x = x.clone().requires_grad_()
    got = cross_entropy(got_x, y, label_smoothing=smoothing)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert _rel(got, ref) < 1e-5
    assert bool((got[y == -100] == 0).all())
    (got * w).sum().backward()
    assert _rel(got_x.grad, ref_x.grad) < 1e-5
    assert bool((got_x.grad[y == -100] == 0).all())


def test_all_ignored_rows() -> None:
    x = _logits(5, 1000, seed=3).requires_grad_()
    y = torch.full((5,), -1, device=DEVICE)
    loss = cross_entropy(x, y, ignore_index=-1, label_smoothing=0.1)
    assert bool((loss == 0).all())
    loss.sum().backward()
    assert bool((x.grad == 0).all())


def test_inplace_overwrites_logits_and_inplace_false_keeps_them() -> None:
    n, v = 7, 1000
    x, y = _logits(n, v, seed=5), _labels(n, v, seed=5)
    want = x.double().softmax(-1) - F.one_hot(y.clamp(min=0), v).double()
    want[y == -100] = 0

    kept = x.clone().requires_grad_()
    cross_entropy(kept, y, inplace=False).sum().backward()
    assert torch.equal(kept.detach(), x)
    assert _rel(kept.grad, want) < 1e-5

    buf = x.clone().requires_grad_()
    cross_entropy(buf, y)  # inplace=True: the buffer now holds d loss / d logits
    assert _rel(buf.detach(), want) < 1e-5

    frozen = x.clone()  # no grad wanted: nothing is written
    assert _rel(cross_entropy(frozen, y), cross_entropy_reference(x.double(), y)) < 1e-5
    assert torch.equal(frozen, x)


def test_gradient_flows_through_lm_head_matmul() -> None:
    n, h, v = 9, 16, 1000
    g = torch.Generator().manual_seed(7)
    hid, wt = torch.randn(n, h, generator=g).to(DEVICE), torch.randn(v, h, generator=g).to(DEVICE)
    y = _labels(n, v, seed=7)
    a, b = hid.clone().requires_grad_(), wt.clone().requires_grad_()
    cross_entropy(a @ b.t(), y).sum().backward()
    ra, rb = hid.double().requires_grad_(), wt.double().requires_grad_()
    cross_entropy_reference(ra @ rb.t(), y).sum().backward()
    assert _rel(a.grad, ra.grad) < 1e-5 and _rel(b.grad, rb.grad) < 1e-5


def test_overwritten_logits_needed_elsewhere_fail_loudly() -> None:
    x = _logits(3, 1000, seed=2).requires_grad_()
    e = x.exp()  # ExpBackward saves its output, which the kernel overwrites
    loss = cross_entropy(e, _labels(3, 1000, seed=2)).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_labels() -> None:
    x = _logits(4, 1000, seed=1)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(x, torch.zeros(3, dtype=torch.long, device=DEVICE))
    loss = cross_entropy(x, torch.tensor([0, 1000, 5, -100], device=DEVICE))
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize(("chunk", "weighted", "smoothing"),
                         [(None, False, 0.0), (8, True, 0.0), (10, True, 0.1), (64, False, 0.1), (1, True, 0.0)])
def test_fused_linear_cross_entropy(chunk: int | None, weighted: bool, smoothing: float,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ce_mod, "MAX_BLOCK_V", 1024)  # several vocab blocks here too
    n, h, v = 33, 32, 4099
    g = torch.Generator().manual_seed(11)
    hid, wt = torch.randn(n, h, generator=g).to(DEVICE), (torch.randn(v, h, generator=g) * 0.3).to(DEVICE)
    y = _labels(n, v, seed=11)
    tw = (torch.rand(n, generator=g) / n).to(DEVICE) if weighted else None
    a, b = hid.clone().requires_grad_(), wt.clone().requires_grad_()
    loss = fused_linear_cross_entropy(a, b, y, tw, label_smoothing=smoothing, chunk_size=chunk)
    ra, rb = hid.double().requires_grad_(), wt.double().requires_grad_()
    ref = fused_linear_cross_entropy_reference(ra, rb, y, tw, label_smoothing=smoothing)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert _rel(loss, ref) < 1e-5
    (loss * 3.0).backward()  # backward scales the stored gradients by grad_output
    (ref * 3.0).backward()
    assert _rel(a.grad, ra.grad) < 1e-5 and _rel(b.grad, rb.grad) < 1e-5


def test_fused_one_input_requiring_grad_and_no_grad() -> None:
    n, h, v = 7, 16, 1000
    g = torch.Generator().manual_seed(13)
    hid, wt = torch.randn(n, h, generator=g).to(DEVICE), torch.randn(v, h, generator=g).to(DEVICE)
    y = _labels(n, v, seed=13)
    rb = wt.double().requires_grad_()
    fused_linear_cross_entropy_reference(hid.double(), rb, y).backward()
    b = wt.clone().requires_grad_()
    fused_linear_cross_entropy(hid, b, y, chunk_size=3).backward()
    assert _rel(b.grad, rb.grad) < 1e-5
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hid, wt.requires_grad_(), y)
    assert _rel(loss, fused_linear_cross_entropy_reference(hid.double(), wt.double(), y)) < 1e-5


def test_bf16() -> None:
    n, h, v = 9, 32, 1000
    x, y = _logits(n, v, seed=17, dtype=torch.bfloat16), _labels(n, v, seed=17)
    ref_x = x.double().requires_grad_()
    ref = cross_entropy_reference(ref_x, y, label_smoothing=0.1)
    ref.sum().backward()
    got_x = x.clone().requires_grad_()
    got = cross_entropy(got_x, y, label_smoothing=0.1)
    assert got.dtype == torch.float32 and _rel(got, ref) < 1e-5  # fp32 math on the bf16 values
    got.sum().backward()
    assert got_x.grad.dtype == torch.bfloat16 and _rel(got_x.grad, ref_x.grad) < 1e-2

    g = torch.Generator().manual_seed(17)
    hid, wt = torch.randn(n, h, generator=g).to(DEVICE), (torch.randn(v, h, generator=g) * 0.3).to(DEVICE)
    a, b = hid.bfloat16().requires_grad_(), wt.bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(a, b, y, chunk_size=4)
    loss.backward()
    ra, rb = hid.double().requires_grad_(), wt.double().requires_grad_()
    ref = fused_linear_cross_entropy_reference(ra, rb, y)
    ref.backward()
    assert a.grad.dtype == b.grad.dtype == torch.bfloat16
    assert _rel(loss, ref) < 2e-2 and _rel(a.grad, ra.grad) < 5e-2 and _rel(b.grad, rb.grad) < 5e-2


def test_default_chunk_size() -> None:
    assert default_chunk_size(151936, torch.bfloat16) == 512
    assert default_chunk_size(32000, torch.bfloat16) == 4096
    assert default_chunk_size(10**9, torch.float32) == 1


def test_leading_dims() -> None:
    x = _logits(6, 50, seed=19).view(2, 3, 50)
    y = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(19)).to(DEVICE)
    y[0, 1] = -100
    got_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
    got, ref = cross_entropy(got_x, y), cross_entropy_reference(ref_x, y)
    assert got.shape == (2, 3) and _rel(got, ref) < 1e-5
    got.sum().backward()
    ref.sum().backward()
    assert _rel(got_x.grad, ref_x.grad) < 1e-5
