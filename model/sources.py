"""Where documents come from: the Python installation (`stdlib`), a local path, or
climbmix web-text shards. Every source yields the same thing: (train, val) lists of
document strings, de-duplicated and in a deterministic order, so that the same input
always prepares the same data fingerprint."""

import collections
import hashlib
import json
import os
import sys
import sysconfig
import time
import urllib.error
import urllib.request

TEXT_EXTS = (".txt", ".md", ".rst", ".py")  # one document per file
MIN_DOC_BYTES, MAX_DOC_BYTES = 200, 2_000_000  # drop stubs and generated blobs
SKIP_DIRS = ("__pycache__", ".git", ".hg", ".svn")  # hidden folders such as .venv are read
VAL_PER_MILLE = 30  # ~3 % of documents (by content hash) form the validation shard

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542  # pinned, as in autoresearch


class SourceError(Exception):
    """A source that cannot give documents; the message is one line for the user."""


def doc_hash(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_by_hash(docs):
    """De-duplicate, then send ~3 % of documents (chosen by content hash) to validation.
    Both sides are ordered by hash, so file names and walk order never matter."""
    by_hash = {doc_hash(d): d for d in docs}
    if len(by_hash) < 2:
        raise SourceError(f"need at least 2 distinct documents, found {len(by_hash)} (a .txt .md .rst .py file is one "
                          "document, as is each .jsonl line and .parquet row: give a folder of files or more lines)")
    hashes = sorted(by_hash)
    val = [h for h in hashes if int(h[:8], 16) % 1000 < VAL_PER_MILLE]
    if not val:  # tiny corpora: still pin one validation document
        val = [min(hashes, key=lambda h: int(h[:8], 16) % 1000)]
    val_set = set(val)
    return [by_hash[h] for h in hashes if h not in val_set], [by_hash[h] for h in val]


def _keep(text, skipped=None):
    n = len(text.encode("utf-8"))
    why = (f"under {MIN_DOC_BYTES} B" if n < MIN_DOC_BYTES else f"over {MAX_DOC_BYTES // 10**6} MB" if n > MAX_DOC_BYTES
           else None if text.strip() else "blank")
    if why and skipped is not None:
        skipped[why] += 1
    return not why


def _read_text(path, skipped):
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOC_BYTES + 1)
    except OSError:
        skipped["unreadable"] += 1
        return None
    if len(raw) > MAX_DOC_BYTES:  # before decoding: the cut may fall inside a character
        skipped[f"over {MAX_DOC_BYTES // 10**6} MB"] += 1
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not UTF-8"] += 1
        return None


def _docs_from_file(path, exts, skipped=None):
    """The documents of one file; what it drops, and why, is counted in `skipped` (a Counter)."""
    skipped = collections.Counter() if skipped is None else skipped
    ext = os.path.splitext(path)[1].lower()
    if ext not in exts:
        skipped["of another extension"] += 1
        return
    if ext == ".jsonl":
        try:
            f = open(path, "rb")
        except OSError:
            skipped["unreadable"] += 1
            return
        with f:
            for line in f:  # one line at a time: a file may be larger than memory
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    skipped["lines not UTF-8"] += 1
                    continue
                except json.JSONDecodeError:
                    skipped["lines not JSON"] += 1
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    skipped["lines without a text field"] += 1
                elif _keep(text, skipped):
                    yield text
    elif ext == ".parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise SourceError(f"{path}: not a readable parquet file ({e})") from None
        if "text" not in pf.schema_arrow.names:
            skipped["parquet without a text column"] += 1
            return
        for i in range(pf.num_row_groups):
            try:
                texts = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
            except Exception as e:  # corrupt pages: pyarrow raises several types
                raise SourceError(f"{path}: unreadable parquet data ({e})") from None
            for text in texts:
                if isinstance(text, str) and _keep(text, skipped):
                    yield text
    else:
        text = _read_text(path, skipped)
        if text is not None and _keep(text, skipped):
            yield text


