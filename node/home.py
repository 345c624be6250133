"""A node's home folder: the git tree, the identity key, the durable store of every
experiment, and the two journals derived from it (results.tsv, events.jsonl).

    HOME/tree/          git repository holding the editable train.py (branch "node")
    HOME/identity.key   Ed25519 private key, mode 0600 (gossip.identity)
    HOME/store.sqlite   every experiment and the current best: the source of truth
    HOME/results.tsv    autoresearch's columns, rewritten from the store at start
    HOME/events.jsonl   one JSON object per event
    HOME/queue/         suggestions waiting to run (python -m node suggest)
    HOME/lock           held by the running node
"""

import contextlib
import fcntl
import json
import os
import sqlite3
import tempfile
import time

import orjson

RESULTS_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")


class HomeError(Exception):
    pass


def default_home():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "autoresearch-swarm", "node")


class Lock:
    """One node per home: an flock held for the node's life (released by the kernel on any death)."""

    def __init__(self, home):
        self.path = os.path.join(home, "lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise HomeError(f"another node (pid {holder}) is running on {home}; stop it or use another --home") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        os.close(self.fd)


def device_lock_path():
    """The lock that nodes and `experiment` runs sharing a machine (one cache folder) take in turn for its accelerator."""
    from model import prepare
    return os.path.join(prepare.cache_dir(), f"device-{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}.lock")


@contextlib.contextmanager
def device_lock(path, waiting):
    """Hold the machine's lock on an accelerator for one run; `waiting()` is called once if
    another process holds it (released by the kernel on any death of the holder)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def refuse_file(home):
    """`home`, unless it is a file: HomeError."""
    if os.path.exists(home) and not os.path.isdir(home):
        raise HomeError(f"{home} is a file, not a node home (a home is a folder: --home DIR)")
    return home


def store_path(home):
    """The store of an existing home, for the commands that read one; HomeError if there is none."""
    path = os.path.join(refuse_file(home), "store.sqlite")
    if not os.path.exists(path):
        raise HomeError(f"no node home at {home} (start one with python -m node join --home {home})")
    return path


def measured_data(home):
    """The fingerprint of the data a home's scores were measured on, or None (no store yet, or
    nothing measured)."""
    path = os.path.join(home, "store.sqlite")
    if not os.path.isfile(path):
        return None
    store = Store(path)
    try:
        on = json.loads(store.get("task_of") or "{}")
        measured = any(e["val_bpb"] is not None for e in store.experiments())
    finally:
        store.db.close()
    return on.get("data") if measured else None


def node_id(home):
    """The id of the node that lives here, or None before its first start (reading creates no key)."""
    key = os.path.join(home, "identity.key")
    if not os.path.exists(key):
        return None
    from gossip.identity import Identity
    return Identity.load(key).id


def lock_held(home):
    """Whether a node is running on this home now."""
    try:
        fd = os.open(os.path.join(home, "lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,          -- baseline | candidate | suggestion | rerun | remeasure | verify
    started REAL NOT NULL,
    finished REAL,
    parent TEXT NOT NULL,        -- commit the candidate was made from
    commit_ TEXT,                -- the candidate's commit
    description TEXT NOT NULL,
    proposer TEXT NOT NULL,
    status TEXT NOT NULL,        -- running | keep | discard | crash | interrupted | rejected
    val_bpb REAL,
    memory_gb REAL,
    noise REAL,                  -- the noise estimate when it was decided
    edit TEXT,                   -- the proposer's structured edit (JSON), for the offline proposer
    result TEXT,                 -- the sandbox result (JSON)
    usage TEXT                   -- the model's tokens and cost for this candidate's proposal (JSON), if any
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, at REAL NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (hash TEXT PRIMARY KEY, text TEXT NOT NULL);  -- train.py by SHA-256
CREATE TABLE IF NOT EXISTS verdicts (        -- our verdict on each foreign improvement
    improvement TEXT PRIMARY KEY,            -- record id, hex
    verdict TEXT NOT NULL,                   -- confirmed | refuted | failed_to_apply | crashed | violation | held
    at REAL NOT NULL,
    commit_ TEXT,                            -- the rebased candidate, when one ran
    note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (          -- signed records, written with the decision they announce
    id INTEGER PRIMARY KEY,
    record BLOB NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
);
"""


