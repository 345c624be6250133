import math

import numpy as np
import pytest
import torch

import prepare


def test_bpb_counts_by_hand():
    # vocabulary of 4; token 0 is special (0 bytes); uniform logits: ln 4 nats per token
    token_bytes = torch.tensor([0, 1, 3, 2])
    logits = torch.zeros(1, 3, 4)
    targets = torch.tensor([[1, 2, 0]])
    nats, nbytes = prepare.bpb_counts(logits, targets, token_bytes)
    assert nbytes == 4  # 1 + 3; the special target counts nothing
    assert nats == pytest.approx(2 * math.log(4))
    assert nats / (math.log(2) * nbytes) == pytest.approx(1.0)  # 4 bits over 4 bytes
    # p = (1/4, 3/4) for target 1 (3 bytes): -ln(3/4) nats
    nats, nbytes = prepare.bpb_counts(torch.log(torch.tensor([[[1.0, 3.0]]])), torch.tensor([[1]]), torch.tensor([1, 3]))
    assert (nats, nbytes) == (pytest.approx(-math.log(0.75)), 3)


class FakeData:
    def __init__(self, rng, vocab=50, docs=40):
        lens = rng.integers(5, 120, size=docs)
        toks = [np.concatenate([[0], rng.integers(1, vocab, size=n)]) for n in lens]
        self.val = np.concatenate(toks).astype(np.uint16)
        self.val_docs = np.concatenate([[0], np.cumsum([len(t) for t in toks])])
        self.token_bytes = np.concatenate([[0], rng.integers(1, 5, size=vocab - 1)]).astype(np.int64)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 16])
def test_evaluate_bpb_uniform_model_and_batching(batch_size):
    data = FakeData(np.random.default_rng(0))
    V = len(data.token_bytes)
    uniform = lambda x: torch.zeros(*x.shape, V)
    got = prepare.evaluate_bpb(uniform, data, batch_size, "cpu", seq_len=64, eval_tokens=64 * 10)
    rows = prepare.eval_rows(data.val, data.val_docs, 64, 64 * 10)
    b = data.token_bytes[rows[:, 1:]]
    assert got == pytest.approx((b > 0).sum() * math.log2(V) / b.sum())


def test_unscored_infinite_logits_do_not_poison_the_sum():
    # a model that never predicts BOS (logit -inf) is fine: BOS targets are not scored
    logits = torch.zeros(1, 2, 4)
    logits[..., 0] = -math.inf
    nats, nbytes = prepare.bpb_counts(logits, torch.tensor([[0, 2]]), torch.tensor([0, 1, 3, 2]))
    assert (nats, nbytes) == (pytest.approx(math.log(3)), 3)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_non_finite_logit_anywhere_is_refused_by_the_harness(bad):
    from sandbox import evaluate

    class Local:  # the harness's model interface, served in this process
        def send(self, x):
            self.x = x

        def receive(self):
            out = torch.zeros(*self.x.shape, 8)
            if self.x[0, 0] == 7:
                out[1, 2, 5] = bad  # one logit of one batch, at a position no target asks about
            return out

        def release(self):
            pass
    rows = np.ones((6, 5), dtype=np.int64)
    rows[2:4, 0] = 7
    with pytest.raises(evaluate.ModelError, match="nan_logits"):
        evaluate.score(Local(), rows, np.ones(8, dtype=np.int64), 2, {})
    rows[2:4, 0] = 1
    assert evaluate.score(Local(), rows, np.ones(8, dtype=np.int64), 2, {})[0] == pytest.approx(3.0)
