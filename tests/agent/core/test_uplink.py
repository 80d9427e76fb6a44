"""The uplink rules, as scripts: (time, event) lines and the active link expected after each.

Events: ``"ok wifi"`` / ``"fail wifi"`` (a probe), ``"lost wifi"`` / ``"back wifi"``
(carrier and address per netlink), ``"decide"``, ``"decide call"`` (a CALL awaits its
answer), ``"force gsm"``. After every line the test calls decide (without a CALL in flight,
unless the line says so) and checks the active link, so each row is what a user would see:
which path the charger uses at that moment.
"""

from __future__ import annotations

import pytest

from agent.core.uplink import HEALTH_TABLE, Health, LinkSpec, Observation, Rules, Uplinks

WIFI = LinkSpec("wifi", "wifi", 1)
GSM = LinkSpec("gsm", "gsm", 2)
RULES = Rules(
    hold_s=10, probe_interval_s=1, failures_to_down=3, successes_to_up=2, gsm_probe_interval_s=60
)

Script = list[tuple[float, str, str | None]]


def run(script: Script, rules: Rules = RULES) -> Uplinks:
    up = Uplinks((WIFI, GSM), rules)
    for line, (now, event, expected_active) in enumerate(script):
        verb, _, name = event.partition(" ")
        call = False
        if verb == "ok":
            up.observe_probe(name, True, now)
        elif verb == "fail":
            up.observe_probe(name, False, now, "timed out")
        elif verb == "lost":
            up.observe_presence(name, False, now, "carrier lost")
        elif verb == "back":
            up.observe_presence(name, True, now)
        elif verb == "decide":
            call = name == "call"
        elif verb == "force":
            up.force(name, now)
        else:
            raise AssertionError(event)
        up.decide(now, call_in_flight=call)
        assert up.active == expected_active, (line, now, event, up.links)
    return up


def start_both_up(t: float = 0) -> Script:
    return [
        (t, "back wifi", None),
        (t, "back gsm", None),
        (t, "ok gsm", None),  # gsm answers first: still wait for wifi's verdict
        (t + 0.1, "ok wifi", "wifi"),
    ]


def test_the_table_covers_every_state_and_probe_result() -> None:
    assert set(HEALTH_TABLE) == {(h, o) for h in Health for o in Observation}


def test_start_prefers_the_better_link_even_if_it_answers_second() -> None:
    run(start_both_up())


def test_start_over_gsm_when_wifi_has_no_way_to_the_csms() -> None:
    run([(0, "back wifi", None), (0, "ok gsm", None), (0.2, "fail wifi", "gsm")])


def test_start_waits_for_no_link_absent_from_netlink() -> None:
    run([(0, "lost wifi", None), (0, "ok gsm", "gsm")])


def test_carrier_loss_moves_at_once() -> None:
    up = run([*start_both_up(), (5, "lost wifi", "gsm")])
    assert up.links["wifi"].reason == "carrier lost"


def test_silent_loss_needs_failures_to_down_probes_in_a_row() -> None:
    run(
        [
            *start_both_up(),
            (1, "fail wifi", "wifi"),
            (2, "fail wifi", "wifi"),
            (3, "ok wifi", "wifi"),  # the count starts again
            (4, "fail wifi", "wifi"),
            (5, "fail wifi", "wifi"),
            (6, "fail wifi", "gsm"),
        ]
    )


def test_moves_back_only_after_the_hold_time() -> None:
    run(
        [
            *start_both_up(),
            (50, "lost wifi", "gsm"),  # up longer than its hold: not a flap
            (60, "back wifi", "gsm"),
            (61, "ok wifi", "gsm"),
            (62, "ok wifi", "gsm"),  # up from t=62
            (71, "decide", "gsm"),
            (72, "decide", "wifi"),  # 10 s hold
        ]
    )


def test_no_move_back_while_a_call_awaits_its_answer() -> None:
    up = run(
        [
            *start_both_up(),
            (50, "lost wifi", "gsm"),
            (51, "back wifi", "gsm"),
            (52, "ok wifi", "gsm"),
            (53, "ok wifi", "gsm"),
            (63, "decide call", "gsm"),
        ]
    )
    assert up.waiting_for_call
    up.decide(64, call_in_flight=False)
    assert up.active == "wifi"
    assert not up.waiting_for_call


def test_a_dead_active_link_is_left_even_with_a_call_in_flight() -> None:
    up = run([*start_both_up()])
    up.observe_presence("wifi", False, 3)
    assert up.decide(3, call_in_flight=True) is not None
    assert up.active == "gsm"


def test_both_down_no_switch_then_whichever_returns_first() -> None:
    run(
        [
            *start_both_up(),
            (50, "lost wifi", "gsm"),
            (51, "lost gsm", "gsm"),  # nowhere to go: stays
            (52, "back gsm", "gsm"),
            (53, "ok gsm", "gsm"),
            (54, "ok gsm", "gsm"),
            (55, "back wifi", "gsm"),
            (56, "ok wifi", "gsm"),
            (57, "ok wifi", "gsm"),
            (67, "decide", "wifi"),
        ]
    )
    up = run([*start_both_up(), (5, "lost gsm", "wifi"), (6, "lost wifi", "wifi")])
    up.observe_presence("wifi", True, 7)
    for t in (8, 9):
        up.observe_probe("wifi", True, t)
    assert up.decide(9) is None  # wifi came back while active: nothing to switch
    assert up.active == "wifi"
    assert up.links["wifi"].healthy


