"""The fixed harness around train.py: the constants that define the metric, data
preparation, the tokenizer, the training dataloader and the evaluation protocol.
Nodes never edit this file; the swarm evolves train.py only.

    python -m model.prepare --source stdlib          # offline corpus from this Python
    python -m model.prepare --source ~/corpus --ext .py
    python -m model.prepare --source climbmix --num-shards 8

Prepared data lives in CACHE/data/<fingerprint>/ where the fingerprint hashes the
tokenizer and every token of the training and validation shards.
"""

import argparse
import bisect
import collections
import hashlib
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

try:
    from . import sources
except ImportError:  # imported as top-level `prepare` (python model/train.py)
    import sources

# ---------------------------------------------------------------------------
# Constants that define the metric (fixed)
# ---------------------------------------------------------------------------

VOCAB_SIZE = 8192


def _budget():
    raw = os.environ.get("AUTORESEARCH_TIME_BUDGET", "300")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise SystemExit(f"error: AUTORESEARCH_TIME_BUDGET={raw!r} is not a positive number of seconds")
    return value


TIME_BUDGET = _budget()  # training seconds
BOS_TOKEN = "<|bos|>"  # starts every document; id 0
# GPT-4 style split, numbers in groups of at most two (as autoresearch)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_MAX_CHARS, TOKENIZER_DOC_CAP = 1_000_000_000, 10_000  # text the BPE trainer sees
# A profile fixes sequence length and evaluation size; results compare only within one.
PROFILES = {
    "gpu": dict(max_seq_len=2048, eval_tokens=4 * 2**19),
    "cpu": dict(max_seq_len=256, eval_tokens=2**16),
    "tiny": dict(max_seq_len=128, eval_tokens=2**14),  # slow machines and smoke tests: a quarter of cpu's evaluation
}
EVAL_BUFFER_DOCS = 1000  # best-fit packing of validation rows, as autoresearch


def _detect_profile():
    name = os.environ.get("AUTORESEARCH_PROFILE")
    if name is None:
        import torch
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise SystemExit(f"error: AUTORESEARCH_PROFILE={name!r} is not one of {', '.join(PROFILES)}")
    return name