NOT_A_DATABASE = ("file is not a database", "database disk image is malformed", "unable to open database file")


@contextlib.contextmanager
def opening(path, what):
    """Turn SQLite's refusal to open `path` as a database into a HomeError that names the file."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if not any(m in str(e) for m in NOT_A_DATABASE):
            raise
        why = "it is a directory" if os.path.isdir(path) else str(e)
        raise HomeError(f"{path} is not {what} ({why})") from None


def stores(home):
    """(the store, the gossip records) of an existing home, for the commands that read one: the store
    is opened first (HomeError when there is no node here), so that nothing is created in another folder."""
    store = Store(store_path(home))
    try:
        from gossip import store as records_store
        path = os.path.join(home, "gossip.sqlite")
        with opening(path, "a node's gossip store"):
            return store, records_store.Store(path)
    except BaseException:
        store.db.close()
        raise


def records(home):
    """The gossip records of an existing home alone (HomeError when there is no node here)."""
    store, held = stores(home)
    store.db.close()
    return held


ADDED_COLUMNS = (("usage", "TEXT"),)  # experiments' columns newer than some stores: added on open


class Store:
    """SQLite, every write a durable transaction."""

    def __init__(self, path):
        """HomeError naming the file when it is not a node's store (a locked or full database
        stays an sqlite3 error: it is a node's store, busy or out of space)."""
        with opening(path, "a node's store"):
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            try:
                self.db.row_factory = sqlite3.Row
                tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and "experiments" not in tables:  # another program's database: leave it as it is
                    raise HomeError(f"{path} is not a node's store (a database without an experiments table)")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
                self._migrate()
            except BaseException:
                self.db.close()
                raise

    def _migrate(self):
        """Columns added since a store was created (a status command may race a starting node)."""
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(experiments)")}
        for column, kind in ADDED_COLUMNS:
            if column not in have:
                try:
                    self.db.execute(f"ALTER TABLE experiments ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):
                        raise

    def get(self, key, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def start(self, kind, parent, commit, description, proposer, edit=None, usage=None):
        cur = self.db.execute(
            "INSERT INTO experiments (kind, started, parent, commit_, description, proposer, status, edit, usage) "
            "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            (kind, time.time(), parent, commit, description, proposer, json.dumps(edit) if edit is not None else None,
             json.dumps(usage) if usage is not None else None))
        return cur.lastrowid

    def finish(self, exp_id, status, val_bpb=None, memory_gb=None, noise=None, result=None):
        """Record a run's outcome."""
        self.db.execute("UPDATE experiments SET status = ?, finished = ?, val_bpb = ?, memory_gb = ?, noise = ?, "
                        "result = ? WHERE id = ?", (status, time.time(), val_bpb, memory_gb, noise, result, exp_id))

    def decide(self, ids, status, best=None, records=(), verdicts=()):
        """Give measured runs their final status; when `best` is given, make it the kept commit;
        queue the signed records that announce it and note our verdicts (improvement hex, verdict,
        commit, note) on foreign improvements: one transaction."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE experiments SET status = ? WHERE id = ? AND status = 'measured'",
                                [(status, i) for i in ids])
            if best is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('best_commit', ?)", (best,))
            self.db.executemany("INSERT INTO outbox (record) VALUES (?)", [(r,) for r in records])
            self.db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                                [(v[0], v[1], time.time(), v[2], v[3]) for v in verdicts])

    def unsent(self):
        return self.db.execute("SELECT id, record FROM outbox WHERE sent = 0 ORDER BY id").fetchall()

    def sent(self, row_id):
        self.db.execute("UPDATE outbox SET sent = 1 WHERE id = ?", (row_id,))

    def verdicts(self):
        return {r["improvement"]: r for r in self.db.execute("SELECT * FROM verdicts")}

    def add_source(self, text):
        from node.swarm import content_hash
        h = content_hash(text)
        self.db.execute("INSERT OR IGNORE INTO sources VALUES (?, ?)", (h, text))
        return h

    def source(self, h):
        row = self.db.execute("SELECT text FROM sources WHERE hash = ?", (h,)).fetchone()
        return row[0] if row else None

    def bump(self, key, by=1):
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                        (key, str(by), by))

    def set(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def experiments(self):
        return self.db.execute("SELECT * FROM experiments ORDER BY id").fetchall()

    def last_kind(self):
        """The kind of the last run decided (None before any)."""
        row = self.db.execute("SELECT kind FROM experiments WHERE status NOT IN ('running', 'measured') "
                              "ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def mark_interrupted(self):
        """Runs that were under way, or measured but not yet decided, when the node died."""
        return self.db.execute("UPDATE experiments SET status = 'interrupted', finished = coalesce(finished, ?) "
                               "WHERE status IN ('running', 'measured')", (time.time(),)).rowcount

    def add_note(self, text):
        self.db.execute("INSERT INTO notes (at, text) VALUES (?, ?)", (time.time(), text))

    def notes(self):
        return [r["text"] for r in self.db.execute("SELECT text FROM notes ORDER BY id")]


def _counts(e):
    """Whether a run's score counts: scored, and decided or awaiting its decision."""
    return e["val_bpb"] is not None and e["status"] in ("keep", "discard", "measured")


def measurements(experiments):
    """commit -> val_bpb of every scored run of it that counts."""
    out = {}
    for e in filter(_counts, experiments):
        out.setdefault(e["commit_"], []).append(e["val_bpb"])
    return out


def measured_steps(experiments):
    """commit -> (val_bpb, optimizer steps as the run reported them, or None) of the runs measurements() counts."""
    out = {}
    for e in filter(_counts, experiments):
        steps = json.loads(e["result"]).get("num_steps") if e["result"] else None
        out.setdefault(e["commit_"], []).append((e["val_bpb"], steps if isinstance(steps, int) else None))
    return out


def results_row(exp):
    """One results.tsv line (autoresearch's columns) for a finished experiment, or None."""
    if exp["status"] not in ("keep", "discard", "crash"):
        return None
    desc = " ".join(exp["description"].split())  # one line, no tabs
    return "\t".join([(exp["commit_"] or exp["parent"])[:7], f"{exp['val_bpb'] or 0.0:.6f}",
                      f"{exp['memory_gb'] or 0.0:.1f}", exp["status"], desc])


def write_results(path, experiments):
    """Rewrite results.tsv from the store, atomically."""
    lines = ["\t".join(RESULTS_COLUMNS)] + [r for r in map(results_row, experiments) if r]
    _atomic_write(path, "\n".join(lines) + "\n")


def append_results(path, exp):
    row = results_row(exp)
    if row:
        _append(path, (row + "\n").encode())


class Events:
    """events.jsonl: appended and fsynced; a torn last line from a crash is cut at start."""

    def __init__(self, path):
        self.path = path
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)

    def __call__(self, event, **fields):
        _append(self.path, orjson.dumps({"t": round(time.time(), 3), "event": event, **fields}) + b"\n")


class OutputError(Exception):
    pass


def unwritable(path):
    """Why a read command cannot write its output (export -o, plot -o) to `path`, or None."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory: name a file to write"
    if not os.path.exists(parent):
        return f"cannot write {path}: there is no folder {parent}"
    if not os.path.isdir(parent):
        return f"cannot write {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path}: the folder {parent} is not writable"
    return None


@contextlib.contextmanager
def output_file(path):
    """Yield a temporary path beside `path` to write, then put it in place atomically; on any
    failure the temporary is removed and `path` left as it was (OutputError when it cannot be written)."""
    bad = unwritable(path)
    if bad:
        raise OutputError(bad)
    target = os.path.abspath(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix="." + os.path.basename(target) + ".", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, os.stat(target).st_mode & 0o7777 if os.path.exists(target) else 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _append(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
