"""The Claude proposer against a local stand-in for the Messages API (http.server on 127.0.0.1,
the real anthropic SDK pointed at it through ANTHROPIC_BASE_URL): replies checked before anything
runs, retries, timeouts and the fallback to the offline proposer, the repair round."""
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from node import claude, prompt, proposer as proposers

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
        blocks = list(body["system"]) + [b for m in body["messages"] for b in
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
        assert "Timeout" in calls[0]["error"] and len(api.requests) == 4  # each with one retry of the SDK
        assert p.propose(context()).proposer == "offline" and len(api.requests) == 4  # no request while it lasts
        now[0], api.delay = 601.0, 0.0
        back = p.propose(context())
        assert back.proposer == "claude" and [c["event"] for c in calls][-2:] == ["proposer_resumed", "proposal"]
    finally:
        p.close()
        api.close()
    assert KEY not in json.dumps(calls)


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


def test_prices():
    usage = dict(input_tokens=1_000_000, cache_write_tokens=0, cache_read_tokens=1_000_000, output_tokens=100_000)
    assert claude.cost("claude-sonnet-5-5", usage) == pytest.approx(2.0 + 0.10 + 1.0)
    assert claude.cost("claude-opus-4-5-20251101", usage) == claude.cost("claude-opus-4-5", usage)
    assert claude.cost("someone-elses-model", usage) is None
    import anthropic.types
    assert claude.DEFAULT_MODEL in str(anthropic.types.Model)  # a model the SDK lists