def __getattr__(name):
    """PROFILE, MAX_SEQ_LEN and EVAL_TOKENS, detected when first asked for: without
    AUTORESEARCH_PROFILE that imports torch (1-2 s), which preparing data does not need."""
    if name not in ("PROFILE", "MAX_SEQ_LEN", "EVAL_TOKENS"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    profile = _detect_profile()
    defined = _AS_DEFINED[profile]
    globals().update(PROFILE=profile, MAX_SEQ_LEN=defined["max_seq_len"], EVAL_TOKENS=defined["eval_tokens"])
    return globals()[name]


_AS_DEFINED = {name: dict(p) for name, p in PROFILES.items()}  # what these constants follow, whatever changes PROFILES later


def _profile(key):
    return _AS_DEFINED[__getattr__("PROFILE")][key]


def cache_dir():
    if os.environ.get("AUTORESEARCH_CACHE"):
        return os.path.abspath(os.environ["AUTORESEARCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "autoresearch-swarm")


def use_compile_cache():
    """Persist torch.compile's caches under the cache folder: a warm start skips compilation."""
    path = os.path.join(cache_dir(), "inductor")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(path, "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


class DataError(Exception):
    """Prepared data that is missing or does not match its fingerprint."""


class NoDataError(DataError):
    """Nothing has been prepared in this cache yet."""


# ---------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained locally with HF `tokenizers`
# ---------------------------------------------------------------------------

def _byte_of_char():
    """Inverse of the byte-level alphabet: printable stand-in character -> raw byte."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def train_tokenizer(docs, vocab_size=VOCAB_SIZE):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def capped():
        n = 0
        for d in docs:
            d = d[:TOKENIZER_DOC_CAP]
            yield d
            n += len(d)
            if n >= TOKENIZER_MAX_CHARS:
                return
    tok.train_from_iterator(capped(), trainer)
    tok.encode_special_tokens = True  # "<|bos|>" inside a document is text, not a BOS
    return tok


def token_byte_lengths(tok):
    """Bytes each token stands for; 0 for special tokens, which the metric skips."""
    byte_of = _byte_of_char()
    vocab = tok.get_vocab()
    out = np.zeros(tok.get_vocab_size(), dtype=np.int32)
    for piece, i in vocab.items():
        out[i] = 0 if piece == BOS_TOKEN else sum(1 for c in piece if c in byte_of)
    return out


def encode_docs(tok, docs, progress=None, batch=256):
    """Flat uint16 token stream with a BOS before every document, and the offset of
    each document's BOS (plus a final end offset)."""
    bos = tok.token_to_id(BOS_TOKEN)
    parts, offsets, n = [], [0], 0
    for i in range(0, len(docs), batch):
        for enc in tok.encode_batch_fast(docs[i:i + batch], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=np.uint16)
            ids[0] = bos
            ids[1:] = enc.ids
            parts.append(ids)
            n += len(ids)
            offsets.append(n)
        if progress:
            progress(min(i + batch, len(docs)))
    return np.concatenate(parts), np.asarray(offsets, dtype=np.int64)


# ---------------------------------------------------------------------------
# Building the cache: temporary folder, checked, renamed into place
# ---------------------------------------------------------------------------

DATA_FILES = ("tokenizer.json", "token_bytes.npy", "train.bin", "train_docs.npy", "val.bin", "val_docs.npy")
TRAIN_FILES = ("manifest.json", "tokenizer.json", "token_bytes.npy", "train.bin", "train_docs.npy")  # what a candidate sees


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(file_hashes):
    return hashlib.sha256("".join(f"{n}:{file_hashes[n]}\n" for n in DATA_FILES).encode()).hexdigest()


def verify(folder, hashes=None):
    """Recompute every file hash (or take `hashes`, {name: sha256}, that the caller computed from the
    files' bytes) and the fingerprint; raise DataError on any mismatch."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        hashes = {n: hashes[n] if hashes else _sha256(os.path.join(folder, n)) for n in DATA_FILES}
    except (OSError, ValueError) as e:
        raise DataError(f"prepared data at {folder} is incomplete: {e}") from None
    try:
        bad = [n for n in DATA_FILES if hashes[n] != manifest["files"][n]["sha256"]]
        fingerprint = manifest["fingerprint"]
    except (KeyError, TypeError):
        raise DataError(f"prepared data at {folder} has a malformed manifest") from None
    if bad or _fingerprint(hashes) != fingerprint or not folder.endswith(fingerprint[:16]):
        raise DataError(f"prepared data at {folder} does not match its fingerprint ({', '.join(bad) or 'manifest'})")
    return manifest


def build(train_docs, val_docs, source_desc, log=print):
    """Tokenize and write one dataset; returns its manifest. Idempotent: an intact
    dataset with the same fingerprint is kept, a corrupt one is replaced."""
    root = os.path.join(cache_dir(), "data")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    log(f"training tokenizer (vocab up to {VOCAB_SIZE}: fewer where the text has fewer merges) on {len(train_docs):,} documents")
    tok = train_tokenizer(train_docs)
    log(f"tokenizer trained in {time.time() - t0:.1f}s")
    for old in os.listdir(root):  # left by a build that was killed a day or more ago
        if old.startswith(".building-") and time.time() - os.path.getmtime(os.path.join(root, old)) > 86400:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
    try:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        np.save(os.path.join(tmp, "token_bytes.npy"), token_byte_lengths(tok))
        for split, docs in (("train", train_docs), ("val", val_docs)):
            bar = _Progress(f"tokenizing {split}", len(docs), log)
            tokens, offsets = encode_docs(tok, docs, progress=bar.update)
            bar.done()
            tokens.tofile(os.path.join(tmp, f"{split}.bin"))
            np.save(os.path.join(tmp, f"{split}_docs.npy"), offsets)
        hashes = {n: _sha256(os.path.join(tmp, n)) for n in DATA_FILES}
        fp = _fingerprint(hashes)
        manifest = dict(
            fingerprint=fp, source=source_desc, vocab_size=tok.get_vocab_size(), bos_id=tok.token_to_id(BOS_TOKEN),
            files={n: dict(sha256=hashes[n], bytes=os.path.getsize(os.path.join(tmp, n))) for n in DATA_FILES},
            train_docs=len(train_docs), val_docs=len(val_docs),
            train_tokens=int(os.path.getsize(os.path.join(tmp, "train.bin")) // 2),
            val_tokens=int(os.path.getsize(os.path.join(tmp, "val.bin")) // 2),
            train_bytes=sum(len(d.encode("utf-8")) for d in train_docs),
            val_bytes=sum(len(d.encode("utf-8")) for d in val_docs),
        )
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        final = os.path.join(root, fp[:16])
        if os.path.isdir(final):
            try:
                verify(final)
                return manifest  # already there and intact
            except DataError:  # its reason was said when it was found (main's "rebuilding: ...")
                log(f"replacing the corrupt copy at {final}")
                shutil.rmtree(final)
        os.rename(tmp, final)
        tmp = None
        return manifest
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _set_current(fp):
    path = os.path.join(cache_dir(), "current")
    with open(path + ".tmp", "w") as f:
        f.write(fp + "\n")
    os.replace(path + ".tmp", path)


class _Progress:
    """One-line progress on a terminal; a plain line every 10 s otherwise."""

    def __init__(self, what, total, log):
        self.what, self.total, self.log, self.t0 = what, max(total, 1), log, time.time()
        self.last = self.t0  # the first line after a pause: a step that ends at once prints only done()
        self.tty = sys.stderr.isatty()

    def update(self, n, final=False):
        now = time.time()
        if not final and now - self.last < (0.2 if self.tty else 10):
            return
        self.last = now
        line = f"{self.what}: {n:,}/{self.total:,} ({100 * n / self.total:.0f}%, {now - self.t0:.0f}s)"
        if self.tty:
            print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            self.log(line)

    def done(self):
        self.update(self.total, final=True)


# ---------------------------------------------------------------------------
# Runtime: loading prepared data (used by train.py and the sandbox)
# ---------------------------------------------------------------------------

class Data:
    """One prepared, verified dataset. Token arrays are memory-mapped."""

    def __init__(self, folder, manifest, validation=True):
        self.folder, self.manifest = folder, manifest
        self.fingerprint = manifest["fingerprint"]
        self.vocab_size, self.bos_id = manifest["vocab_size"], manifest["bos_id"]
        self.train = np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r")
        self.train_docs = np.load(os.path.join(folder, "train_docs.npy"))
        self.val = self.val_docs = None
        if validation:
            self.val = np.memmap(os.path.join(folder, "val.bin"), dtype=np.uint16, mode="r")
            self.val_docs = np.load(os.path.join(folder, "val_docs.npy"))
        self.token_bytes = np.load(os.path.join(folder, "token_bytes.npy"))
        # the manifest's own numbers are not hashed: check them against hashed files
        if len(self.token_bytes) != self.vocab_size or self.token_bytes[self.bos_id] != 0:
            raise DataError(f"prepared data at {folder}: manifest vocab_size/bos_id disagree with its files")

    def __getstate__(self):  # a frozen model may name its Data: it goes without the token arrays
        return dict(self.__dict__, train=None, train_docs=None, val=None, val_docs=None)

    def tokenizer(self):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(self.folder, "tokenizer.json"))
        tok.encode_special_tokens = True  # not saved in the file: documents never contain a BOS
        return tok


def load_data(fingerprint=None):
    """The dataset named by `fingerprint`, AUTORESEARCH_DATA, or the last one prepared;
    verified against its fingerprint before anything trains on it."""
    fp = fingerprint or os.environ.get("AUTORESEARCH_DATA")
    if not fp:
        try:
            with open(os.path.join(cache_dir(), "current")) as f:
                fp = f.read().strip()
        except OSError:
            raise NoDataError(f"no prepared data in {cache_dir()}: run `python -m model.prepare --source stdlib` first") from None
    folder = os.path.join(cache_dir(), "data", fp[:16])
    if not os.path.isdir(folder):
        raise NoDataError(f"no prepared data with fingerprint {fp[:16]} in {cache_dir()}")  # gone: prepared or fetched anew
    if os.environ.get(HARNESS_ENV):  # a candidate: the harness verified these files and shows it the training split only
        with open(os.path.join(folder, "manifest.json")) as f:
            return Data(folder, json.load(f), validation=False)
    try:
        manifest = verify(folder)
    except DataError as e:
        try:
            with open(os.path.join(folder, "manifest.json")) as f:
                made_from = f" (source {json.load(f)['source']})"
        except (OSError, ValueError, KeyError, TypeError):
            made_from = ""
        raise DataError(f"{e}: rerun `python -m model.prepare` with the arguments that made it{made_from} to rebuild "
                        f"it, or delete {folder} and join --seed a peer to fetch it again") from None
    return Data(folder, manifest)


# ---------------------------------------------------------------------------
# Training rows: documents packed into BOS-aligned rows, nothing thrown away
# ---------------------------------------------------------------------------

def pack_rows(doc_offsets, row_len, doc_order, buffer_docs=256):
    """Yield (row, epoch); a row is a list of pieces (start, length, bos) meaning
    [BOS if bos] + tokens[start:start+length], filling exactly row_len tokens.

    Documents longer than a row are cut into row-sized chunks, each continuation
    led by a BOS. Each row is filled best-fit from a buffer of pending pieces; when
    none fits, the shortest piece is split and its rest returns to the buffer.
    Every token of every document lands in some row exactly once.
    `doc_order` yields (doc index, epoch); when it ends, the buffer is drained and
    the last row may be short."""
    keys, pieces = [], []  # keys sorted by (size, serial); pieces aligned with keys
    serial, epoch = 0, 0

    def add(piece):
        nonlocal serial
        size = piece[1] + piece[2]
        i = bisect.bisect_right(keys, (size, serial))
        keys.insert(i, (size, serial))
        pieces.insert(i, piece)
        serial += 1

    def refill():
        nonlocal epoch
        while len(pieces) < buffer_docs:
            try:
                d, epoch = next(doc_order)
            except StopIteration:
                return
            start, end = int(doc_offsets[d]), int(doc_offsets[d + 1])
            add((start, min(end - start, row_len), False))
            pos = start + row_len
            while pos < end:
                n = min(end - pos, row_len - 1)
                add((pos, n, True))
                pos += n

    while True:
        row, free = [], row_len
        while free:
            refill()
            if not pieces:
                if row:
                    yield row, epoch
                return
            i = bisect.bisect_right(keys, (free, math.inf)) - 1
            if i >= 0:  # the largest piece that fits whole
                keys.pop(i)
                piece = pieces.pop(i)
                row.append(piece)
                free -= piece[1] + piece[2]
            else:  # none fits: split the shortest
                keys.pop(0)
                start, n, bos = pieces.pop(0)
                head = free - bos
                row.append((start, head, bos))
                add((start + head, n - head, True))
                free = 0
        yield row, epoch


def shuffled_docs(num_docs, seed):
    """(doc index, epoch) forever, a fresh permutation each epoch."""
    epoch = 1
    while True:
        for d in np.random.default_rng((seed, epoch)).permutation(num_docs):
            yield int(d), epoch
        epoch += 1


def fill_row(out, tokens, row, bos_id):
    pos = 0
    for start, n, bos in row:
        if bos:
            out[pos] = bos_id
            pos += 1
        out[pos:pos + n] = tokens[start:start + n]
        pos += n


class TrainLoader:
    """Batches of (inputs, targets, epoch) on `device`, built by a background thread
    into pinned buffers so the training loop does not wait; `wait_seconds` counts
    the time it did wait anyway. Device None: numpy int32 arrays, and torch is not
    imported (train_mlx.py)."""

    def __init__(self, data, batch_size, seq_len, device, seed=0, prefetch=4):
        self.B, self.T = batch_size, seq_len
        self.wait_seconds = 0.0
        self._rows = pack_rows(data.train_docs, seq_len + 1, shuffled_docs(len(data.train_docs) - 1, seed))
        self._tokens, self._bos = data.train, data.bos_id
        if device is None:
            self.torch = self.device = None
            self._bufs = [np.empty((batch_size, seq_len + 1), dtype=np.int32) for _ in range(prefetch + 2)]
        else:
            import torch
            self.torch, self.device = torch, torch.device(device)
            pin = self.device.type == "cuda"
            self._bufs = [torch.empty((batch_size, seq_len + 1), dtype=torch.int32, pin_memory=pin)
                          for _ in range(prefetch + 2)]
        self._free, self._ready = queue.Queue(), queue.Queue(maxsize=prefetch)
        for i in range(len(self._bufs)):
            self._free.put((i, None))
        self._error = None
        threading.Thread(target=self._produce, daemon=True, name="train-loader").start()

    def _produce(self):
        try:
            while True:
                i, event = self._free.get()
                if event is not None:
                    event.synchronize()  # the previous copy out of this buffer has finished
                buf = self._bufs[i] if self.torch is None else self._bufs[i].numpy()
                for r in range(self.B):
                    row, epoch = next(self._rows)
                    fill_row(buf[r], self._tokens, row, self._bos)
                self._ready.put((i, epoch))
        except BaseException as e:  # surfaced in the training loop
            self._error = e
            self._ready.put((None, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise RuntimeError(f"train loader failed: {self._error!r}")
        t0 = time.perf_counter()
        i, epoch = self._ready.get()
        self.wait_seconds += time.perf_counter() - t0
        if i is None:
            raise RuntimeError(f"train loader failed: {self._error!r}")
        if self.device is None:
            batch = self._bufs[i].copy()
            self._free.put((i, None))
        elif self.device.type == "cuda":  # asynchronous copy; the buffer is reused once it is done
            batch = self._bufs[i].to(self.device, non_blocking=True)
            event = self.torch.cuda.Event()
            event.record()
            self._free.put((i, event))
            batch = batch.long()
        else:
            batch = self._bufs[i].to(self.device, dtype=self.torch.long, copy=True)
            self._free.put((i, None))
        return batch[:, :-1], batch[:, 1:], epoch


# ---------------------------------------------------------------------------
# Evaluation protocol (the metric)
# ---------------------------------------------------------------------------

def eval_rows(val_tokens, val_offsets, seq_len=None, eval_tokens=None):
    """The pinned validation rows: eval_tokens // seq_len rows of seq_len + 1 tokens.
    Documents (BOS first) are taken in order, cycling, and packed best-fit into
    each row; when none fits, the shortest is cropped (autoresearch's protocol). By default
    the profile's sequence length and evaluation tokens."""
    seq_len = _profile("max_seq_len") if seq_len is None else seq_len
    eval_tokens = _profile("eval_tokens") if eval_tokens is None else eval_tokens
    row_len, n_rows = seq_len + 1, max(1, eval_tokens // seq_len)
    n_docs = len(val_offsets) - 1
    rows = np.empty((n_rows, row_len), dtype=np.int64)
    buf, lens, nxt = [], np.empty(0, dtype=np.int64), 0
    for r in range(n_rows):
        pos = 0
        while pos < row_len:
            while len(buf) < EVAL_BUFFER_DOCS:
                new = [(int(val_offsets[(nxt + k) % n_docs]), int(val_offsets[(nxt + k) % n_docs + 1])) for k in range(128)]
                nxt += 128
                buf += new
                lens = np.concatenate([lens, [e - s for s, e in new]])
            free = row_len - pos
            fits = np.where(lens <= free, lens, -1)
            i = int(fits.argmax())
            if fits[i] < 0:
                i = int(lens.argmin())
            s, e = buf.pop(i)
            n = min(e - s, free)
            lens = np.delete(lens, i)
            rows[r, pos:pos + n] = val_tokens[s:s + n]
            pos += n
    return rows


def bpb_sums(logits, targets, token_bytes):
    """(model outputs, targets, bytes per token) -> (nats, bytes) as 0-d tensors, float64
    and int64, without waiting for the device (on the CPU where MPS has no float64).
    Targets that are special tokens (0 bytes) count in neither sum."""
    import torch
    import torch.nn.functional as F
    nbytes = token_bytes[targets].reshape(-1)
    nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none")
    nats = torch.where(nbytes > 0, nats, 0.0)  # not a product: an unscored inf must not make NaN
    return (nats.cpu() if nats.device.type == "mps" else nats).double().sum(), nbytes.sum()


def bpb_counts(logits, targets, token_bytes):
    """bpb_sums as Python numbers."""
    nats, nbytes = bpb_sums(logits, targets, token_bytes)
    return nats.item(), int(nbytes.item())


def eval_batch_cap(seq_len, vocab_size, shared=True):
    """The most rows the harness asks for in one evaluation call: at most 2^30 logits (4 GiB of
    float32) in a shared GPU buffer, as in-process evaluation; 2^26 (256 MiB) through a socket."""
    return max(1, min(64, (2**30 if shared else 2**26) // (seq_len * vocab_size)))


def eval_batches(rows, batch_size):
    """(batch, real rows) over `rows`; the last batch is padded with copies of its first
    row to full size, so the model never sees a new shape, and only `real` rows count."""
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        yield np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), 0)]), len(batch)


def evaluate_bpb(logits_fn, data, batch_size, device, seq_len=None, eval_tokens=None):
    """Bits per byte of `logits_fn` (inputs (B, T) -> logits (B, T, V)) on the pinned
    validation rows (eval_rows). One call returns at most 2^30 logits (4 GiB of float32)."""
    import torch
    seq_len = _profile("max_seq_len") if seq_len is None else seq_len
    batch_size = max(1, min(batch_size, 2**30 // (seq_len * len(data.token_bytes))))
    rows = eval_rows(data.val, data.val_docs, seq_len, eval_tokens)
    token_bytes = torch.from_numpy(data.token_bytes).to(device)
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for batch, real in eval_batches(rows, batch_size):
            batch = torch.from_numpy(batch).to(device)
            logits = logits_fn(batch[:, :-1])
            for j in range(0, real, 8):  # bounded memory for the float32 softmax
                k = min(j + 8, real)
                n, b = bpb_counts(logits[j:k], batch[j:k, 1:], token_bytes)
                nats, nbytes = nats + n, nbytes + b
    return nats / (math.log(2) * nbytes)


# ---------------------------------------------------------------------------
# Handing the trained model to the harness
# ---------------------------------------------------------------------------
# Under the sandbox, train.py's last call freezes its model: its code and weights are
# pickled into a file the harness made (serve.py says how), and the harness serves that
# frozen copy from two fresh processes, one for the scored batches and one for the
# causality probes, so that no state of the candidate, nor any it could keep between
# requests, links a probe to its twin. The harness alone sees targets and computes the
# metric. hand_over freezes a torch model, hand_over_mlx an MLX one (train_mlx.py).
# A frame is a 4-byte big-endian header length, a JSON header, then `header["bytes"]`
# raw bytes.

HARNESS_ENV = "AUTORESEARCH_HARNESS_FD"  # set by the sandbox: the socket's file descriptor
FREEZE_ENV = "AUTORESEARCH_HARNESS_FREEZE"  # set by the sandbox: the file to freeze the model into (its size: the limit)
SHARED_ENV = "AUTORESEARCH_HARNESS_SHM"  # "fd:bytes" of a sealed shared-memory file for CPU logits (the servers')
WEIGHTS_ENV = "AUTORESEARCH_HARNESS_WEIGHTS"  # set by the sandbox where it takes a CUDA model's weights over CUDA IPC
MAX_HEADER = 4096


def send_frame(sock, header, payload=b""):
    header = dict(header, bytes=len(payload))
    raw = json.dumps(header).encode()
    sock.sendall(len(raw).to_bytes(4, "big") + raw)
    if payload:
        sock.sendall(payload)


def _recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("peer closed the channel")
        got += k
    return buf


def recv_frame(sock, max_bytes):
    """One frame; ValueError for anything malformed or over max_bytes."""
    n = int.from_bytes(_recv_exact(sock, 4), "big")
    if not 0 < n <= MAX_HEADER:
        raise ValueError(f"frame header of {n} bytes")
    try:
        header = json.loads(_recv_exact(sock, n))
    except (ValueError, RecursionError):
        raise ValueError("frame header is not JSON") from None
    size = header.get("bytes") if isinstance(header, dict) else None
    if not isinstance(size, int) or not 0 <= size <= max_bytes:
        raise ValueError(f"frame payload of {size!r} bytes (limit {max_bytes})")
    return header, _recv_exact(sock, size) if size else b""


def _serve_module():
    try:
        from . import serve
    except ImportError:  # imported as top-level `prepare` (python model/train.py)
        import serve
    return serve


def hand_over(logits_fn, batch_size, device, data=None):
    """train.py's last call. Standalone: evaluate here on `data` (the Data it trained
    on, else load_data()) and return val_bpb. Under the sandbox: freeze `logits_fn`
    (inputs (B, T) -> logits (B, T, V); a torch.compile'd module goes as the module it
    wraps) with the ambient state of this call (autocast, matmul precision) for the
    harness, which evaluates it in fresh processes and computes the metric itself, and
    return nan. So the model must pickle: its code (train.py's own classes and functions
    go by value) and everything its forward reaches; a HandOverError names what does not."""
    fd = os.environ.get(HARNESS_ENV)
    if fd is None:
        return evaluate_bpb(logits_fn, data or load_data(), batch_size, device)
    import torch
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    compiled = sys.modules.get("torch._dynamo.eval_frame")  # imported only if something was compiled
    while compiled and isinstance(logits_fn, compiled.OptimizedModule):
        logits_fn = logits_fn._orig_mod
    logits_fn = getattr(logits_fn, "_torchdynamo_orig_callable", logits_fn)  # a compiled function
    serve = _serve_module()
    payload = dict(framework="torch", fn=logits_fn, device=str(device), ambient=serve.ambient())
    ipc = device.type == "cuda" and os.environ.get(WEIGHTS_ENV) == "1"
    _hand_over_frozen(int(fd), batch_size, str(device), lambda out: serve.freeze(payload, out, "torch", ipc))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what training cached goes back now, for the servers, before this process exits
    return float("nan")


def hand_over_mlx(model, batch_size, data=None):
    """train_mlx.py's last call: hand_over for an MLX model (int32 inputs (B, T) -> logits
    (B, T, V)). MLX stays on the candidate's side: the harness neither imports nor trusts
    it. Under the sandbox the model is frozen (pickled with its code, as hand_over's) and
    served by fresh processes exactly as a torch model on the CPU (inputs in, float32
    logits into the harness's shared memory), and the harness computes the metric with its
    own code, the causality probes and the budget unchanged. Standalone: the shared
    evaluate_bpb here."""
    import mlx.core as mx

    fd = os.environ.get(HARNESS_ENV)
    if fd is None:
        import torch

        def forward(x):  # torch int (B, T) -> torch float32 (B, T, V)
            return torch.from_numpy(np.asarray(model(mx.array(x.numpy().astype(np.int32))).astype(mx.float32)))
        return evaluate_bpb(forward, data or load_data(), batch_size, "cpu")
    device = "mlx:gpu" if mx.default_device() == mx.gpu else "mlx:cpu"
    serve = _serve_module()
    payload = dict(framework="mlx", fn=model, device=device)
    _hand_over_frozen(int(fd), batch_size, device, lambda out: serve.freeze(payload, out, "mlx"))
    return float("nan")


def _hand_over_frozen(fd, batch_size, device, freeze):
    """The sandbox's side of a hand-over: ready (the clock stops), the frozen model, done. A
    device buffer of its weights lives until the harness says it has copied it."""
    import socket
    sock = socket.socket(fileno=fd)
    send_frame(sock, {"op": "ready", "batch_size": batch_size, "device": device})
    size, weights = freeze(int(os.environ[FREEZE_ENV]))
    if weights is None:
        send_frame(sock, {"op": "model", "size": size})
    else:
        try:
            send_frame(sock, {"op": "model", "size": size, "weights": dict(
                cuda_ipc_export(weights["address"]), bytes=weights["bytes"])})
            sock.settimeout(60)
            recv_frame(sock, 0)  # copied (or the harness gave up)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            cuda_free(weights["address"])
    sock.close()


# CUDA IPC through the driver API. The buffer is allocated with cuMemAlloc, outside
# torch's caching allocator: its expandable segments cannot be shared this way, and
# a handle names a whole allocation, which here holds nothing but the logits.

def _libcuda():
    import ctypes

    class IpcHandle(ctypes.Structure):
        _fields_ = [("reserved", ctypes.c_char * 64)]
    lib = ctypes.CDLL("libcuda.so.1")
    lib.IpcHandle = IpcHandle
    return lib


def _cuda_check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUDA error {rc}")


class CudaArray:
    """Memory at a device address (float32 unless `typestr` says otherwise), for torch.as_tensor (zero copy)."""

    def __init__(self, address, shape, typestr="<f4"):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (address, False), "version": 3}


def cuda_alloc(numel, device):
    """(address, float32 tensor over it) of a fresh allocation on `device`."""
    import ctypes
    import torch
    with torch.cuda.device(device):
        ptr = ctypes.c_uint64()
        _cuda_check(_libcuda().cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(numel * 4)), "cuMemAlloc")
        try:
            return ptr.value, torch.as_tensor(CudaArray(ptr.value, (numel,)), device=device)
        except BaseException:
            cuda_free(ptr.value)
            raise


def cuda_free(address):
    import ctypes
    _cuda_check(_libcuda().cuMemFree_v2(ctypes.c_uint64(address)), "cuMemFree")


def cuda_ipc_export(address):
    """{"handle": hex, "offset": bytes} that let another process map the allocation holding
    `address` (cuMemAlloc'd: torch's caching allocator, not its expandable segments)."""
    import ctypes
    cu = _libcuda()
    base, size, handle = ctypes.c_uint64(), ctypes.c_size_t(), cu.IpcHandle()
    _cuda_check(cu.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(address)),
                "cuMemGetAddressRange")
    _cuda_check(cu.cuIpcGetMemHandle(ctypes.byref(handle), base), "cuIpcGetMemHandle")
    return {"handle": bytes(handle).hex(), "offset": address - base.value}


def cuda_ipc_open(handle, device):
    """Map another process's allocation on `device`: (address, size in bytes)."""
    import ctypes
    import torch
    cu = _libcuda()
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=device)  # the device's primary context is current
        h = cu.IpcHandle.from_buffer_copy(handle)
        ptr, base, size = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_size_t()
        _cuda_check(cu.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, ctypes.c_uint(1)), "cuIpcOpenMemHandle")
        try:
            _cuda_check(cu.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
        except RuntimeError:
            cuda_ipc_close(ptr.value)
            raise
    return ptr.value, size.value


def cuda_ipc_close(address):
    import ctypes
    _cuda_check(_libcuda().cuIpcCloseMemHandle(ctypes.c_uint64(address)), "cuIpcCloseMemHandle")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None, prog="python -m model.prepare"):
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Prepare the training and validation data and the tokenizer for train.py. "
        "Prints the data fingerprint; rerunning on the same input is instant."))
    ap.add_argument("--source", action="append", required=True, metavar="stdlib|climbmix|PATH",
                    help="stdlib: this Python's own library (offline); climbmix: autoresearch's web text "
                         "(downloads); PATH: a file or folder of .txt .md .rst .py .jsonl .parquet (repeatable)")
    ap.add_argument("--ext", action="append", help="only files with this extension (PATH sources; repeatable)")
    ap.add_argument("--max-mb", type=float, help="keep at most this many MB of documents (deterministic subset)")
    ap.add_argument("--num-shards", type=int, default=8, help="climbmix training shards to download (default 8)")
    args = ap.parse_args(argv)
    if args.max_mb is not None and not 0 < args.max_mb < float("inf"):
        ap.error("--max-mb must be a positive number")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        t0 = time.time()
        srcs = args.source
        if "climbmix" in srcs:
            if len(srcs) > 1:
                raise sources.SourceError("climbmix cannot be combined with other sources")
            train, val = sources.climbmix_docs(os.path.join(cache_dir(), "climbmix"), args.num_shards, log=log)
            desc = f"climbmix:{args.num_shards}"
        else:
            docs, skipped = [], collections.Counter()
            for s in srcs:
                if s == "stdlib":
                    found = sources.stdlib_docs()
                    if not found:
                        raise sources.SourceError("this Python installation has no library sources to read")
                    docs += found
                else:
                    exts = tuple(e if e.startswith(".") else "." + e for e in args.ext) if args.ext else None
                    docs += sources.local_docs([s], exts, skipped=skipped)
            if skipped:
                log(f"skipped {sources.describe_skipped(skipped)}")
            if args.max_mb is not None:
                docs = sources.cap_docs(docs, int(args.max_mb * 1e6))
            train, val = sources.split_by_hash(docs)
            desc = ",".join("stdlib:" + sources.describe_python() if s == "stdlib" else os.path.abspath(s) for s in srcs)
        log(f"{len(train):,} training and {len(val):,} validation documents ({time.time() - t0:.1f}s)")
        key = hashlib.sha256("".join(sources.doc_hash(d) for d in train + ["--val--"] + val).encode()).hexdigest()
        known = os.path.join(cache_dir(), "sources", key[:32])
        manifest = None
        if os.path.exists(known):
            with open(known) as f:
                fp = f.read().strip()
            try:
                manifest = verify(os.path.join(cache_dir(), "data", fp[:16]))
                log("already prepared")
            except DataError as e:
                log(f"rebuilding: {e}")
        if manifest is None:
            manifest = build(train, val, desc, log=log)
            os.makedirs(os.path.dirname(known), exist_ok=True)
            with open(known + ".tmp", "w") as f:
                f.write(manifest["fingerprint"])
            os.replace(known + ".tmp", known)
        _set_current(manifest["fingerprint"])
    except (sources.SourceError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = manifest
    least = min(p["eval_tokens"] for p in PROFILES.values())
    if m["val_tokens"] < least:  # cycled to fill the evaluation: it measures little, but a lab may mean it
        print(f"warning: the validation split holds {m['val_tokens']:,} tokens, fewer than the {least:,} the smallest "
              f"profile scores: its rows repeat them, so val_bpb says little; give more text", file=sys.stderr)
    print(f"fingerprint:  {m['fingerprint']}")
    print(f"folder:       {os.path.join(cache_dir(), 'data', m['fingerprint'][:16])}")
    print(f"train:        {m['train_docs']:,} docs, {m['train_tokens']:,} tokens, {m['train_bytes'] / 1e6:.1f} MB")
    print(f"val:          {m['val_docs']:,} docs, {m['val_tokens']:,} tokens, {m['val_bytes'] / 1e6:.1f} MB")
    print(f"vocab_size:   {m['vocab_size']}")
    print(f"seconds:      {time.time() - t0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
