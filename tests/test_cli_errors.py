"""Bad input to the read commands (status, watch, export, knowledge, plot): one `error:` line on
stderr, exit 2, no traceback, and nothing created or changed. Each test runs the real CLI; the
homes are built by hand (no training), only as far as each case needs."""

import hashlib
import os
import sqlite3
import subprocess
import sys

import pytest

from node import home as homes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One cache folder for the module, outside the folders compared (matplotlib keeps its fonts there),
    so that no command finds a default home."""
    global CACHE
    CACHE = str(tmp_path_factory.mktemp("cache"))


def cli(tmp_path, *args):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=CACHE)
    return subprocess.run([sys.executable, "-m", "node", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def refused(r):
    """The command answered with one `error:` line and exit 2; the line, for its wording."""
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def files(folder):
    """Every path under `folder` with a digest of its bytes: what must not change."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def scored_home(path):
    """A home whose store holds a baseline and a kept run: enough for plot, nothing else."""
    path.mkdir()
    store = homes.Store(str(path / "store.sqlite"))
    for kind, status, bpb in (("baseline", "keep", 3.5), ("candidate", "keep", 3.4), ("candidate", "discard", 3.6)):
        store.finish(store.start(kind, "a" * 40, "b" * 40, "a change", "offline"), status, val_bpb=bpb)
    store.db.close()
    return path


# -- a folder whose store.sqlite is not a node's store -----------------------------------------

READERS = (("status",), ("watch", "--once"), ("export",), ("knowledge",), ("plot",))


def _garbage(path):
    path.write_bytes(bytes(range(100)))


def _directory(path):
    path.mkdir()


def _foreign(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE songs (title TEXT)")
    db.commit()
    db.close()


@pytest.mark.parametrize("command", READERS + (("join", "--listen", "off", "--no-mdns"),), ids=lambda c: c[0])
@pytest.mark.parametrize("make,why", [(_garbage, "file is not a database"), (_directory, "it is a directory"),
                                      (_foreign, "a database without an experiments table")], ids=["garbage", "directory", "foreign"])
def test_a_store_that_is_not_a_database_is_refused(tmp_path, command, make, why):
    home = tmp_path / "notahome"
    home.mkdir()
    make(home / "store.sqlite")
    before = files(home)
    line = refused(cli(tmp_path, *command, "--home", home))
    assert f"{home / 'store.sqlite'} is not a node's store ({why}" in line
    assert files(home) == before  # no gossip.sqlite, no -wal, no -shm


@pytest.mark.parametrize("command", (("watch", "--once"), ("export",), ("knowledge",)), ids=lambda c: c[0])
def test_a_gossip_store_that_is_not_a_database_is_refused(tmp_path, command):
    home = scored_home(tmp_path / "home")
    (home / "gossip.sqlite").write_bytes(bytes(range(100)))
    before = files(home)
    line = refused(cli(tmp_path, *command, "--home", home))
    assert f"{home / 'gossip.sqlite'} is not a node's gossip store (file is not a database)" in line
    assert files(home) == before


def test_watch_creates_nothing_in_a_folder_without_a_store(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert "no node home" in refused(cli(tmp_path, "watch", "--once", "--home", folder))
    assert files(folder) == {}


@pytest.mark.parametrize("command", READERS + (("join", "--profile", "tiny", "--listen", "off"),), ids=lambda c: c[0])
def test_a_home_that_is_a_file_is_named_as_one(tmp_path, command):
    home = tmp_path / "notes.txt"
    home.write_text("a file")
    why = refused(cli(tmp_path, *command, "--home", home))
    assert "is a file, not a node home" in why and "start one" not in why
    assert home.read_text() == "a file"


# -- export -o and plot -o: where the output cannot go ------------------------------------------

def _bad_outputs(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep me\n")
    return {"directory": (tmp_path / "adir", "is a directory"),
            "no folder": (tmp_path / "missing" / "x.py", "there is no folder"),
            "under a file": (tmp_path / "afile" / "x.py", "is not a folder")}


@pytest.mark.parametrize("command", ("export", "plot"))
@pytest.mark.parametrize("case", ("directory", "no folder", "under a file"))
def test_an_output_that_cannot_be_written_is_refused(tmp_path, command, case):
    home = scored_home(tmp_path / "home")
    out, why = _bad_outputs(tmp_path)[case]
    before = files(tmp_path)
    line = refused(cli(tmp_path, command, "--home", home, "-o", out))
    assert why in line and str(out) in line
    assert files(tmp_path) == before  # no DIR.tmp, no DIR.tmp.png


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_plot_to_a_folder_that_refuses_files_leaves_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    home = scored_home(tmp_path / "home")
    before = files(tmp_path)
    line = refused(cli(tmp_path, "plot", "--home", home, "-o", "/proc/progress.png"))
    assert "cannot write /proc/progress.png" in line
    assert files(tmp_path) == before and not os.path.exists("/proc/progress.png")


def test_plot_refuses_a_format_it_cannot_write(tmp_path):
    pytest.importorskip("matplotlib")
    home = scored_home(tmp_path / "home")
    before = files(tmp_path)
    line = refused(cli(tmp_path, "plot", "--home", home, "-o", tmp_path / "progress.xyz"))
    assert "cannot write .xyz files" in line and ".svg" in line
    assert files(tmp_path) == before


@pytest.mark.parametrize("name,magic", [("progress.svg", b"<?xml"), ("progress.pdf", b"%PDF"),
                                        ("progress.png", b"\x89PNG")])
def test_plot_writes_the_format_its_name_asks_for(tmp_path, name, magic):
    pytest.importorskip("matplotlib")
    home = scored_home(tmp_path / "home")
    r = cli(tmp_path, "plot", "--home", home, "-o", tmp_path / name)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert oct((tmp_path / name).stat().st_mode & 0o777) != oct(0o600)  # not the temporary's private mode
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or ".tmp." in n]


# -- watch's arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,why", [(("--interval", "-1"), "--interval"), (("--interval", "0"), "--interval"),
                                      (("--interval", "nan"), "--interval"), (("--interval", "inf"), "--interval"),
                                      (("--json",), "--json needs --once")],
                         ids=["negative", "zero", "nan", "inf", "json-live"])
def test_watch_refuses_bad_arguments(tmp_path, args, why):
    home = scored_home(tmp_path / "home")
    before = files(home)
    assert why in refused(cli(tmp_path, "watch", "--home", home, *args))
    assert files(home) == before


# -- a reader that leaves: python -m node status | head -1 ---------------------------------------

@pytest.mark.parametrize("command", (("status",), ("status", "--json"), ("knowledge",)), ids=" ".join)
def test_a_reader_that_leaves_gets_no_traceback(tmp_path, command):
    """`python -m node knowledge | head -5` on a node of two answered with a BrokenPipeError traceback."""
    home = scored_home(tmp_path / "home")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=CACHE)
    p = subprocess.Popen([sys.executable, "-m", "node", *command, "--home", str(home)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader is gone before anything is written
    try:
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert p.returncode == 1
