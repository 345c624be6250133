"""The Claude proposer: an LLM researcher that reads program.md, the harness's facts, the best
train.py, this node's recent history and what the swarm found, and answers with one hypothesis
and exact edits of train.py (node/prompt.py writes the prompt and checks the reply).

Prompt caching: the system block (program.md, re-read at every proposal so that a person's edits
take effect without a restart, and the harness facts) and the best train.py change rarely and
carry cache_control marks; only the last block (history, swarm findings, notes) is new each time.

A reply is checked before anything runs; a rejected one is recorded (event proposal_rejected) and
asked again once with the reason. When the context names our crashed candidate, one repair round
comes first: the crashed file and its traceback tail, answered with a fix or NO_REPAIR.

Failures never stop the node. The SDK retries rate limits (429), server errors (5xx), 408/409 and
lost connections `retries` times with exponential backoff, honouring retry-after. A proposal the
model could not make (an error after those retries, a timeout, a reply rejected twice) is made by
the offline proposer instead; after FAIL_LIMIT of them in a row the offline proposer takes over
for FALLBACK_S (event proposer_fallback), then Claude is tried again.

Proposals are computed on the proposer's own thread (an asyncio loop): the node submits the next
one while the device runs, and `close` cancels a request in flight at once.

The API key: the SDK reads ANTHROPIC_API_KEY (and the endpoint from ANTHROPIC_BASE_URL) itself.
Nothing here writes it anywhere; error texts are scrubbed of it before they reach events.
"""

import asyncio
import dataclasses
import os
import re
import threading
import time

from node import prompt, proposer as proposers

DEFAULT_MODEL = "claude-sonnet-5-5"
PROGRAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "program.md")
FAIL_LIMIT = 3            # proposals in a row the model could not make before the offline proposer takes over
FALLBACK_S = 600.0        # for this long

# USD per million tokens: (input, 5-minute cache write, cache read, output), by model id (a date
# suffix is ignored). Anthropic's list prices, from platform.claude.com/docs (the pricing and
# model pages) as of November 2026, Sonnet 5.5's and Opus 5.5's cache reads at 0.05x input since
# October 2026; they change: check claude.com/pricing. A model not listed has its tokens counted
# and no cost.
PRICES = {
    "claude-sonnet-5-5": (2.0, 2.5, 0.10, 10.0),
    "claude-sonnet-5": (2.0, 2.5, 0.20, 10.0),
    "claude-sonnet-4-6": (3.0, 3.75, 0.30, 15.0),
    "claude-sonnet-4-5": (3.0, 3.75, 0.30, 15.0),
    "claude-opus-5-5": (4.0, 5.0, 0.20, 20.0),
    "claude-opus-5": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-8": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-7": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-6": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-5": (5.0, 6.25, 0.50, 25.0),
    "claude-haiku-4-5": (1.0, 1.25, 0.10, 5.0),
    "claude-fable-5-1": (10.0, 12.5, 0.25, 50.0),
    "claude-fable-5": (10.0, 12.5, 1.0, 50.0),
}
TOKENS = ("input_tokens", "cache_write_tokens", "cache_read_tokens", "output_tokens")  # in PRICES' order


def cost(model, usage):
    """USD of one call's tokens, or None for a model without a price."""
    price = PRICES.get(re.sub(r"-\d{8}$", "", model))
    return None if price is None else sum(usage[k] * p for k, p in zip(TOKENS, price)) / 1e6


def add_usage(total, usage):
    """Token counts and cost summed (None: nothing yet)."""
    if not usage:
        return total
    out = dict(total or {})
    for k, v in usage.items():
        out[k] = out.get(k, 0) + v if isinstance(v, (int, float)) else v
    return out


