"""What the Claude proposer sends (program.md, the harness facts, the best train.py, history,
the swarm's findings, notes) and how its reply becomes a candidate train.py.

A reply is a `Hypothesis:` line, optionally `Inspired-by: <record id>`, then SEARCH/REPLACE blocks
(or one fenced block holding the whole file). `apply_reply` runs nothing: it raises Invalid unless
every SEARCH block matches the file exactly once, no other file is named, the result parses,
still hands its model to the harness, and differs from the input.
"""

import ast
import dataclasses
import re

MAX_SOURCE_CHARS = 100_000   # a kept change's diff (parent and child at most this) must fit a record's 256 KiB string
OWN_HISTORY = 25             # our latest experiments shown
CRASH_TAILS = 3              # of which the latest crashes show their log tails
DIFF_CHARS = 3000            # of each peer improvement's diff
CACHED = {"type": "ephemeral"}

BLOCK = re.compile(r"^<{5,9} ?SEARCH[ \t]*\n(.*?)^={5,9}[ \t]*\n(.*?)^>{5,9} ?REPLACE[ \t]*$", re.M | re.S)
FENCE = re.compile(r"^```[\w+-]*[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
FILE_LINE = re.compile(r"^(?:#+\s*)?(?:\*\*)?(?:file:\s*)?`?([\w./-]+\.[A-Za-z0-9]+)`?(?:\*\*)?:?$", re.I)
HYPOTHESIS = re.compile(r"^\W*hypothesis\W*:\s*(.+)$", re.I | re.M)
INSPIRED = re.compile(r"^\W*inspired[- ]by\W*:\s*\[?([0-9a-fA-F]{8,64})", re.I | re.M)


class Invalid(Exception):
    """A reply that cannot become a candidate; the reason is told to the model once."""


@dataclasses.dataclass(frozen=True)
class Edit:
    source: str
    hypothesis: str
    inspired: str | None   # a record id prefix, as the model wrote it


def apply_reply(text, source):
    """The candidate a reply makes of `source`, or Invalid with the reason."""
    blocks = list(BLOCK.finditer(text))
    if blocks:
        out, start = source, 0
        for i, m in enumerate(blocks, 1):
            _check_file(text[start:m.start()])
            start = m.end()
            search, replace = m.group(1), m.group(2)
            if not search.strip():
                raise Invalid(f"SEARCH block {i} is empty; copy the lines to replace from train.py")
            n = out.count(search)
            if n != 1:
                first = search.strip().splitlines()[0][:80]
                raise Invalid(f"SEARCH block {i} (starting {first!r}) matches nothing in train.py; copy the lines exactly"
                              if n == 0 else f"SEARCH block {i} (starting {first!r}) matches {n} places in train.py; "
                              "include more lines to make it unique")
            out = out.replace(search, replace, 1)
    else:
        fences = list(FENCE.finditer(text))
        if len(fences) != 1:
            raise Invalid("no SEARCH/REPLACE blocks and no single fenced train.py found" if not fences else
                          f"{len(fences)} code blocks and no SEARCH/REPLACE blocks; send SEARCH/REPLACE blocks or "
                          "one whole train.py")
        _check_file(text[:fences[0].start()])
        out = fences[0].group(1)
    if out == source:
        raise Invalid("the edits change nothing")
    if len(out) > MAX_SOURCE_CHARS:
        raise Invalid(f"the edited train.py has {len(out)} characters; the limit is {MAX_SOURCE_CHARS}")
    try:
        ast.parse(out)
    except SyntaxError as e:
        raise Invalid(f"the edited train.py does not parse: line {e.lineno}: {e.msg}") from None
    if "hand_over(" not in out and "hand_over_mlx(" not in out:
        raise Invalid("the edited train.py no longer hands its model to the harness (prepare.hand_over)")
    h = HYPOTHESIS.search(text)
    hypothesis = h.group(1) if h else next((s for s in (x.strip() for x in text.splitlines()) if s), "")
    i = INSPIRED.search(text)
    return Edit(out, " ".join(hypothesis.split())[:300] or "(no hypothesis given)", i.group(1).lower() if i else None)


def _check_file(before):
    """The file named just before a block, if any, must be train.py."""
    for line in reversed(before.strip().splitlines()):
        line = line.strip()
        if not line or line.startswith("```"):
            continue
        m = FILE_LINE.match(line)
        if m and m.group(1).rsplit("/", 1)[-1] != "train.py":
            raise Invalid(f"the reply edits {m.group(1)}; only train.py may change")
        return


def declined(text):
    return re.search(r"^\W*NO_REPAIR\b", text, re.M) is not None


def resolve(prefix, swarm):
    """The full id of the listed peer record that `prefix` names, or None."""
    if not prefix or not swarm:
        return None
    hits = [i["id"] for i in swarm.get("improvements", ()) if i["id"].startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


# -- the prompt ------------------------------------------------------------------------------

def system(program, ctx):
    """program.md and the harness facts: the stable prefix, cached."""
    return [{"type": "text", "text": program.rstrip() + "\n\n" + facts(ctx.hardware), "cache_control": CACHED}]


def facts(hw):
    from model import prepare
    from sandbox.run import LIMITS
    p, lim = prepare.PROFILES[hw["profile"]], LIMITS[hw["profile"]]
    if hw["backend"] == "mlx":  # train_mlx.py (kept as train.py): branches on the MLX device
        branch = f'if DEVICE == "{hw.get("device", "cpu")}":'
    else:
        branch = 'if DEVICE == "cuda":' if hw["backend"] == "cuda" else "else: (CPU or Apple MPS)"
    return f"""# Harness facts (fixed; from this node's harness)

- Hardware: {hw['accelerator']} x{hw['count']}, backend {hw['backend']}, {hw['framework']}. The constants
  block of train.py branches on DEVICE; this machine uses the `{branch}` branch.
- Budget: {hw['budget_seconds']:g} s of training (prepare.TIME_BUDGET, counted by train.py's own clock).
  A model not handed over within {lim['startup']} s more is over budget, and one not handed over
  {lim['grace']} s after that is killed (a timeout). The evaluation must finish within {lim['evaluation']} s.
- Metric: val_bpb, bits per byte on held-out text, lower is better. The harness computes it from
  the logits of the model train.py hands over: train.py ends with
  `prepare.hand_over(logits_fn, batch_size, device, data)` (MLX: `prepare.hand_over_mlx(model,
  batch_size, data)`), where logits_fn maps token ids (B, T) to logits (B, T, {prepare.VOCAB_SIZE}). Nothing train.py prints counts.
  The model is pickled (train.py's classes and functions by value) and served by fresh processes: everything
  its forward reaches must pickle (no open files, threads, locks or data loaders), and its answers must not
  depend on earlier calls.
- Evaluation profile {hw['profile']}: sequences of {p['max_seq_len']} tokens, {p['eval_tokens']:,} validation
  tokens, vocabulary {prepare.VOCAB_SIZE} (byte-level BPE; id 0 is the BOS token that starts every
  document). The harness probes causality: logits at a position must not change when later tokens
  change; a run that fails is a violation, published to the swarm.
- The sandbox: no network, the validation split unreadable, only a scratch folder writable, the
  installed packages only (nothing can be installed). prepare.py, the data and the tokenizer are fixed.
"""


def user(ctx):
    """The best train.py (cached: it changes only on a keep), then what is new at every proposal."""
    return [{"type": "text", "text": f"# The current best train.py (your edits apply to it)\n\n```python\n{ctx.source}```",
             "cache_control": CACHED},
            {"type": "text", "text": "\n\n".join(filter(None, (_standing(ctx), _history(ctx), _swarm(ctx.swarm),
                                                               _notes(ctx.notes), TASK)))}]


TASK = """# Your turn
Propose the next experiment: one idea, with the reason you expect it to lower val_bpb on this
hardware within the budget. Reply in the format program.md gives: a `Hypothesis:` line, an
`Inspired-by:` line only when you port a peer's record listed above, then SEARCH/REPLACE blocks
for train.py."""


def _standing(ctx):
    s = ctx.score
    lines = ["# Where things stand",
             (f"Best: val_bpb {s['val_bpb']:.6f} over {s['runs']} run(s). " if s else "The best has not been measured yet. ")
             + f"Noise (sd of one run): {ctx.noise:.6f}; a keep must beat the best by about two standard errors."]
    if ctx.running:
        lines.append(f"Running now (its result is not known yet; do not propose it again): {ctx.running['description']}")
    return "\n".join(lines)


def _history(ctx):
    own = [h for h in ctx.history if "author" not in h][-OWN_HISTORY:]
    if not own:
        return "# This node's experiments\nNone yet."
    lines = ["# This node's experiments (oldest first; delta = val_bpb minus its parent's mean, negative is better)"]
    tails = {id(h) for h in [h for h in own if h["status"] == "crash" and h.get("log_tail")][-CRASH_TAILS:]}
    for h in own:
        delta = (f"{h['val_bpb'] - h['parent_bpb']:+.6f}" if h.get("val_bpb") is not None
                 and h.get("parent_bpb") is not None else h.get("outcome") or "")
        lines.append(f"#{h.get('id', '?')} {h['status']:<7} {delta:<10} {h['description']}"
                     + (f"  [by {h['proposer']}]" if h.get("proposer") not in (None, "claude") else ""))
        if id(h) in tails:
            lines += ["    its log ends:"] + [f"    | {line}" for line in h["log_tail"].splitlines()]
    return "\n".join(lines)


def _swarm(found):
    if not found or not any(found.values()):
        return "# What the swarm found\nNothing from peers yet."
    lines = ["# What the swarm found (peers' signed records)"]
    if found["improvements"]:
        lines.append("## Improvements peers measured (biggest claimed gain first; ids are record ids: name one in "
                     "Inspired-by when you port its idea; one that did not apply here or came from other hardware "
                     "may still be worth porting by hand)")
        for i in found["improvements"]:
            lines.append(f"[{i['id'][:12]}] delta {i['delta']:+.6f} over {i['runs']} run(s) on {i['tag']} (lineage "
                         f"{i['lineage']}) by {i['author']}: {i['description']}")
            lines.append(f"    attestations: {i['confirmed']} confirmed, {i['refuted']} refuted or crashed; "
                         f"here: {i['ours'] or 'not verified yet'}")
            diff = i["diff"][:DIFF_CHARS] + ("\n... (cut)" if len(i["diff"]) > DIFF_CHARS else "")
            lines.append("```diff\n" + diff.rstrip("\n") + "\n```")
    if found["avoid"]:
        lines.append("## Tried without a keep (avoid these unless you have a new reason)")
        for a in found["avoid"]:
            median = f", median delta {a['median_delta']:+.4f}" if a["median_delta"] is not None else ""
            outcomes = ", ".join(f"{n} {k}" for k, n in sorted(a["outcomes"].items()))
            lines.append(f"- {a['description']}: {a['tries']} tries on {a['tags']} tag(s){median}; {outcomes}")
    if found["claims"]:
        lines.append("## Being tried by peers now (do not duplicate)")
        lines += [f"- {c['description']} ({c['tag']})" for c in found["claims"]]
    return "\n".join(lines)


def _notes(notes):
    if not notes:
        return ""
    return "# Notes from people (newest last; they outrank your own plans)\n" + "\n".join(f"- {n}" for n in notes[-5:])


def repair(crash):
    return f"""# Repair: your last candidate crashed
Its hypothesis: {crash['description']}
The last lines of its log:
```
{crash['log_tail']}
```
The crashed train.py (SEARCH blocks apply to this file):
```python
{crash['source']}```

If the crash has an easy fix (a typo, a wrong name, a shape or dtype mismatch), reply with a
`Hypothesis:` line saying what you fixed and SEARCH/REPLACE blocks that fix it and keep the idea.
If the idea itself cannot work here (out of memory, too slow, a deeper flaw), reply with the single
line NO_REPAIR."""


def rejected(error):
    return (f"Your reply was rejected and nothing ran: {error}. Reply again in the required format (a Hypothesis "
            "line, then SEARCH/REPLACE blocks for train.py), with edits against the same train.py as before.")
