import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import sources


def doc(i, n=300):
    return f"document {i}: " + "lorem ipsum dolor sit amet " * (n // 27)


def test_split_is_deterministic_disjoint_and_about_three_percent():
    docs = [doc(i) for i in range(3000)]
    train, val = sources.split_by_hash(docs)
    shuffled = docs[:] + docs[:100]  # duplicates and a different order change nothing
    random.Random(1).shuffle(shuffled)
    assert sources.split_by_hash(shuffled) == (train, val)
    assert not set(train) & set(val)
    assert len(train) + len(val) == 3000
    assert 0.015 < len(val) / 3000 < 0.045


def test_split_pins_a_validation_document_in_tiny_corpora():
    train, val = sources.split_by_hash([doc(1), doc(2)])
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(sources.SourceError, match="at least 2"):
        sources.split_by_hash([doc(1), doc(1)])


def test_local_path_reads_every_format(tmp_path):
    (tmp_path / "a.txt").write_text(doc(1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text(doc(2))
    (tmp_path / "sub" / "c.py").write_text(doc(3))
    (tmp_path / "d.jsonl").write_text("\n".join([
        json.dumps({"text": doc(4)}), json.dumps({"id": 5}), "not json", json.dumps({"text": doc(6)}), ""]))
    pq.write_table(pa.table({"text": [doc(7), doc(8)], "n": [1, 2]}), tmp_path / "e.parquet")
    (tmp_path / "tiny.txt").write_text("too short")  # under 200 bytes: dropped
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00" * 200)  # not UTF-8: dropped
    (tmp_path / "skip.csv").write_text(doc(9))  # not a text extension
    got = sources.local_docs([str(tmp_path)])
    assert sorted(got) == sorted(doc(i) for i in (1, 2, 3, 4, 6, 7, 8))
    assert sorted(sources.local_docs([str(tmp_path)], exts=(".py",))) == [doc(3)]


def test_local_path_errors_name_the_problem(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.local_docs([str(tmp_path / "missing")])
    with pytest.raises(sources.SourceError, match="no files"):
        sources.local_docs([str(tmp_path)])
    (tmp_path / "x.txt").write_text("short")
    with pytest.raises(sources.SourceError, match="no usable text"):
        sources.local_docs([str(tmp_path)])


def test_stdlib_source_reads_this_python():
    docs = sources.stdlib_docs()
    assert len(docs) > 100
    assert any("def " in d for d in docs)


def test_cap_is_a_deterministic_subset():
    docs = [doc(i, 1000) for i in range(200)]
    capped = sources.cap_docs(docs, 20_000)
    assert capped == sources.cap_docs(list(reversed(docs)), 20_000)
    assert 10_000 < sum(len(d) for d in capped) <= 20_000


def test_a_source_with_no_usable_text_says_why(tmp_path):
    """A user who gives Latin-1 files, a .jsonl without `text` or one file that is too big learns why
    nothing was kept, not only that nothing was."""
    cases = {
        "latin1": ({f"l{i}.txt": ("café " + doc(i)).encode("latin-1") for i in range(3)}, "3 not UTF-8"),
        "jsonl": ({"a.jsonl": "\n".join(json.dumps({"body": doc(i)}) for i in range(4)).encode()},
                  "4 lines without a text field"),
        "big": ({"big.txt": ("é" * 1_000_001).encode()}, "1 over 2 MB"),  # cut inside a character at 2 MB
        "csv": ({"a.csv": doc(1).encode()}, "1 of another extension"),
    }
    for name, (files, why) in cases.items():
        (tmp_path / name).mkdir()
        for fname, data in files.items():
            (tmp_path / name / fname).write_bytes(data)
        with pytest.raises(sources.SourceError, match=f"no usable text \\({why}\\)"):
            sources.local_docs([str(tmp_path / name)])


def test_jsonl_lines_that_are_not_utf8_are_skipped_not_mangled(tmp_path):
    good = [json.dumps({"text": doc(i)}).encode() for i in range(2)]
    bad = b'{"text": "caf\xe9 ' + doc(9).encode() + b'"}'
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([good[0], bad, good[1]]))
    skipped = __import__("collections").Counter()
    assert sorted(sources.local_docs([str(tmp_path)], skipped=skipped)) == sorted([doc(0), doc(1)])
    assert skipped == {"lines not UTF-8": 1}


def test_one_document_is_refused_with_what_to_give_instead():
    with pytest.raises(sources.SourceError, match="found 1 .*give a folder of files"):
        sources.split_by_hash([doc(1)])
