"""Proposers: given what the node knows, return the next candidate train.py.

The offline proposer needs no key: it edits the constants block of train.py (the
assignments at the top level, or inside `if DEVICE == "cuda":` / `else:` for this
machine's branch; `if DEVICE == "gpu":` in train_mlx.py), one parameter and direction
at a time, chosen by a UCB bandit over what the node has measured, and now and then
combines two near-misses. Reproducible under a seed: the same history and seed give
the same proposal.
"""

import dataclasses
import math
import os
import random
import re

ASSIGN = re.compile(r"^(?P<indent>[ \t]*)(?P<name>[A-Z][A-Z0-9_]*)(?P<eq>[ \t]*=[ \t]*)(?P<value>[^#\n]*?)"
                    r"(?P<rest>[ \t]*(#[^\n]*)?)$", re.M)
NUMBER = r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
# what is tried first, before the bandit has data: the usual winners of short-budget runs
PRIOR = ("MATRIX_LR", "TOTAL_BATCH_SIZE", "EMBEDDING_LR", "WARMDOWN_RATIO", "UNEMBEDDING_LR", "DEPTH", "MODEL_DIM",
         "WEIGHT_DECAY", "SCALAR_LR", "WINDOW_PATTERN", "MLP_RATIO")
# what is never tried: rows per forward pass trade memory for speed at the same tokens per step
# (train.py takes fewer rows when TOTAL_BATCH_SIZE is smaller), so a step up changes nothing
MEMORY = ("DEVICE_BATCH_SIZE",)
# what changes the numbers a step computes but not how many: an edit of these alone trains as many
# steps as its parent would on the same machine, so the two can be compared at one step count
# (node.loop.at_steps); every other constant (shapes, batch, windows, untimed steps) may change a step's cost
COMPUTE_NEUTRAL = frozenset({"EMBEDDING_LR", "UNEMBEDDING_LR", "SCALAR_LR", "MATRIX_LR", "WEIGHT_DECAY", "INIT_SCALE",
                             "X0_LAMBDA_INIT", "WARMDOWN_RATIO", "FINAL_LR_FRAC", "MUON_MOMENTUM_WARMUP",
                             "LOGIT_SOFTCAP"})


@dataclasses.dataclass(frozen=True)
class Proposal:
    source: str          # the whole candidate train.py
    description: str     # one line
    edit: dict | None = None  # structured form, for proposers that learn from history
    proposer: str = ""   # who made it: offline | claude | human
    usage: dict | None = None       # the model's tokens and cost spent on it (node/claude.py)
    inspired_by: str | None = None  # hex id of the peer record whose idea it ports
    base: str | None = None         # the train.py it was made from, when not the context's source


@dataclasses.dataclass(frozen=True)
class Context:
    """What a proposer sees: plain data, safe to hand to another thread."""
    source: str          # the current best train.py
    history: list        # finished experiments, oldest first: dicts with edit, status, val_bpb, parent_bpb
    noise: float         # run-to-run standard deviation of val_bpb
    backend: str         # the value DEVICE takes in the file here: cuda | mps | cpu (train.py), gpu | cpu (train_mlx.py)
    notes: list          # people's notes (python -m node suggest --note)
    taken: object = None  # source -> True when the swarm already ran or is running that candidate
    busy: frozenset = frozenset()  # (constant, up | down) that peers are trying now: the offline proposer's last choice
    # for the Claude proposer:
    hardware: dict | None = None  # this node's hardware tag
    score: dict | None = None     # the best's {val_bpb, runs, spread}
    swarm: dict | None = None     # what the swarm found (memory.Memory.findings)
    crash: dict | None = None     # our last candidate, when it crashed: id, description, source, parent, log_tail
    running: dict | None = None   # the candidate running now: source, description


@dataclasses.dataclass(frozen=True)
class Constant:
    name: str
    value: object        # int, float or str
    kind: str            # float | pow2 | int | pattern
    span: tuple          # (start, end) of the value text in the source
    power_form: bool     # written as 2**k


