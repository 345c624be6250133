"""train.py's eager loss (CappedCrossEntropy: the softcapped cross-entropy computed a few hundred
rows at a time, gradients included) against the plain formula, value and gradients; and its
eager logits (capped_logits, the same chunks) against the plain cap."""
import pytest
import torch
import torch.nn.functional as F

from conftest import train_section


def capped_cross_entropy():
    return train_section("class CappedCrossEntropy", "class Block", torch=torch)["CappedCrossEntropy"]


def plain(x, w, y, cap):
    logits = cap * torch.tanh((x @ w.t()) / cap)
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("n,rows", [(512, 256), (300, 128), (7, 256)])  # whole chunks, a short last one, one chunk
def test_value_and_gradients_match_the_plain_formula(n, rows):
    CE = capped_cross_entropy()
    gen = torch.Generator().manual_seed(n)
    V, D, cap = 1000, 32, 15.0
    x0 = torch.randn(n, D, generator=gen, dtype=torch.float64)
    w0 = torch.randn(V, D, generator=gen, dtype=torch.float64) * 2  # large logits: the cap bites
    y = torch.randint(0, V, (n,), generator=gen)
    out = []
    for f in (lambda x, w: plain(x, w, y, cap), lambda x, w: CE.apply(x, w, y, cap, rows)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = f(x, w)
        (3 * loss).backward()  # an upstream gradient other than 1 reaches both inputs
        out.append((loss.detach(), x.grad, w.grad))
    (l0, gx0, gw0), (l1, gx1, gw1) = out
    assert (x0 @ w0.t()).abs().max() > 3 * cap
    assert torch.allclose(l1, l0, rtol=1e-12, atol=0)
    assert torch.allclose(gx1, gx0, rtol=1e-10, atol=1e-14)
    assert torch.allclose(gw1, gw0, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape,rows", [((2, 256, 32), 256), ((3, 100, 32), 128), ((1, 7, 32), 256)])
def test_eager_logits_match_the_plain_cap(shape, rows):
    capped_logits = train_section("def capped_logits", "class Block", torch=torch)["capped_logits"]
    gen = torch.Generator().manual_seed(shape[1])
    V, cap = 1000, 15.0
    h = torch.randn(*shape, generator=gen)
    w = torch.randn(V, shape[-1], generator=gen) * 3  # large logits: the cap bites
    got = capped_logits(h, w, cap, rows)
    want = cap * torch.tanh((h @ w.t()) / cap)
    assert (h @ w.t()).abs().max() > 2 * cap
    assert got.shape == (*shape[:-1], V) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
