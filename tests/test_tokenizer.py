import numpy as np
from hypothesis import given, settings, strategies as st

import prepare


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300))
def test_round_trip_and_byte_counts(stdlib_data, text):
    tok = stdlib_data.tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert int(stdlib_data.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_bos_and_vocabulary(stdlib_data):
    tok = stdlib_data.tokenizer()
    assert tok.token_to_id(prepare.BOS_TOKEN) == stdlib_data.bos_id == 0
    assert stdlib_data.token_bytes[stdlib_data.bos_id] == 0
    assert stdlib_data.vocab_size == tok.get_vocab_size() == prepare.VOCAB_SIZE
    assert (stdlib_data.token_bytes[1:] > 0).all()


def test_every_document_starts_with_bos(stdlib_data):
    for tokens, offsets in ((stdlib_data.train, stdlib_data.train_docs), (stdlib_data.val, stdlib_data.val_docs)):
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        assert (np.asarray(tokens)[offsets[:-1]] == stdlib_data.bos_id).all()
        assert (np.diff(offsets) > 1).all()


def test_training_is_deterministic():
    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}  # numbers and names\n" * 5 for i in range(50)]
    a, b = prepare.train_tokenizer(docs, 600), prepare.train_tokenizer(docs, 600)
    assert a.to_str() == b.to_str()


def test_bos_text_inside_a_document_is_not_a_bos(stdlib_data):
    tok = stdlib_data.tokenizer()
    ids = tok.encode("x = '<|bos|>'", add_special_tokens=False).ids
    assert stdlib_data.bos_id not in ids
    assert tok.decode(ids) == "x = '<|bos|>'"