def test_a_flapping_link_waits_longer_each_time() -> None:
    script: Script = [*start_both_up(), (2, "lost wifi", "gsm")]
    # wifi comes back and drops every 4 s: each time within its hold, so it never wins
    t = 2.0
    for _ in range(4):
        script += [
            (t + 1, "back wifi", "gsm"),
            (t + 2, "ok wifi", "gsm"),
            (t + 3, "ok wifi", "gsm"),
            (t + 4, "lost wifi", "gsm"),
        ]
        t += 4
    up = run(script)
    assert up.links["wifi"].flaps == 5  # the first drop too: 2 s after being chosen
    assert up.hold_of("wifi") == 10 * 16  # capped
    # it settles: the move back waits for the longer hold, not hold_s
    up.observe_presence("wifi", True, t + 1)
    up.observe_probe("wifi", True, t + 2)
    up.observe_probe("wifi", True, t + 3)
    assert up.decide(t + 3 + 10) is None
    assert up.next_move_back_at() == t + 3 + 160
    assert up.decide(t + 3 + 160) is not None
    assert up.active == "wifi"


def test_a_link_that_stayed_up_past_its_hold_starts_from_hold_s_again() -> None:
    up = run([*start_both_up(), (2, "lost wifi", "gsm")])
    assert up.links["wifi"].flaps == 1
    up.observe_presence("wifi", True, 3)
    up.observe_probe("wifi", True, 4)
    up.observe_probe("wifi", True, 5)
    up.decide(25)
    assert up.active == "wifi"
    up.observe_presence("wifi", False, 100)
    assert up.links["wifi"].flaps == 0
    assert up.hold_of("wifi") == 10


def test_force_pins_a_healthy_link_until_it_goes_down() -> None:
    up = run([*start_both_up(), (1, "force gsm", "gsm"), (100, "decide", "gsm")])
    with pytest.raises(ValueError, match="no link named 'lte'"):
        up.force("lte", 101)
    up.observe_presence("gsm", False, 102)
    up.decide(102)
    assert up.active == "wifi"
    assert up.forced is None
    with pytest.raises(ValueError, match="'gsm' is not healthy"):
        up.force("gsm", 103)


def test_release_lets_the_rules_move_back() -> None:
    up = run([*start_both_up(), (1, "force gsm", "gsm")])
    up.release()
    assert up.decide(11) is not None
    assert up.active == "wifi"


def test_switch_reasons_say_what_happened() -> None:
    up = Uplinks((WIFI, GSM), RULES)
    up.observe_probe("wifi", True, 0)
    first = up.decide(0)
    assert first is not None
    assert (first.to, first.from_, first.reason) == ("wifi", None, "start")
    up.observe_probe("gsm", True, 0)
    for t in (1, 2, 3):
        up.observe_probe("wifi", False, t, "connect timed out")
    switch = up.decide(3)
    assert switch is not None
    assert (switch.to, switch.from_) == ("gsm", "wifi")
    assert switch.reason == "wifi down (3 probes failed: connect timed out)"


@pytest.mark.parametrize(
    ("events", "delay"),
    [
        ([], 1),  # unknown: probe at once
        (["ok wifi", "ok gsm"], 60),  # steady standby: sparse
        (["ok wifi", "ok gsm", "fail gsm"], 1),  # confirming a failure: fast
        (["ok wifi", "fail gsm"], 60),  # down and wifi fine: sparse
        (["ok wifi", "fail gsm", "ok gsm"], 1),  # confirming a recovery: fast
        (["lost wifi", "fail gsm"], 1),  # nothing else up: look for a way back fast
        (["lost wifi", "ok gsm"], 60),  # gsm active and steady: sparse
    ],
)
def test_gsm_is_probed_sparsely_in_a_steady_state(events: list[str], delay: float) -> None:
    up = Uplinks((WIFI, GSM), RULES)
    for event in events:
        verb, name = event.split()
        if verb == "lost":
            up.observe_presence(name, False, 0)
        else:
            up.observe_probe(name, verb == "ok", 0)
    assert up.probe_delay("gsm") == delay
    assert up.probe_delay("wifi") == 1


def test_probes_while_absent_are_ignored() -> None:
    up = Uplinks((WIFI, GSM), RULES)
    up.observe_presence("wifi", False, 0)
    up.observe_probe("wifi", True, 1)
    up.observe_probe("wifi", True, 2)
    assert up.links["wifi"].health is Health.DOWN


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        Uplinks((WIFI, LinkSpec("wifi", "gsm", 2)))
    with pytest.raises(ValueError, match="unique"):
        Uplinks((WIFI, LinkSpec("gsm", "gsm", 1)))
    with pytest.raises(ValueError, match="positive"):
        Rules(hold_s=0)