def _walk(root, skip=()):
    if not os.path.isdir(root):
        if os.path.isfile(root):
            yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):  # regular files only: a FIFO or device would block or stream
                yield path


def describe_skipped(skipped):
    """'3 not UTF-8, 1 over 2 MB': what a source dropped, most first."""
    return ", ".join(f"{n} {why}" for why, n in skipped.most_common())


def local_docs(paths, exts=None, progress=None, skipped=None):
    """Documents from files and folders: .txt .md .rst .py (one per file), .jsonl
    (a `text` field per line), .parquet (a `text` column). What is dropped, and why, is
    counted in `skipped` (a Counter) when one is given."""
    exts = tuple(exts) if exts else TEXT_EXTS + (".jsonl", ".parquet")
    skipped = collections.Counter() if skipped is None else skipped
    for p in paths:
        if not os.path.exists(p):
            raise SourceError(f"source path does not exist: {p}")
    docs, seen_files = [], 0
    for p in paths:
        for path in _walk(p, skip=SKIP_DIRS):
            seen_files += 1
            docs.extend(_docs_from_file(path, exts, skipped))
            if progress:
                progress(seen_files, len(docs))
    if not docs:
        what = "no files" if seen_files == 0 else \
            f"{seen_files} file{'s' * (seen_files != 1)} but no usable text ({describe_skipped(skipped)})"
        raise SourceError(f"{', '.join(paths)}: {what}; documents are UTF-8 {'/'.join(exts)} of "
                          f"{MIN_DOC_BYTES} B to {MAX_DOC_BYTES // 10**6} MB each")
    return docs


def stdlib_docs(progress=None):
    """The running Python's own library sources and text files: always there, no network.
    Different Python versions give different corpora (and so different fingerprints)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = SKIP_DIRS + ("site-packages", "dist-packages", "lib-dynload", "idlelib")
    docs, n = [], 0
    for path in _walk(root, skip=skip):
        n += 1
        docs.extend(_docs_from_file(path, TEXT_EXTS))
        if progress:
            progress(n, len(docs))
    return docs


def _download(url, dest, attempts=5, log=print):
    """Resumable download: a partial file continues with an HTTP Range request."""
    part = dest + ".part"
    for attempt in range(1, attempts + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r, open(part, "ab" if r.status == 206 else "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            os.replace(part, dest)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            log(f"  attempt {attempt}/{attempts} for {os.path.basename(dest)} failed: {e}")
            time.sleep(min(2 ** attempt, 30))
    raise SourceError(f"could not download {url} after {attempts} attempts")


def climbmix_docs(download_dir, num_shards, log=print):
    """autoresearch's web-text shards: `num_shards` training shards plus the pinned
    validation shard. Returns (train, val) directly: the split is the shard, not a hash."""
    os.makedirs(download_dir, exist_ok=True)
    ids = list(range(min(num_shards, CLIMBMIX_VAL_SHARD))) + [CLIMBMIX_VAL_SHARD]
    for k, i in enumerate(ids):
        dest = os.path.join(download_dir, f"shard_{i:05d}.parquet")
        if not os.path.exists(dest):
            log(f"downloading shard {i} ({k + 1}/{len(ids)})")
            _download(f"{CLIMBMIX_URL}/shard_{i:05d}.parquet", dest, log=log)
    path = lambda i: os.path.join(download_dir, f"shard_{i:05d}.parquet")
    train = [d for i in ids[:-1] for d in _docs_from_file(path(i), (".parquet",))]
    val = list(_docs_from_file(path(CLIMBMIX_VAL_SHARD), (".parquet",)))
    if not train or not val:
        raise SourceError("climbmix shards hold no text")
    return train, val


def cap_docs(docs, max_bytes):
    """Keep a deterministic subset (smallest content hashes first) of at most max_bytes."""
    out, total = [], 0
    for d in sorted(docs, key=doc_hash):
        n = len(d.encode("utf-8"))
        if total + n > max_bytes and out:
            break
        out.append(d)
        total += n
    return out


def describe_python():
    return f"{sys.implementation.name} {sys.version.split()[0]}"
