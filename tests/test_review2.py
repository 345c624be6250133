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

