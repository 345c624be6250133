"""The document/window attention of model/train.py: flex block masks against dense masks.
The GPU case (compiled flex, forward and backward) is the one that caught a wrong
kv-block layout on the H100; it skips where there is no CUDA."""

import pytest
import torch
import torch.nn.functional as F

from conftest import train_section


def attention_section():
    """train.py's attention helpers, without running the training script."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    return train_section("def norm(x)", "class CappedCrossEntropy", torch=torch, F=F, BlockMask=BlockMask,
                         flex_attention=flex_attention, flash_attn_varlen_func=None)


def random_docs(B, T, p, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    starts = torch.rand(B, T, generator=gen, device=device) < p
    starts[:, 0] = True
    return torch.cumsum(starts.long(), 1)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [100, 256, 263, 512])
@pytest.mark.parametrize("p", [0.0, 0.005, 0.05])
def test_block_layout_and_forward_match_the_dense_mask(window, p):
    g = attention_section()
    B, T = 3, 512
    docs = random_docs(B, T, p, seed=int(window + 1000 * p))
    block_mask = g["flex_block_mask"](docs, window)
    dense = g["attention_masks"](docs, [window])[window]  # CPU: the dense path
    present = dense.view(B, T // 128, 128, T // 128, 128).any(4).any(2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), present)
    q, k, v = torch.randn(3, B, 2, T, 16).unbind(0)
    flex = g["flex_attention"](q, k, v, block_mask=block_mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    assert (flex - sdpa).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled flex attention)")
@pytest.mark.parametrize("window", [256, 1024, 2048])
def test_compiled_flex_forward_and_backward_match_sdpa_on_gpu(window):
    g = attention_section()
    B, H, T, D = 8, 4, 2048, 128
    docs = random_docs(B, T, 1 / 400, device="cuda")
    pos = torch.arange(T, device="cuda")
    dense = (docs[:, :, None] == docs[:, None, :]) & (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)
    fn = torch.compile(lambda q, k, v: g["flex_attention"](q, k, v, block_mask=g["flex_block_mask"](docs, window)), dynamic=False)
    inputs = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]

    def run(attn):
        q, k, v = [t.clone().requires_grad_() for t in inputs[:3]]
        out = attn(q, k, v)
        (out.float() * inputs[3].float()).sum().backward()
        return out.float(), q.grad.float(), k.grad.float(), v.grad.float()

    ref = run(lambda q, k, v: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense[:, None]))
    for got, want in zip(run(fn), ref):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