def constants(source, backend):
    """The tunable constants of this machine's branch, by name (`backend`: the value DEVICE takes here)."""
    branch, opened, out, pos = None, None, {}, 0
    for line in source.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        stripped = line.strip()
        if stripped and not line[0].isspace():  # a top-level line opens or closes a device branch
            test = re.match(r'if DEVICE == "(\w+)":', stripped)
            if test:
                branch, opened = "if", test[1]
            else:
                branch = "else" if stripped.split("#")[0].strip() == "else:" and branch == "if" else None
        m = ASSIGN.match(line.rstrip("\n"))
        mine = branch == "if" and backend == opened or branch == "else" and backend != opened
        if not m or (m["indent"] and not mine):
            continue
        c = _parse(m["name"], m["value"].strip(), start + m.start("value"), start + m.start("value") + len(m["value"].rstrip()))
        if c:
            out[c.name] = c
    return out


def _parse(name, text, start, end):
    """The constant `text` states, or None. Bounded: a peer's diff is parsed here too, and a
    value like 2**9999999999 must not hold the node (exponents to 2**63, integers to 18 digits)."""
    if re.fullmatch(r"2\s*\*\*\s*\d{1,2}", text):
        return Constant(name, 2 ** int(text.split("**")[1]), "pow2", (start, end), True)
    if re.fullmatch(r"\d{1,9}\s*\*\s*\d{1,9}", text):
        a, b = map(int, text.split("*"))
        v = a * b
        return Constant(name, v, "pow2" if v & (v - 1) == 0 else "int", (start, end), False) if v > 0 else None
    if re.fullmatch(r"\d{1,18}", text):
        v = int(text)
        if v <= 0:
            return None
        return Constant(name, v, "pow2" if v >= 2 and v & (v - 1) == 0 and v > 16 else "int", (start, end), False)
    if len(text) <= 32 and re.fullmatch(NUMBER, text):
        v = float(text)
        return Constant(name, v, "float", (start, end), False) if 0 < v < math.inf else None
    if re.fullmatch(r'"[SL]{1,256}"', text):
        return Constant(name, text[1:-1], "pattern", (start, end), False)
    return None


def step(c, direction, scale=1.0):
    """The constant's new value one step in `direction` (up/down), or None."""
    if c.kind == "float":
        f = 1.5 ** scale
        v = c.value * f if direction == "up" else c.value / f
        if c.value <= 1 and "RATIO" in c.name:
            v = min(v, 0.95)
        return float(f"{v:.3g}") if float(f"{v:.3g}") != c.value else None
    if c.kind == "pow2":
        v = c.value * 2 if direction == "up" else c.value // 2
        return v if v >= 1 else None
    if c.kind == "int":  # a count: one more or less; past 8 (warm-up steps, say) by the float's factor
        if c.value <= 8:
            v = c.value + 1 if direction == "up" else c.value - 1
        else:
            f = 1.5 ** scale
            v = round(c.value * f) if direction == "up" else round(c.value / f)
            v = v if v != c.value else c.value + (1 if direction == "up" else -1)
        return v if v >= 1 else None
    pattern = c.value
    if direction == "up":  # one more full-context layer
        i = pattern.rfind("S")
        return pattern[:i] + "L" + pattern[i + 1:] if i >= 0 else None
    i = pattern.find("L")
    return pattern[:i] + "S" + pattern[i + 1:] if 0 <= i < len(pattern) - 1 else (pattern[:-1] + "S" + "L" if pattern != "L" else None)


def render(c, value):
    if c.kind == "pattern":
        return f'"{value}"'
    if c.power_form:
        return f"2**{int(math.log2(value))}"
    return repr(value)


def apply(source, consts, changes):
    """source with each (name, new value) written in place."""
    for name, value in sorted(changes, key=lambda nv: consts[nv[0]].span[0], reverse=True):
        s, e = consts[name].span
        source = source[:s] + render(consts[name], value) + source[e:]
    return source


def neutral_edit(parent, child, backend):
    """Whether `child` is `parent` with only COMPUTE_NEUTRAL constants of this machine's branch
    changed, every other byte equal (whoever wrote it: the check is on the text)."""
    a, b = constants(parent, backend), constants(child, backend)
    changes = [(n, b[n].value) for n in a if n in b and b[n].value != a[n].value]
    return (bool(changes) and all(n in COMPUTE_NEUTRAL for n, _ in changes)
            and apply(parent, a, changes) == child)


