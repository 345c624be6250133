"""Per-peer accounting for the protocol core, pure like it (time comes in as `now`): what each
connection has sent us, and what each member has done for us.

- A connection (the transport's origin: a ZeroMQ routing id, a simulated address) has a token
  bucket and a score. A message costs a token, and so does every signature check it makes us
  do beyond its own (a relayed hello, a record), so no connection buys more CPU than its rate.
  Malformed, oversized, badly signed or forged input pulls the score down; at `ban_score` the
  connection is refused for `ban_s`.
- A member (a node id, on whichever connections it speaks) has debt and service. Debt: digests
  it left unanswered and rumours it told that proved false, forgiven linearly, so that one lost
  reply sidelines an honest member for seconds while a habit sidelines a censor or a slanderer
  for good. Service: records it delivered to us before anyone else did (pushed, or served when
  we pulled), decaying by half every SERVICE_HALF_LIFE_S. A silent censor answers probes and
  digests like anyone; what it never earns is service. A member whose digest says it holds
  all we hold is asked for one of our records (a spot check, vetted for a while when it serves
  it): a censor that answers digests with ours, to owe nothing, breaks that promise. So does
  one that drops records, when a possession check asks it for one it must hold.
- Standing = the worst score of a member's connections less its debt. Members below zero are
  not gossiped to, and their rumours are not heard; members with service are preferred.
"""

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

PENALTY = {"malformed": 1.0, "oversize": 2.0, "schema": 2.0, "version": 0.5, "unknown_type": 1.0,
           "future": 1.0, "stale": 0.5, "bad_signature": 4.0, "id_mismatch": 4.0, "broken_promise": 1.0,
           "unserved_pull": 1.0,
           "throttled": 0.05, "spoofed": 4.0}
DEBT_DECAY = 0.1             # per second: one debt sidelines a member for ~10 s
SERVICE_HALF_LIFE_S = 600.0  # evidence of service fades over minutes, not at once
SERVED = 0.5                 # the service that makes a member preferred (one delivery, one half-life ago)
MAX_SCORE = 10.0


@dataclass
class Account:
    """What one connection has sent us."""
    origin: object
    tokens: float
    refilled: float
    score: float = 0.0
    banned_until: float = 0.0
    node: str = ""
    counts: Counter = field(default_factory=Counter)


class Conduct:
    """What one member has done for us: debt and service, each as of a time, when it last
    served a record we asked it for (a spot or possession check), when it became known here,
    and when a possession check last asked it."""
    __slots__ = ("debt", "debt_at", "service", "service_at", "vetted_at", "first", "asked_at")

    def __init__(self, now):
        self.debt, self.debt_at, self.service, self.service_at = 0.0, now, 0.0, now
        self.vetted_at, self.first, self.asked_at = None, now, None


class Ledger:
    def __init__(self, config):
        self.config = config
        self.accounts = OrderedDict()   # connection -> Account, least recently used first
        self.by_member = {}             # member id -> its connections' Accounts
        self.conduct = OrderedDict()    # member id -> Conduct, least recently used first

    # --- connections ---------------------------------------------------------------------------

    def account(self, origin, now):
        """The connection's account, created on first use (forgetting the longest-idle unbanned
        one past `max_accounts`)."""
        a = self.accounts.get(origin)
        if a is None:
            a = self.accounts[origin] = Account(origin, tokens=self.config.burst, refilled=now)
            if len(self.accounts) > self.config.max_accounts:
                for k, old in self.accounts.items():
                    if old.banned_until <= now and k != origin:
                        del self.accounts[k]
                        if old.node in self.by_member:
                            self.by_member[old.node] = [x for x in self.by_member[old.node] if x is not old]
                        break
        self.accounts.move_to_end(origin)
        return a

    def take(self, acct, tokens, now):
        """Spend `tokens` of the connection's bucket; False (nothing spent) if it has not got them."""
        c = self.config
        acct.tokens = min(c.burst, acct.tokens + (now - acct.refilled) * c.rate_per_s)
        acct.refilled = now
        if acct.tokens < tokens:
            return False
        acct.tokens -= tokens
        return True

    def penalize(self, acct, reason, now):
        """Count the reason and lower the score; True if this penalty bans the connection."""
        acct.counts[reason] += 1
        acct.score -= PENALTY.get(reason, 1.0)
        if acct.score <= self.config.ban_score and acct.banned_until <= now:
            acct.banned_until = now + self.config.ban_s
            return True
        return False

    def reward(self, acct, amount):
        acct.score = min(MAX_SCORE, acct.score + amount)

    def bind(self, acct, mid):
        """The connection speaks for member `mid` from now on."""
        acct.node = mid
        self.by_member.setdefault(mid, []).append(acct)

    def banned(self, now):
        return sum(1 for a in self.accounts.values() if a.banned_until > now)

    def rejected(self):
        """Counted reasons over all connections, the banned ones included."""
        total = Counter()
        for a in self.accounts.values():
            total.update({k: v for k, v in a.counts.items() if k not in ("ok", "duplicate")})
        return dict(total)

    def by_connection(self):
        """member id -> (worst score of its connections, the counts of all of them)."""
        out = {}
        for a in self.accounts.values():
            if a.node:
                score, counts = out.get(a.node, (0.0, Counter()))
                out[a.node] = (min(score, a.score), counts + a.counts)
        return out

    # --- members -------------------------------------------------------------------------------

    def _conduct(self, mid, now):
        c = self.conduct.get(mid)
        if c is None:
            c = self.conduct[mid] = Conduct(now)
            while len(self.conduct) > self.config.max_accounts:
                self.conduct.popitem(last=False)
        self.conduct.move_to_end(mid)
        return c

    def owe(self, mid, amount, now):
        """Add to (or, negative, pay off) the member's debt."""
        c = self._conduct(mid, now)
        c.debt = max(0.0, self.debt(mid, now) + amount)
        c.debt_at = now

    def debt(self, mid, now):
        c = self.conduct.get(mid)
        return max(0.0, c.debt - DEBT_DECAY * (now - c.debt_at)) if c else 0.0

    def serve(self, mid, amount, now):
        """The member did us a service worth `amount` (1 = a record delivered first)."""
        c = self._conduct(mid, now)
        c.service = self.service(mid, now) + amount
        c.service_at = now

    def service(self, mid, now):
        c = self.conduct.get(mid)
        return c.service * math.pow(0.5, (now - c.service_at) / SERVICE_HALF_LIFE_S) if c else 0.0

    def served(self, mid, now):
        return self.service(mid, now) >= SERVED

    def vet(self, mid, now):
        """The member served a record its digest said it held."""
        self._conduct(mid, now).vetted_at = now

    def first_seen(self, mid, now):
        """When the member first became known here (a leave and a rejoin do not make it new)."""
        return self._conduct(mid, now).first

    def ask(self, mid, now):
        """We asked the member for a record it must hold (a possession check)."""
        self._conduct(mid, now).asked_at = now

    def asked(self, mid, now):
        """Whether a possession check asked it within the last half-life."""
        c = self.conduct.get(mid)
        return c is not None and c.asked_at is not None and now - c.asked_at < SERVICE_HALF_LIFE_S

    def vetted(self, mid, now):
        c = self.conduct.get(mid)
        return c is not None and c.vetted_at is not None and now - c.vetted_at < SERVICE_HALF_LIFE_S

    def standing(self, mid, now):
        """The worst score of the member's connections (one bad connection taints the member),
        less its debt."""
        return min((a.score for a in self.by_member.get(mid, ())), default=0.0) - self.debt(mid, now)
