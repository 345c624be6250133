"""The Claude proposer against a local stand-in for the Messages API (http.server on 127.0.0.1,
the real anthropic SDK pointed at it through ANTHROPIC_BASE_URL): replies checked before anything
runs, retries, timeouts and the fallback to the offline proposer, and one real node run on CPU
that proposes, rejects, repairs, ports a peer's idea, pays, and never lets the device wait."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from gossip import store as records_store, wire
from gossip.identity import Identity
from node import claude, config, gittree, loop, prompt, proposer as proposers, swarm

BASELINE = open(os.path.join(ROOT, "model", "train.py")).read()
KEY = "sk-ant-test-" + os.urandom(12).hex()
HW = dict(accelerator="a CPU", count=1, backend="cpu", framework="torch 2.13.0", budget_seconds=1.0, profile="cpu",
          data_fingerprint="f" * 64)


# -- a local Messages API ---------------------------------------------------------------------

class FakeAPI:
    """POST /v1/messages answered by `answer(request body, n)`: a text (sent as a Message, with
    usage: the cache_control blocks written to the cache once, read afterwards) or (status,
    headers) for an error; each reply waits `delay` seconds first."""

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay, self.requests, self.usages, self.cached = answer, delay, [], [], set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                api.requests.append(dict(path=self.path, headers={k.lower(): v for k, v in self.headers.items()}, body=body,
                                         t=time.time()))
                reply = api.answer(body, len(api.requests))
                time.sleep(api.delay)
                if isinstance(reply, tuple):
                    status, headers = reply
                    self._send(status, {"type": "error", "error": {"type": "api_error", "message": "try again"}}, headers)
                else:
                    self._send(200, api.message(body, reply))

            def _send(self, status, obj, headers=()):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    for k, v in dict(headers, **{"content-type": "application/json"}).items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout under test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def message(self, body, text):
        blocks = list(body.get("system", [])) + [b for m in body["messages"] for b in
                                         (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])]
        write = read = plain = 0
        for b in blocks:
            n = len(b["text"]) // 4
            if "cache_control" not in b:
                plain += n
            elif b["text"] in self.cached:
                read += n
            else:
                write += n
                self.cached.add(b["text"])
        usage = dict(input_tokens=plain, output_tokens=len(text) // 4, cache_creation_input_tokens=write,
                     cache_read_input_tokens=read)
        self.usages.append(usage)
        return {"id": f"msg_{len(self.usages)}", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": usage}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def edit_reply(hypothesis, *changes, inspired=None, source=BASELINE):
    """A reply in program.md's format: each (old, new) replaces old by new in the whole line of
    `source` that holds old, as a SEARCH/REPLACE block."""
    blocks = ""
    for old, new in changes:
        line = next((x for x in source.splitlines(keepends=True) if old in x), old.rstrip("\n") + "\n")
        blocks += f"train.py\n<<<<<<< SEARCH\n{line}=======\n{line.replace(old, new)}>>>>>>> REPLACE\n\n"
    return f"Hypothesis: {hypothesis}\n" + (f"Inspired-by: {inspired}\n" if inspired else "") + "\n" + blocks


def first_text(body):
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else "".join(b["text"] for b in content)


@pytest.fixture
def api_env(monkeypatch):
    """The SDK's own environment: the key and the endpoint."""
    def point(api):
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", api.url)
    return point


def context(**kw):
    return proposers.Context(BASELINE, [], 0.01, "cpu", [], None, hardware=HW, **kw)


def events_of(calls):
    return lambda event, **fields: calls.append(dict(fields, event=event))


# -- the checks a reply must pass -------------------------------------------------------------

