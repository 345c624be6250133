import numpy as np
import torch
from hypothesis import given, settings, strategies as st

import prepare

BOS = 0


def corpus(lengths, seed=0):
    """Documents of the given lengths (BOS included), each token unique: its position + 1."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.int64)
    tokens[offsets[:-1]] = BOS
    return tokens, offsets


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(2, 90), min_size=1, max_size=60), st.integers(4, 33), st.integers(1, 12))
def test_pack_rows_loses_no_token_and_aligns_rows(lengths, row_len, buffer_docs):
    tokens, offsets = corpus(lengths)
    order = ((d, 1) for d in range(len(lengths)))
    rows = [row for row, _ in prepare.pack_rows(offsets, row_len, order, buffer_docs)]
    seen = []
    for k, row in enumerate(rows):
        out = np.full(row_len, -1)
        prepare.fill_row(out, tokens, row, BOS)
        size = sum(n + bos for _, n, bos in row)
        assert size == row_len or k == len(rows) - 1  # only the last row may be short
        assert out[0] == BOS  # every row starts a document or a continuation
        seen += [t for start, n, _ in row for t in range(start, start + n)]
    assert sorted(seen) == list(range(offsets[-1]))  # every token exactly once


def reference_eval_rows(tokens, offsets, row_len, n_rows, buffer=1000):
    """autoresearch's validation packing, written plainly: docs in order, cycling;
    largest doc that fits (first on ties), else crop the shortest."""
    docs = [list(tokens[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
    stream = (docs[i % len(docs)] for i in range(10**9))
    buf, rows = [], []
    for _ in range(n_rows):
        row = []
        while len(row) < row_len:
            while len(buf) < buffer:
                buf += [next(stream) for _ in range(128)]
            free = row_len - len(row)
            best = max(range(len(buf)), key=lambda i: (len(buf[i]) <= free, len(buf[i]) if len(buf[i]) <= free else 0, -i))
            if len(buf[best]) > free:
                best = min(range(len(buf)), key=lambda i: (len(buf[i]), i))
            row += buf.pop(best)[:free]
        rows.append(row)
    return np.array(rows)


def test_eval_rows_follow_the_reference_protocol():
    rng = np.random.default_rng(3)
    tokens, offsets = corpus(rng.integers(2, 400, size=300))
    got = prepare.eval_rows(tokens, offsets, seq_len=128, eval_tokens=128 * 40)
    assert got.shape == (40, 129)
    assert np.array_equal(got, reference_eval_rows(tokens, offsets, 129, 40))
    assert (got[:, 0] == BOS).all()


def test_train_loader_batches(stdlib_data):
    loader = prepare.TrainLoader(stdlib_data, 4, 32, "cpu", seed=0)
    x, y, epoch = next(loader)
    x2, _, _ = next(loader)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long and epoch == 1
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert (x[:, 0] == stdlib_data.bos_id).all()
    assert not torch.equal(x, x2)
    # the same seed gives the same stream
    again = prepare.TrainLoader(stdlib_data, 4, 32, "cpu", seed=0)
    assert torch.equal(next(again)[0], x)
