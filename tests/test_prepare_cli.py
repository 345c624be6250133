import os
import re

import numpy as np
import pytest

from conftest import run_prepare


def fingerprint(stdout):
    return re.search(r"^fingerprint:\s+([0-9a-f]{64})$", stdout, re.M).group(1)


def data_folders(cache):
    root = cache / "data"
    return sorted(os.listdir(root)) if root.exists() else []


@pytest.mark.parametrize("make", ["missing", "empty", "no_text"])
def test_bad_source_is_one_line_exit_2_and_leaves_nothing(tmp_path, make):
    src = tmp_path / "src"
    if make != "missing":
        src.mkdir()
    if make == "no_text":
        (src / "a.txt").write_bytes(b"\x00\xff" * 500)
        (src / "b.md").write_text("hi")
    cache = tmp_path / "cache"
    r = run_prepare(cache, "--source", str(src))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(src) in lines[0]
    assert data_folders(cache) == []
    assert not (cache / "current").exists()


def test_prepare_is_deterministic_and_rerun_is_instant(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for i in range(40):
        text = " ".join(words[(i * 7 + k) % 10] + str(k % (i + 3)) for k in range(400))
        (src / f"f{i}.txt").write_text(text)
    first = run_prepare(tmp_path / "c1", "--source", str(src))
    assert first.returncode == 0, first.stderr
    again = run_prepare(tmp_path / "c1", "--source", str(src))
    assert fingerprint(again.stdout) == fingerprint(first.stdout)
    assert "already prepared" in again.stderr
    # same content under other names, in another cache: the same fingerprint
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, f in enumerate(sorted(src.iterdir(), reverse=True)):
        (renamed / f"doc{i}.md").write_text(f.read_text())
    other = run_prepare(tmp_path / "c2", "--source", str(renamed))
    assert fingerprint(other.stdout) == fingerprint(first.stdout)
    # one changed byte: another fingerprint
    (src / "f0.txt").write_text((src / "f0.txt").read_text() + "!")
    changed = run_prepare(tmp_path / "c1", "--source", str(src))
    assert fingerprint(changed.stdout) != fingerprint(first.stdout)
    assert len(data_folders(tmp_path / "c1")) == 2


@pytest.mark.parametrize("victim", ["train.bin", "tokenizer.json", "val_docs.npy"])
def test_corrupt_cache_is_refused_then_rebuilt(stdlib_cache, tmp_path, monkeypatch, victim):
    import shutil
    import prepare
    cache = tmp_path / "cache"
    shutil.copytree(stdlib_cache, cache)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    data = prepare.load_data()
    original = np.array(data.train)
    path = os.path.join(data.folder, victim)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(prepare.DataError, match=f"{victim}.*: rerun `python -m model.prepare` with the arguments "
                                                 "that made it .source stdlib:.* to rebuild it"):
        prepare.load_data()
    r = run_prepare(cache, "--source", "stdlib", "--max-mb", "3")
    assert r.returncode == 0 and "rebuilding" in r.stderr, r.stderr
    assert prepare.load_data().fingerprint == data.fingerprint
    assert np.array_equal(np.fromfile(os.path.join(data.folder, "train.bin"), dtype=np.uint16), original)


def test_missing_data_is_a_clear_error(cache):
    import prepare
    with pytest.raises(prepare.DataError, match="run `python -m model.prepare"):
        prepare.load_data()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_max_mb_is_refused(tmp_path, value):
    r = run_prepare(tmp_path / "cache", "--source", "stdlib", "--max-mb", value)
    assert r.returncode == 2 and "--max-mb must be a positive number" in r.stderr
    assert data_folders(tmp_path / "cache") == []


def test_special_and_unreadable_files_are_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe.txt")  # would block a reader forever
    os.symlink(tmp_path / "missing.jsonl", src / "broken.jsonl")
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"document {i} " * 60)
    r = run_prepare(tmp_path / "cache", "--source", str(src), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 documents" in r.stderr or "2 training and 1 validation" in r.stderr
    assert "warning: the validation split holds" in r.stderr  # a few hundred tokens: said, not refused


def test_what_prepare_skips_is_said(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"document {i} " * 60)
        (src / f"latin{i}.txt").write_bytes(f"café {i} ".encode("latin-1") * 60)
    r = run_prepare(tmp_path / "cache", "--source", str(src), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped 3 not UTF-8" in r.stderr.splitlines()


def test_each_tokenizing_step_is_logged_once_when_it_is_quick(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"document {i} " * 60)
    r = run_prepare(tmp_path / "cache", "--source", str(src), timeout=120)
    assert r.returncode == 0, r.stderr
    progress = [line for line in r.stderr.splitlines() if line.startswith("tokenizing")]
    assert len(progress) == len(set(progress)) == 2, r.stderr  # train and val, once each