class ClaudeProposer:
    name, slow = "claude", True

    def __init__(self, model=DEFAULT_MODEL, max_tokens=16000, temperature=None, timeout=600.0, retries=4, seed=0,
                 events=None, say=None, program=PROGRAM, fail_limit=FAIL_LIMIT, fallback_s=FALLBACK_S,
                 clock=time.monotonic):
        try:
            import anthropic
        except ImportError:
            raise ValueError("the Claude proposer needs the anthropic package: pip install anthropic") from None
        if not os.environ.get("ANTHROPIC_API_KEY"):
            raise ValueError("--proposer claude needs ANTHROPIC_API_KEY in the environment "
                             "(--proposer auto uses the offline proposer without it)")
        self.anthropic, self.model, self.max_tokens, self.temperature = anthropic, model, max_tokens, temperature
        self.events, self.say = events or (lambda *a, **k: None), say or (lambda line: None)
        self.program, self.fail_limit, self.fallback_s, self.clock = program, fail_limit, fallback_s, clock
        self.offline = proposers.OfflineProposer(seed)
        self.failures, self.fallback_until, self.repaired, self.usage = 0, float("-inf"), set(), None
        # the key and ANTHROPIC_BASE_URL come from the environment, read by the SDK
        self.client = anthropic.AsyncAnthropic(max_retries=retries, timeout=timeout)
        self.timeout = timeout  # for a whole proposal too: its retries and a re-ask after a rejected reply
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="claude-proposer", daemon=True)
        self.thread.start()

    # -- the node's side ------------------------------------------------------------------

    def submit(self, ctx):
        """Start a proposal on the proposer's thread; a concurrent Future of a Proposal (or None)."""
        return asyncio.run_coroutine_threadsafe(self._propose(ctx), self.loop)

    def propose(self, ctx):
        return self.submit(ctx).result()

    def close(self):
        """Cancel what is in flight and stop the proposer's thread."""
        if not self.thread.is_alive():
            return

        async def shut():
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await self.client.close()
        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)

    # -- one proposal ---------------------------------------------------------------------

    async def _propose(self, ctx):
        if self.clock() < self.fallback_until:
            return self._offline(ctx)
        self.usage = None
        try:
            p = await asyncio.wait_for(self._proposal(ctx), self.timeout)
        except Exception as e:  # noqa: BLE001 -- the node never stops for the model: a reply that is no JSON,
            # an HTML page from a proxy, a timeout, an API error all leave the slot to the offline proposer
            permanent = isinstance(e, (self.anthropic.AuthenticationError, self.anthropic.PermissionDeniedError))
            reason = str(e) if isinstance(e, prompt.Invalid) else (
                f"the proposal took over {self.timeout:g} s" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}")
            return self._failed(ctx, reason, permanent)
        if self.failures >= self.fail_limit:
            self.events("proposer_resumed", after_failures=self.failures)
        self.failures = 0
        self.events("proposal", hypothesis=p.description[:200], inspired_by=p.inspired_by, usage=p.usage,
                    repair_of=(p.edit or {}).get("repair_of"))
        return p

    async def _proposal(self, ctx):
        system = prompt.system(self._read_program(), ctx)
        p = None
        if ctx.crash and ctx.crash["id"] not in self.repaired:
            self.repaired.add(ctx.crash["id"])
            p = await self._repair(system, ctx)
        return p or await self._fresh(system, ctx)

    def _read_program(self):
        with open(self.program) as f:
            return f.read()

    async def _fresh(self, system, ctx):
        messages = [{"role": "user", "content": prompt.user(ctx)}]
        for attempt in (1, 2):
            text = ""
            try:
                text = await self._ask(system, messages)
                edit = self._checked(text, ctx.source, ctx)
            except prompt.Invalid as e:
                self.events("proposal_rejected", reason=str(e)[:300], attempt=attempt)
                if attempt == 2:
                    raise
                messages += [{"role": "assistant", "content": text.strip() or "(an empty reply)"},
                             {"role": "user", "content": prompt.rejected(e)}]
                continue
            inspired = prompt.resolve(edit.inspired, ctx.swarm)
            return proposers.Proposal(edit.source, edit.hypothesis, {"hypothesis": edit.hypothesis}, self.name,
                                      usage=self._take_usage(), inspired_by=inspired, base=ctx.source)

    async def _repair(self, system, ctx):
        """One round for our crashed candidate: its fix, or None (declined, or a fix that fails its checks)."""
        c = ctx.crash
        try:
            text = await self._ask(system, [{"role": "user", "content": prompt.repair(c)}])
            if prompt.declined(text):
                self.events("repair_declined", of=c["id"])
                return None
            edit = self._checked(text, c["source"], ctx)
        except prompt.Invalid as e:
            self.events("proposal_rejected", reason=str(e)[:300], repair_of=c["id"])
            return None
        description = f"{c['description']} (repaired: {edit.hypothesis})"[:300]
        return proposers.Proposal(edit.source, description, {"hypothesis": edit.hypothesis, "repair_of": c["id"]},
                                  self.name, usage=self._take_usage(), base=c["parent"])

    def _checked(self, text, source, ctx):
        edit = prompt.apply_reply(text, source)
        if ctx.taken and ctx.taken(edit.source):
            raise prompt.Invalid("this exact change has been measured already, or is running now here or at a peer; "
                                 "propose a different experiment")
        return edit

    async def _ask(self, system, messages):
        kw = dict(model=self.model, max_tokens=self.max_tokens, system=system, messages=messages)
        if self.temperature is not None:  # Sonnet 5 and later refuse a non-default temperature
            kw["temperature"] = self.temperature
        m = await self.client.messages.create(**kw)
        u = m.usage
        call = dict(input_tokens=u.input_tokens or 0, output_tokens=u.output_tokens or 0,
                    cache_read_tokens=getattr(u, "cache_read_input_tokens", 0) or 0,
                    cache_write_tokens=getattr(u, "cache_creation_input_tokens", 0) or 0)
        usd = cost(m.model or self.model, call)
        self.usage = add_usage(self.usage, dict(call, calls=1, usd=usd or 0.0, unpriced_calls=int(usd is None),
                                                model=m.model or self.model))
        if m.stop_reason == "max_tokens":
            raise prompt.Invalid(f"the reply was cut off at max_tokens ({self.max_tokens}); send shorter edits")
        return "".join(b.text for b in m.content if b.type == "text")

    def _take_usage(self):
        usage, self.usage = self.usage, None
        return usage

    # -- when the model cannot help -------------------------------------------------------

    def _failed(self, ctx, reason, permanent=False):
        """The offline proposer's proposal for this slot; after fail_limit failures in a row (at once for a
        refused key), it takes every slot for fallback_s seconds. Each failure is one line on the console."""
        self.failures = max(self.failures + 1, self.fail_limit if permanent else 0)
        reason = scrub_key(" ".join(reason.split()))[:300]
        self.events("proposer_error", error=reason, failures=self.failures)
        if self.failures < self.fail_limit:
            self.say(f"Claude proposer: this proposal failed ({reason[:160]}); the offline proposer makes it")
        else:
            self.fallback_until = self.clock() + self.fallback_s
            self.events("proposer_fallback", failures=self.failures, seconds=self.fallback_s, error=reason)
            self.say(f"Claude proposer: {'the API refused the key' if permanent else f'{self.failures} failed proposals in a row'} "
                     f"(last: {reason[:120]}); the offline proposer takes over for {self.fallback_s / 60:g} min")
        return self._offline(ctx)

    def _offline(self, ctx):
        p = self.offline.propose(ctx)
        usage = self._take_usage()  # replies rejected on the way were paid for: they count with this slot
        return p if p is None or usage is None else dataclasses.replace(p, usage=usage)


def scrub_key(text):
    key = os.environ.get("ANTHROPIC_API_KEY")
    return text.replace(key, "<ANTHROPIC_API_KEY>") if key else text
