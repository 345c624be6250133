"""What a user of two nodes on loopback ran into (second review): each test runs the real thing."""

import os
import subprocess
import sys

from conftest import ROOT, SMALL
from node import export


def test_an_exported_file_runs_the_way_its_header_says(tmp_path, stdlib_cache):
    """An export written outside the repository (`export -o best.py`) fails under `python best.py`: it
    imports prepare from its own folder. Its header now says how to run it, and that way works."""
    prov = dict(tag=None, best="a" * 40, val_bpb=None, sha256="0" * 64, steps=[], verified=False)
    header = export.header(prov)
    assert "python -m node experiment THIS_FILE" in header and export.strip_header(header + SMALL) == SMALL
    best = tmp_path / "best.py"
    best.write_text(header + SMALL)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", AUTORESEARCH_CACHE=str(stdlib_cache))
    r = subprocess.run([sys.executable, "-m", "node", "experiment", str(best), "--budget", "2", "--profile", "tiny",
                        "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and '"status": "ok"' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_a_plain_diff_is_refused_with_the_names_it_needs(tmp_path, stdlib_data, stdlib_cache):
    """`diff -u model/train.py mine.py > fix.diff` is a unified diff, but suggest called it "not a unified
    diff (git diff format)". It is refused (its names are this machine's paths), with what to run instead,
    and what that prints is queued."""
    from node import config, loop
    home = tmp_path / "home"
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), profile="tiny", budget=2.0, listen="off")
    loop.Node(str(home), s, stdlib_data, out=open(os.devnull, "w")).close()
    base, mine = tmp_path / "train.py", tmp_path / "mine.py"
    base.write_text(open(os.path.join(ROOT, "model", "train.py")).read())
    mine.write_text(base.read_text().replace("\nMATRIX_LR = 0.04", "\nMATRIX_LR = 0.05", 1))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", AUTORESEARCH_CACHE=str(stdlib_cache))

    def suggest(*diff_args):
        patch = tmp_path / "fix.diff"
        patch.write_text(subprocess.run(["diff", "-u", *diff_args, str(base), str(mine)], capture_output=True,
                                        text=True, timeout=30).stdout)
        return subprocess.run([sys.executable, "-m", "node", "suggest", "--home", str(home), str(patch)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    r = suggest()
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "not a unified diff" not in r.stderr and f"names its files {base} and {mine}" in r.stderr
    assert "diff -u --label a/train.py --label b/train.py OLD NEW" in r.stderr
    assert os.listdir(home / "queue") == []
    r = suggest("--label", "a/train.py", "--label", "b/train.py")
    assert r.returncode == 0 and "it runs next" in r.stdout, r.stderr
    assert len(os.listdir(home / "queue")) == 1


def test_a_note_says_which_proposer_reads_it(tmp_path):
    """suggest --note answered "queued note ... for the proposer" on a node running the offline proposer,
    which never reads notes: the person believed the hint steered the runs."""
    (tmp_path / "home" / "queue").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "node", "suggest", "--home", str(tmp_path / "home"), "--note", "go deeper"],
                       cwd=ROOT, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "for the Claude proposer (the offline proposer reads no notes)" in r.stdout, r.stderr
    [name] = os.listdir(tmp_path / "home" / "queue")
    assert (tmp_path / "home" / "queue" / name).read_text() == "go deeper\n"
