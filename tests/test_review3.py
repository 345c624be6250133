"""A new user's first steps: data that cannot be prepared, told once and leaving nothing behind."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_join_on_data_that_cannot_be_prepared_is_one_line_and_leaves_no_home(tmp_path):
    empty, home, cache = tmp_path / "empty", tmp_path / "home", tmp_path / "cache"
    empty.mkdir()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", AUTORESEARCH_CACHE=str(cache),
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    r = subprocess.run([sys.executable, "-m", "node", "join", "--home", str(home), "--config", "configs/cpu.toml",
                        "--data", str(empty), "--listen", "off", "--max-experiments", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(empty) in lines[0], r.stderr
    assert not home.exists()
    assert not (cache / "data").exists() or os.listdir(cache / "data") == []