class OfflineProposer:
    name, slow = "offline", False

    def __init__(self, seed=0, combine_every=4):
        self.seed, self.combine_every = seed, combine_every

    def close(self):
        pass

    def propose(self, ctx):
        consts = constants(ctx.source, ctx.backend)
        if not consts:
            return None
        rng = random.Random(f"{self.seed}:{len(ctx.history)}")
        stats = self._stats(ctx)
        tried = sum(1 for h in ctx.history if h.get("edit"))
        if tried and tried % self.combine_every == 0:
            combo = self._combine(ctx, consts, stats)
            if combo:
                return combo
        arms = [(n, d) for n in consts if n not in MEMORY for d in ("up", "down")]
        order = {n: i for i, n in enumerate(PRIOR)}
        arms.sort(key=lambda a: (order.get(a[0], len(PRIOR)), rng.random()))
        total = sum(s[0] for s in stats.values()) + 1

        def score(arm):
            n, mean, _ = stats.get(arm, (0, 0.0, 0))
            if n == 0:
                return float("inf")
            return mean + 1.5 * math.sqrt(math.log(total) / n)
        for arm in sorted(arms, key=lambda a: (a in ctx.busy, -score(a))):  # stable: prior order among untried arms
            n_tries = stats.get(arm, (0, 0.0, 0))[2]  # our own: the swarm's would shrink a big swarm's steps to nothing
            for scale in (1.0 / (1 + n_tries), 1.0 / (2 + n_tries), 1.0 / (3 + n_tries)):  # smaller steps if taken
                new = step(consts[arm[0]], arm[1], scale=scale)
                if new is None:
                    break
                p = self._proposal(ctx.source, consts, [(arm[0], arm[1], new)])
                if not (ctx.taken and ctx.taken(p.source)):
                    return p
        return None

    def _stats(self, ctx):
        """Per (name, direction): tries and mean reward in noise units (crash: -3), each result
        counted with its weight (other nodes' results on other hardware weigh less), and our own tries."""
        acc, own = {}, {}
        for h in ctx.history:
            changes = (h.get("edit") or {}).get("changes") or []
            if len(changes) != 1:
                continue
            arm = (changes[0]["name"], changes[0]["dir"])
            if h["status"] == "crash":
                r = -3.0
            elif h.get("val_bpb") is not None and h.get("parent_bpb") is not None:
                r = max(-3.0, min(3.0, (h["parent_bpb"] - h["val_bpb"]) / max(ctx.noise, 1e-9)))
            else:
                continue
            w = h.get("weight", 1.0)
            n, s = acc.get(arm, (0, 0.0))
            acc[arm] = (n + w, s + w * r)
            own[arm] = own.get(arm, 0) + ("author" not in h)
        return {a: (n, s / n, own[a]) for a, (n, s) in acc.items()}

    def _combine(self, ctx, consts, stats):
        """The two best single-parameter near-misses (better, not kept) on different parameters, together."""
        near = [(mean, arm) for arm, (n, mean, _) in stats.items() if 0 < mean and arm[0] in consts and arm[0] not in MEMORY]
        near.sort(reverse=True)
        picked, names = [], set()
        for _, (name, d) in near:
            if name not in names:
                picked.append((name, d))
                names.add(name)
        if len(picked) < 2:
            return None
        changes = [(n, d, step(consts[n], d)) for n, d in picked[:2]]
        if any(v is None for _, _, v in changes):
            return None
        p = self._proposal(ctx.source, consts, changes)
        return None if ctx.taken and ctx.taken(p.source) else p

    @staticmethod
    def _proposal(source, consts, changes):
        new = apply(source, consts, [(n, v) for n, _, v in changes])
        desc = "; ".join(f"{n} {render(consts[n], consts[n].value)} -> {render(consts[n], v)}" for n, _, v in changes)
        edit = {"changes": [{"name": n, "dir": d, "old": consts[n].value, "new": v} for n, d, v in changes]}
        return Proposal(new, desc, edit, "offline")


def make(settings, seed=0, events=None, say=None):
    """The proposer the settings ask for: offline, claude, or auto (Claude when ANTHROPIC_API_KEY is
    set, else offline); its `why` says why it was chosen. ValueError for claude without a key."""
    name = settings["proposer"]
    if name == "auto":
        has_key = bool(os.environ.get("ANTHROPIC_API_KEY"))
        name, why = ("claude", "auto: ANTHROPIC_API_KEY is set") if has_key else (
            "offline", "auto: ANTHROPIC_API_KEY is not set")
    else:
        why = f"--proposer {name}"
    if name == "claude":
        from node import claude
        p = claude.ClaudeProposer(settings["model"], settings["max_tokens"], settings["temperature"],
                                  settings["model_timeout"], seed=seed, events=events, say=say)
    else:
        p = OfflineProposer(seed)
    p.why = why
    return p