def test_replies_that_cannot_run_are_refused_with_a_reason():
    ok = prompt.apply_reply(edit_reply("lower the warmdown", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6")),
                            BASELINE)
    assert ok.source == BASELINE.replace("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6") and ok.hypothesis == "lower the warmdown"
    whole = prompt.apply_reply("Hypothesis: all of it\n```python\n" + ok.source + "```\n", BASELINE)
    assert whole.source == ok.source
    cases = {
        "matches nothing": edit_reply("x", ("WARMDOWN_RATIO = 0.33\n", "WARMDOWN_RATIO = 0.6\n")),
        "matches 2 places": edit_reply("x", ("        x = x.mT\n", "        x = x.T\n")),
        "edits model/prepare.py; only train.py": edit_reply("x", ("WARMDOWN", "W")).replace("train.py\n<<<", "model/prepare.py\n<<<"),
        "does not parse: line": edit_reply("x", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = (0.75")),
        "change nothing": edit_reply("x", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.75")),
        "is empty": "Hypothesis: x\n<<<<<<< SEARCH\n=======\nX = 1\n>>>>>>> REPLACE\n",
        "no longer hands its model": edit_reply("x", ("    val_bpb = prepare.hand_over(", "    val_bpb = prepare.evaluate(")),
        "2 code blocks": "Hypothesis: x\n```python\nA = 1\n```\nand\n```python\nB = 2\n```\n",
        "no SEARCH/REPLACE blocks": "Hypothesis: lower the LR\n--- a/train.py\n+++ b/train.py\n",
    }
    for reason, reply in cases.items():
        with pytest.raises(prompt.Invalid, match=re.escape(reason)):
            prompt.apply_reply(reply, BASELINE)


def test_a_rejected_reply_is_asked_again_once_then_the_offline_proposer_takes_the_slot(api_env):
    replies = {1: edit_reply("sharper", ("        x = x.mT\n", "        x = x.T\n")),
               2: edit_reply("sharper", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = (0.75"))}
    api = FakeAPI(lambda body, n: replies[n])
    api_env(api)
    calls = []
    p = claude.ClaudeProposer(events=events_of(calls), seed=1)
    try:
        got = p.propose(context())
    finally:
        p.close()
        api.close()
    assert got.proposer == "offline" and got.usage["calls"] == 2  # the rejected replies were paid for
    assert [c["event"] for c in calls] == ["proposal_rejected", "proposal_rejected", "proposer_error"]
    retry = api.requests[1]["body"]["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert "rejected and nothing ran" in retry[2]["content"] and "matches 2 places" in retry[2]["content"]


def test_rate_limits_and_server_errors_are_retried_with_backoff(api_env):
    answers = {1: (429, {"retry-after-ms": "50"}), 2: (500, {}),
               3: edit_reply("a longer warmdown", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.8"))}
    api = FakeAPI(lambda body, n: answers[n])
    api_env(api)
    p = claude.ClaudeProposer(retries=2)
    try:
        got = p.propose(context())
    finally:
        p.close()
        api.close()
    assert got.proposer == "claude" and "WARMDOWN_RATIO = 0.8" in got.source and len(api.requests) == 3
    assert got.usage["calls"] == 1 and got.base == BASELINE
    body = api.requests[0]["body"]
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"} and "Harness facts" in body["system"][0]["text"]
    assert "The reply format" in body["system"][0]["text"]  # program.md, read at this proposal
    assert body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"} and "temperature" not in body


def test_timeouts_fall_back_to_the_offline_proposer_for_a_while(api_env):
    api = FakeAPI(lambda body, n: edit_reply("late", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.7")), delay=1.5)
    api_env(api)
    now, calls = [0.0], []
    p = claude.ClaudeProposer(timeout=0.3, retries=1, fail_limit=2, fallback_s=600, clock=lambda: now[0],
                              events=events_of(calls))
    try:
        assert p.propose(context()).proposer == "offline"
        assert p.propose(context()).proposer == "offline"
        assert [c["event"] for c in calls] == ["proposer_error", "proposer_error", "proposer_fallback"]
        # the timeout bounds the whole proposal: the SDK's retry never starts
        assert "Timeout" in calls[0]["error"] or "took over 0.3 s" in calls[0]["error"]
        assert len(api.requests) == 2
        assert p.propose(context()).proposer == "offline" and len(api.requests) == 2  # no request while it lasts
        now[0], api.delay = 601.0, 0.0
        back = p.propose(context())
        assert back.proposer == "claude" and [c["event"] for c in calls][-2:] == ["proposer_resumed", "proposal"]
    finally:
        p.close()
        api.close()
    assert KEY not in json.dumps(calls)


def test_replies_that_are_no_message_and_a_refused_key_leave_the_slot_to_the_offline_proposer(api_env):
    """A 200 with JSON cut short, an HTML page from a proxy, a 401: each proposal is the offline
    proposer's, with one console line; a refused key hands every slot over at once."""
    replies = iter([(200, "application/json", b'{"id": "msg_1", "content": [{"type": "te'),
                    (200, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
                    (401, "application/json", json.dumps({"type": "error", "error": {
                        "type": "authentication_error", "message": "invalid x-api-key"}}).encode())])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            status, kind, body = next(replies)
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class Api:
        url = f"http://127.0.0.1:{server.server_address[1]}"
    api_env(Api)
    calls, lines = [], []
    p = claude.ClaudeProposer(retries=0, fail_limit=3, events=events_of(calls), say=lines.append)
    try:
        got = [p.propose(context()) for _ in range(4)]  # the fourth comes while the offline proposer holds the slots
    finally:
        p.close()
        server.shutdown()
        server.server_close()
    assert [g.proposer for g in got] == ["offline"] * 4
    assert [c["event"] for c in calls] == ["proposer_error", "proposer_error", "proposer_error", "proposer_fallback"]
    assert len(lines) == 3 and "the API refused the key" in lines[2] and KEY not in json.dumps(calls) + "".join(lines)


def test_a_crash_gets_one_repair_round_and_a_declined_one_a_new_proposal(api_env):
    api = FakeAPI(lambda body, n: "NO_REPAIR" if first_text(body).startswith("# Repair") else
                  edit_reply("a longer warmdown", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.8")))
    api_env(api)
    crashed = BASELINE.replace("MODEL_DIM = 128", "MODEL_DIM = 100")
    crash = dict(id=7, description="a narrower model", source=crashed, parent=BASELINE,
                 log_tail="RuntimeError: shape '[8, 256, 3, 32]' is invalid for input of size 614400")
    calls = []
    p = claude.ClaudeProposer(events=events_of(calls))
    try:
        got = p.propose(context(crash=crash))
        again = p.propose(context(crash=crash))  # one round per crash
    finally:
        p.close()
        api.close()
    asked = first_text(api.requests[0]["body"])
    assert asked.startswith("# Repair") and "is invalid for input of size" in asked and "MODEL_DIM = 100" in asked
    assert [c["event"] for c in calls] == ["repair_declined", "proposal", "proposal"] and len(api.requests) == 3
    assert got.usage["calls"] == 2 and "repair_of" not in got.edit and "WARMDOWN_RATIO = 0.8" in got.source
    assert again.usage["calls"] == 1


def test_a_prepared_proposal_follows_a_moved_best(tmp_path, stdlib_data, stdlib_cache, monkeypatch, api_env):
    """Rebased by a three-way merge when the best moved elsewhere; asked for anew when it conflicts."""
    def answer(body, n):
        shown = first_text(body)
        if "WARMDOWN_RATIO = 0.75" in shown:
            return edit_reply("a shorter warmdown", ("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6"))
        return edit_reply("a lower final LR", ("FINAL_LR_FRAC = 0.05", "FINAL_LR_FRAC = 0.02"))
    api = FakeAPI(answer)
    api_env(api)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), budget=1.0, listen="off", proposer="claude")
    node = loop.Node(str(tmp_path / "n"), s, stdlib_data, out=open(os.devnull, "w"))

    def move_best(old, new):
        source = node.tree.read(node.best()).replace(old, new)
        node.store.set("best_commit", node.tree.commit(source, "moved"))
        return source
    try:
        node.prepare_next()
        moved = move_best("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")
        p = node.next_candidate()
        assert p.source == moved.replace("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6") and p.base == moved
        node.prepare_next()
        moved = move_best("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.5")
        p = node.next_candidate()
        assert p.source == moved.replace("FINAL_LR_FRAC = 0.05", "FINAL_LR_FRAC = 0.02") and len(api.requests) == 3
        events = [json.loads(line)["event"] for line in open(tmp_path / "n" / "events.jsonl")]
        assert "proposal_rebased" in events and "proposal_stale" in events
    finally:
        node.close()
        api.close()
    assert loop.status(str(tmp_path / "n"))["model"]["calls"] == 1  # the stale one, never run, still paid for


def test_auto_uses_claude_only_with_a_key_and_claude_without_one_is_an_error(monkeypatch):
    s = config.load(None)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    p = proposers.make(s)
    assert p.name == "offline" and p.why == "auto: ANTHROPIC_API_KEY is not set"
    with pytest.raises(ValueError, match="needs ANTHROPIC_API_KEY"):
        proposers.make(dict(s, proposer="claude"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    p = proposers.make(s)
    p.close()
    assert p.name == "claude" and p.why == "auto: ANTHROPIC_API_KEY is set" and p.model == claude.DEFAULT_MODEL


def test_prices():
    usage = dict(input_tokens=1_000_000, cache_write_tokens=0, cache_read_tokens=1_000_000, output_tokens=100_000)
    assert claude.cost("claude-sonnet-5-5", usage) == pytest.approx(2.0 + 0.10 + 1.0)
    assert claude.cost("claude-opus-4-5-20251101", usage) == claude.cost("claude-opus-4-5", usage)
    assert claude.cost("someone-elses-model", usage) is None
    import anthropic.types
    assert claude.DEFAULT_MODEL in str(anthropic.types.Model)  # a model the SDK lists


# -- one real node ----------------------------------------------------------------------------

PEER = Identity.from_seed(b"mlx-peer")
CRASH = [("WARMDOWN_RATIO = 0.75", "WARMDOWN_RATIO = 0.6"),  # the idea, and a typo that fails before training
         ("grad_accum = max(1, TOTAL_BATCH_SIZE // (rows * SEQ_LEN))",
          "grad_accum = max(1, TOTAL_BATCH_SIZE // (rows * SEQ_LENGTH))")]
PORTED = ("ADAM_BETAS = (0.8, 0.95)", "ADAM_BETAS = (0.85, 0.95)")
RENAMED = ("betas=ADAM_BETAS,", "betas=ADAM_BETA,")  # the port's own slip: it crashes too, early
LATENCY = 2.0


def researcher(body, n):
    """The stand-in model of the node run: a reply that does not apply, then (told why) a candidate
    with a typo; a port of the peer's idea (with a slip of its own); the first typo's repair."""
    text = first_text(body)
    if text.startswith("# Repair"):
        crashed = re.search(r"^```python\n(.*?)^```", text, re.M | re.S).group(1)
        return edit_reply("fix the SEQ_LENGTH typo", (CRASH[1][1], CRASH[1][0]), source=crashed)
    if len(body["messages"]) == 3:
        return edit_reply("a shorter warmdown leaves more steps at the peak LR", *CRASH)
    if n == 1:
        return edit_reply("a shorter warmdown", ("WARMDOWN_RATIO = 0.33", "WARMDOWN_RATIO = 0.6"))
    peer = re.search(r"^\[([0-9a-f]{12})\]", text, re.M).group(1)
    return edit_reply("beta1 0.85, as the MLX peer found", PORTED, RENAMED, inspired=peer)


@pytest.fixture(scope="module")
def node_run(tmp_path_factory, stdlib_cache, stdlib_data):
    """python -m node join with a key set: 2 baselines and 3 experiments on CPU (two of them crash
    early: 3 full runs in all), against the stand-in."""
    from model import prepare
    home = tmp_path_factory.mktemp("claude-node")
    task = swarm.task_id(stdlib_data.fingerprint, "tiny", prepare.PROFILES["tiny"]["max_seq_len"],
                         prepare.PROFILES["tiny"]["eval_tokens"])
    ported = BASELINE.replace(*PORTED)
    peer = wire.make_record(PEER, "improvement", dict(
        task=task, lineage="mlx", parent=swarm.content_hash(BASELINE), child=swarm.content_hash(ported),
        diff=gittree.diff_texts(BASELINE, ported), before=dict(val_bpb=2.0, runs=2, spread=0.002),
        after=dict(val_bpb=1.98, runs=2, spread=0.002), hardware=dict(HW, backend="mlx", accelerator="Apple M3"),
        proposer="claude", description="beta1 0.85"), time.time() * 1000)
    records = records_store.Store(str(home / "gossip.sqlite"))
    records.add(peer)
    records.close()
    api = FakeAPI(researcher, delay=LATENCY)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint,
               ANTHROPIC_API_KEY=KEY, ANTHROPIC_BASE_URL=api.url)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "node", "join", "--home", str(home), "--profile", "tiny", "--budget", "1",
                        "--max-experiments", "3", "--max-reruns", "0", "--listen", "off"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    api.close()
    status = subprocess.run([sys.executable, "-m", "node", "status", "--home", str(home), "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    text = subprocess.run([sys.executable, "-m", "node", "status", "--home", str(home)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    events = [json.loads(line) for line in open(home / "events.jsonl")]
    rs = records_store.Store(str(home / "gossip.sqlite"))
    published = [rec for _, rec in rs.since() if rec.author_id != PEER.id]
    rs.close()
    from node import home as homes
    store = homes.Store(str(home / "store.sqlite"))
    exps = [dict(e) for e in store.experiments()]
    store.db.close()
    return dict(home=home, r=r, api=api, peer=peer, events=events, published=published, exps=exps,
                status=json.loads(status.stdout), status_text=text.stdout, seconds=time.time() - t0)


def test_a_node_researches_with_claude(node_run):
    r, exps = node_run["r"], node_run["exps"]
    assert r.returncode == 0, r.stderr + r.stdout
    assert "proposer claude (auto: ANTHROPIC_API_KEY is set, model claude-sonnet-5-5)" in r.stdout
    cands = [e for e in exps if e["kind"] == "candidate"]
    assert [e["proposer"] for e in cands] == ["claude"] * 3
    assert [e["status"] for e in cands][:2] == ["crash", "crash"] and cands[2]["status"] in ("keep", "discard")
    assert [e["description"] for e in cands] == [
        "a shorter warmdown leaves more steps at the peak LR", "beta1 0.85, as the MLX peer found",
        "a shorter warmdown leaves more steps at the peak LR (repaired: fix the SEQ_LENGTH typo)"]
    shown = first_text(node_run["api"].requests[0]["body"])  # prepared while the first baseline ran
    assert "WARMDOWN_RATIO = 0.75" in shown and "None yet." in shown and "The best has not been measured" in shown


def test_a_reply_that_does_not_apply_is_rejected_and_never_runs(node_run):
    rejected = [e for e in node_run["events"] if e["event"] == "proposal_rejected"]
    assert len(rejected) == 1 and "matches nothing" in rejected[0]["reason"]
    retry = node_run["api"].requests[1]["body"]["messages"][-1]["content"]
    assert "matches nothing" in retry
    assert not any("WARMDOWN_RATIO = 0.33" in json.dumps(e) for e in node_run["exps"])


def test_a_crash_gets_one_repair_round_with_its_traceback(node_run):
    repairs = [q for q in node_run["api"].requests if first_text(q["body"]).startswith("# Repair")]
    assert len(repairs) == 1
    asked = first_text(repairs[0]["body"])
    assert "NameError: name 'SEQ_LENGTH' is not defined" in asked and "SEQ_LENGTH" not in BASELINE
    crashed, _, repaired = [e for e in node_run["exps"] if e["kind"] == "candidate"]
    assert json.loads(repaired["edit"])["repair_of"] == crashed["id"]
    tree = gittree.Tree(str(node_run["home"] / "tree"))
    fixed = tree.read(repaired["commit_"])
    assert fixed == tree.read(repaired["parent"]).replace(*CRASH[0]) and repaired["status"] != "crash"


def test_the_port_of_a_peers_idea_names_its_record(node_run):
    ported = [rec for rec in node_run["published"] if rec.type == "experiment" and "MLX" in rec.body["hypothesis"]]
    assert len(ported) == 1 and ported[0].body["inspired_by"] == node_run["peer"].id  # a failed port names it too
    assert "NameError: name 'ADAM_BETA' is not defined" in ported[0].body["log_tail"]
    shown = first_text(node_run["api"].requests[2]["body"])
    assert f"[{node_run['peer'].id.hex()[:12]}]" in shown and "lineage mlx" in shown and "ADAM_BETAS" in shown
    others = [rec for rec in node_run["published"] if rec.type == "experiment" and rec is not ported[0]]
    assert others and all("inspired_by" not in rec.body for rec in others)


def test_the_device_never_waits_for_the_model(node_run):
    """Each proposal was prepared during the run before it; between runs the node spends well under
    the model's latency, and every request came while a run held the device."""
    ev = node_run["events"]
    runs = [e for e in ev if e["event"] == "run"]
    ends = [e for e in ev if e["event"] == "result"]
    assert len(runs) == len(ends) == 5
    gaps = [nxt["t"] - end["t"] for end, nxt in zip(ends, runs[1:])]
    assert max(gaps) < LATENCY / 2, gaps
    spans = [(a["t"], b["t"]) for a, b in zip(runs, ends)]
    first, *rest = [q["t"] for q in node_run["api"].requests]
    assert first + LATENCY < spans[0][1]  # asked while the first baseline ran
    for t in rest:  # asked as a run started, or during one
        assert any(a - 1 < t < b for a, b in spans), (t, spans)
    busy = sum(b - a for a, b in spans) / (spans[-1][1] - spans[0][0])
    print(f"device busy {100 * busy:.1f} % of {spans[-1][1] - spans[0][0]:.0f} s; gaps {[round(g, 2) for g in gaps]}; "
          f"node run {node_run['seconds']:.0f} s")
    assert busy > 0.9


def test_tokens_and_cost_are_recorded_and_totalled_in_status(node_run):
    usages = node_run["api"].usages
    assert len(usages) == 4  # none prepared after the last experiment: nothing paid for nothing
    want = sum(claude.cost("claude-sonnet-5-5", dict(input_tokens=u["input_tokens"], output_tokens=u["output_tokens"],
                                                      cache_read_tokens=u["cache_read_input_tokens"],
                                                      cache_write_tokens=u["cache_creation_input_tokens"]))
               for u in usages)
    m = node_run["status"]["model"]
    assert m["calls"] == 4 and m["proposals"] == 3 and m["usd"] == pytest.approx(want)
    assert m["cache_read_tokens"] == sum(u["cache_read_input_tokens"] for u in usages) > 0
    assert m["output_tokens"] == sum(u["output_tokens"] for u in usages)
    first = json.loads([e for e in node_run["exps"] if e["kind"] == "candidate"][0]["usage"])
    assert first["calls"] == 2  # the rejected reply is paid for by the proposal that followed it
    assert "model use:      4 calls for 3 proposals" in node_run["status_text"]


def test_the_api_key_is_never_written(node_run):
    assert KEY not in node_run["r"].stdout + node_run["r"].stderr
    for folder, _, files in os.walk(node_run["home"]):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert KEY.encode() not in f.read(), name
    tree = gittree.Tree(str(node_run["home"] / "tree"))
    assert KEY not in tree.git("log", "--all", "-p")  # git objects are compressed: read them back
    sent = node_run["api"].requests[0]["headers"]  # it went where it belongs (SDK 2 sends a bearer token)
    assert KEY in sent.get("x-api-key", "") + sent.get("authorization", "")


# -- stopping -----------------------------------------------------------------------------------

def test_a_request_in_flight_ends_with_the_node(tmp_path, stdlib_data, stdlib_cache, monkeypatch, api_env):
    api = FakeAPI(lambda body, n: edit_reply("slow", PORTED), delay=60)
    api_env(api)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stdlib_cache))
    s = dict(config.load(os.path.join(ROOT, "configs", "cpu.toml")), budget=1.0, listen="off", proposer="claude")
    node = loop.Node(str(tmp_path / "n"), s, stdlib_data, out=open(os.devnull, "w"))
    try:
        node.prepare_next()
        deadline = time.time() + 10
        while not api.requests and time.time() < deadline:
            time.sleep(0.05)
        assert api.requests
    finally:
        t0 = time.time()
        node.close()
        api.close()
    assert time.time() - t0 < 2
    assert not [t for t in threading.enumerate() if t.name == "claude-proposer"]


def test_sigterm_stops_a_node_waiting_on_the_model(tmp_path, stdlib_data, stdlib_cache):
    api = FakeAPI(lambda body, n: edit_reply("slow", PORTED), delay=60)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(stdlib_cache), AUTORESEARCH_DATA=stdlib_data.fingerprint,
               ANTHROPIC_API_KEY=KEY, ANTHROPIC_BASE_URL=api.url)
    p = subprocess.Popen([sys.executable, "-m", "node", "join", "--home", str(tmp_path / "n"), "--profile", "cpu",
                          "--budget", "1", "--listen", "off"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not api.requests and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert api.requests, "the node asked nothing of the model"
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=30)[0]
        assert p.returncode == 143 and time.time() - t0 < 10, out
        assert "stopped; the tree is at the best commit" in out
    finally:
        if p.poll() is None:
            p.kill()
        api.close()
