"""The read commands open the node's store once."""

import os
import sys

import pytest

from node import export, home as homes, knowledge


@pytest.fixture
def store_opens():
    """The paths sqlite3.connect is given while the test runs (an audit hook: stays for the process, inert after)."""
    opened = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "sqlite3.connect":
            opened.append(os.path.basename(str(args[0])))
    sys.addaudithook(hook)
    yield opened
    active[0] = False


def _baseline_home(path):
    path.mkdir()
    store = homes.Store(str(path / "store.sqlite"))
    store.finish(store.start("baseline", "a" * 40, "b" * 40, "baseline", "-"), "keep", val_bpb=3.5)
    store.db.close()
    return path


def test_knowledge_and_export_open_the_store_once(tmp_path, store_opens):
    home = str(_baseline_home(tmp_path / "home"))
    store_opens.clear()
    assert knowledge.read(home)["ideas"] == []
    with pytest.raises(export.ExportError, match="no experiments yet"):  # said once both stores are read
        export.provenance(home)
    assert store_opens == ["store.sqlite", "gossip.sqlite"] * 2
