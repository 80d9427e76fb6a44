"""The uplink supervisor's rules: which link is healthy, and which one carries the traffic.

Pure: no sockets, no clock, no asyncio. The service (``agent/uplink/supervisor.py``) feeds
observations in, with the time as an argument, and applies the decisions.

Health of one link is a small state machine (:data:`HEALTH_TABLE`):

* ``UNKNOWN`` (start): the first probe decides, up or down;
* ``UP``: ``failures_to_down`` failed probes in a row make it ``DOWN``;
* ``DOWN``: ``successes_to_up`` good probes in a row make it ``UP``;
* losing the carrier, the address or the interface is ``DOWN`` at once, whatever the state;
  probe results while the link is absent are ignored; when it comes back it stays ``DOWN``
  until the probes agree.

Choosing (:meth:`Uplinks.decide`):

* while the active link is healthy, it stays, unless a link of better priority (a lower
  number) has been ``UP`` for its hold time and no CALL awaits its answer (an input);
* when the active link is not healthy, the best healthy link takes over at once; with no
  healthy link, nothing moves (the traffic waits on the old path);
* at start, no link is chosen while a better link than the best healthy one has no verdict;
* a link that goes down within its hold time of coming up (or of being chosen) has flapped:
  its next hold doubles, up to ``max_hold_factor`` times ``hold_s``; one that stayed up
  longer than its hold starts again from ``hold_s``;
* :meth:`Uplinks.force` pins a healthy link (field testing) until it goes down or is released.

Probe pacing (:meth:`Uplinks.probe_delay`): every ``probe_interval_s``, except a gsm link in
a steady state (no count under way, and some link is up) is probed every
``gsm_probe_interval_s``: GSM data costs money.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

__all__ = [
    "HEALTH_TABLE",
    "Health",
    "LinkSpec",
    "LinkState",
    "Observation",
    "Rules",
    "Switch",
    "Uplinks",
]


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Observation(enum.Enum):
    PROBE_OK = "probe_ok"
    PROBE_FAILED = "probe_failed"


class Step(enum.Enum):
    """What an observation does to the counters (the table's cells)."""

    BECOME_UP = "become_up"  # at once
    BECOME_DOWN = "become_down"  # at once
    STAY_UP = "stay_up"  # clears the failure count
    COUNT_FAILURE = "count_failure"  # down when failures_to_down reached
    COUNT_SUCCESS = "count_success"  # up when successes_to_up reached
    STAY_DOWN = "stay_down"  # clears the success count


#: (health, probe result) -> step. Link presence (carrier, address) is handled apart: absent
#: is DOWN at once and probes are ignored meanwhile.
HEALTH_TABLE: dict[tuple[Health, Observation], Step] = {
    (Health.UNKNOWN, Observation.PROBE_OK): Step.BECOME_UP,
    (Health.UNKNOWN, Observation.PROBE_FAILED): Step.BECOME_DOWN,
    (Health.UP, Observation.PROBE_OK): Step.STAY_UP,
    (Health.UP, Observation.PROBE_FAILED): Step.COUNT_FAILURE,
    (Health.DOWN, Observation.PROBE_OK): Step.COUNT_SUCCESS,
    (Health.DOWN, Observation.PROBE_FAILED): Step.STAY_DOWN,
}


@dataclass(frozen=True, slots=True)
class Rules:
    hold_s: float = 60.0
    probe_interval_s: float = 2.0
    failures_to_down: int = 3
    successes_to_up: int = 3
    gsm_probe_interval_s: float = 300.0
    #: The longest hold a flapping link gets, in multiples of hold_s.
    max_hold_factor: int = 16

    def __post_init__(self) -> None:
        if self.hold_s <= 0 or self.probe_interval_s <= 0 or self.gsm_probe_interval_s <= 0:
            raise ValueError("hold_s and the probe intervals must be positive")
        if self.failures_to_down < 1 or self.successes_to_up < 1 or self.max_hold_factor < 1:
            raise ValueError("failures_to_down, successes_to_up, max_hold_factor must be >= 1")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    name: str
    kind: str  # "wifi", "gsm", "ethernet"
    priority: int  # lower is preferred


@dataclass(slots=True)
class LinkState:
    spec: LinkSpec
    health: Health = Health.UNKNOWN
    #: Carrier and an address (netlink). None: not observed yet.
    present: bool | None = None
    failures: int = 0
    successes: int = 0
    #: When the link last became UP / DOWN (None: never).
    up_since: float | None = None
    down_since: float | None = None
    #: When the link was last chosen as the active one.
    chosen_at: float | None = None
    #: Times in a row it went down within its hold: the next hold is hold_s * 2**flaps.
    flaps: int = 0
    #: Why it is in its health state ("3 probes failed: timed out", "carrier lost"...).
    reason: str = "not probed yet"

    @property
    def healthy(self) -> bool:
        return self.health is Health.UP


@dataclass(frozen=True, slots=True)
class Switch:
    """A decision: make ``to`` the active link (``from_`` was, or None at start)."""

    to: str
    from_: str | None
    reason: str
    forced: bool = False


@dataclass(slots=True)
class Uplinks:
    """The links and the active choice. Feed observations, then call :meth:`decide`."""

    specs: tuple[LinkSpec, ...]
    rules: Rules = field(default_factory=Rules)
    links: dict[str, LinkState] = field(init=False)
    active: str | None = field(init=False, default=None)
    forced: str | None = field(init=False, default=None)
    #: True while a move back is due but waits for a CALL's answer.
    waiting_for_call: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError("at least one link")
        names = [s.name for s in self.specs]
        priorities = [s.priority for s in self.specs]
        if len(set(names)) != len(names) or len(set(priorities)) != len(priorities):
            raise ValueError("link names and priorities must be unique")
        ordered = sorted(self.specs, key=lambda s: s.priority)
        self.links = {s.name: LinkState(s) for s in ordered}

    # ------------------------------------------------------------------ observations

    def observe_presence(self, name: str, present: bool, now: float, why: str = "") -> None:
        """Carrier and address as netlink reports them. Losing either is down at once."""
        link = self.links[name]
        if present == link.present:
            return
        link.present = present
        if not present:
            self._to_down(link, now, why or "carrier or address lost")
        else:
            link.failures = link.successes = 0  # probes decide from here

    def observe_probe(self, name: str, ok: bool, now: float, detail: str = "") -> None:
        """One probe's result on that link (ignored while the link is absent)."""
        link = self.links[name]
        if link.present is False:
            return
        observation = Observation.PROBE_OK if ok else Observation.PROBE_FAILED
        step = HEALTH_TABLE[(link.health, observation)]
        if step is Step.BECOME_UP:
            self._to_up(link, now, "probe succeeded")
        elif step is Step.BECOME_DOWN:
            self._to_down(link, now, f"probe failed: {detail}" if detail else "probe failed")
        elif step is Step.STAY_UP:
            link.failures = 0
        elif step is Step.STAY_DOWN:
            link.successes = 0
            if detail:
                link.reason = f"probe failed: {detail}"
        elif step is Step.COUNT_FAILURE:
            link.failures += 1
            if link.failures >= self.rules.failures_to_down:
                why = f"{link.failures} probes failed"
                self._to_down(link, now, f"{why}: {detail}" if detail else why)
        else:  # COUNT_SUCCESS
            link.successes += 1
            if link.successes >= self.rules.successes_to_up:
                self._to_up(link, now, f"{link.successes} probes succeeded")

    def _to_up(self, link: LinkState, now: float, why: str) -> None:
        link.health = Health.UP
        link.up_since = now
        link.failures = link.successes = 0
        link.reason = why

    def _to_down(self, link: LinkState, now: float, why: str) -> None:
        link.reason = why
        link.failures = link.successes = 0
        if link.health is Health.DOWN:
            return
        if link.health is Health.UP:
            since = max(t for t in (link.up_since, link.chosen_at) if t is not None)
            link.flaps = link.flaps + 1 if now - since < self.hold_of(link.spec.name) else 0
        link.health = Health.DOWN
        link.down_since = now
        if self.forced == link.spec.name:
            self.forced = None

    # ------------------------------------------------------------------ queries

    def hold_of(self, name: str) -> float:
        """The time this link must stay up before the agent moves back to it."""
        factor: int = min(2 ** self.links[name].flaps, self.rules.max_hold_factor)
        return self.rules.hold_s * factor

    def probe_delay(self, name: str) -> float:
        """Seconds until this link's next probe."""
        link = self.links[name]
        if link.spec.kind != "gsm":
            return self.rules.probe_interval_s
        counting = link.health is Health.UNKNOWN or link.failures > 0 or link.successes > 0
        others_up = any(o.healthy for o in self.links.values() if o is not link)
        if counting or (not link.healthy and not others_up):
            return self.rules.probe_interval_s
        return max(self.rules.gsm_probe_interval_s, self.rules.probe_interval_s)

    def next_move_back_at(self) -> float | None:
        """When a move back to a better link becomes due (None: none is coming), so the
        service knows when to call :meth:`decide` again without an observation."""
        current = self.links.get(self.active) if self.active else None
        if current is None or not current.healthy or self.forced:
            return None
        due = [
            link.up_since + self.hold_of(name)
            for name, link in self.links.items()
            if link.healthy
            and link.up_since is not None
            and link.spec.priority < current.spec.priority
        ]
        return min(due) if due else None

    # ------------------------------------------------------------------ decisions

    def decide(self, now: float, call_in_flight: bool = False) -> Switch | None:
        """The switch to make now, if any; the choice is recorded as made."""
        self.waiting_for_call = False
        healthy = [link for link in self.links.values() if link.healthy]  # by priority
        current = self.links.get(self.active) if self.active else None
        if current is not None and current.healthy:
            if self.forced == current.spec.name:
                return None
            for link in healthy:
                if link.spec.priority >= current.spec.priority:
                    break
                assert link.up_since is not None
                up_for = now - link.up_since
                hold = self.hold_of(link.spec.name)
                if up_for + 1e-9 >= hold:
                    if call_in_flight:
                        self.waiting_for_call = True
                        return None
                    reason = f"{link.spec.name} healthy for {up_for:.0f} s (hold {hold:.0f} s)"
                    return self._choose(link, now, reason)
            return None
        if not healthy:
            return None
        best = healthy[0]
        if current is None:
            undecided = [
                link
                for link in self.links.values()
                if link.health is Health.UNKNOWN and link.spec.priority < best.spec.priority
            ]
            if undecided:
                return None  # at start: wait for the better link's first verdict
            return self._choose(best, now, "start")
        return self._choose(best, now, f"{current.spec.name} down ({current.reason})")

    def force(self, name: str, now: float) -> Switch | None:
        """Pin ``name`` (field testing). ValueError if unknown or not healthy; None if it is
        already active (it is pinned all the same)."""
        if name not in self.links:
            raise ValueError(f"no link named {name!r} (links: {', '.join(self.links)})")
        link = self.links[name]
        if not link.healthy:
            raise ValueError(f"link {name!r} is not healthy ({link.reason})")
        self.forced = name
        if self.active == name:
            return None
        switch = self._choose(link, now, "forced by the operator")
        return Switch(switch.to, switch.from_, switch.reason, forced=True)

    def release(self) -> None:
        """End a :meth:`force`: the normal rules apply from the next :meth:`decide`."""
        self.forced = None

    def _choose(self, link: LinkState, now: float, reason: str) -> Switch:
        previous = self.active
        self.active = link.spec.name
        link.chosen_at = now
        return Switch(link.spec.name, previous, reason)


def seconds_until(now: float, at: float | None) -> float:
    """``at - now`` clamped at 0, or ``inf`` for None."""
    return math.inf if at is None else max(0.0, at - now)
