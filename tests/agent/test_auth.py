"""Authorization without the CSMS (agent.features.local_auth_list): the local list, the cache and the offline
rules, on a real store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.features.local_auth_list.authorizer import Authorizer, Decision
from agent.features.registry import ConfigKeys
from agent.store import Store

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ts(delta_s: float) -> str:
    return (NOW + timedelta(seconds=delta_s)).isoformat().replace("+00:00", "Z")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path)
    yield s
    s.close()


def make(store: Store, **keys: object) -> Authorizer:
    return Authorizer(store=store, keys=ConfigKeys(overrides=keys), now=lambda: NOW)


def entry(tag: str, status: str | None = "Accepted", **info: Any) -> dict[str, Any]:
    if status is None:
        return {"idTag": tag}
    return {"idTag": tag, "idTagInfo": {"status": status, **info}}


# ---------------------------------------------------------------------- offline rules
def test_unknown_tag_offline_follows_allow_offline_tx_for_unknown_id(store: Store) -> None:
    assert make(store).offline("NOBODY") == Decision("Invalid", None, "unknown")
    allowed = make(store, AllowOfflineTxForUnknownId=True).offline("NOBODY")
    assert allowed == Decision("Accepted", None, "unknown")


def test_cached_tag_offline_follows_local_authorize_offline(store: Store) -> None:
    auth = make(store)
    auth.remember("CACHED", {"status": "Accepted", "parentIdTag": "FLEET"})
    assert auth.offline("CACHED") == Decision("Accepted", "FLEET", "cache")
    # Known but not to be trusted offline: refused, not treated as unknown.
    strict = make(store, LocalAuthorizeOffline=False, AllowOfflineTxForUnknownId=True)
    assert strict.offline("CACHED").status == "Invalid"
    auth.remember("BLOCKED", {"status": "Blocked"})
    assert make(store, AllowOfflineTxForUnknownId=True).offline("BLOCKED").status == "Blocked"


def test_cache_entry_expires(store: Store) -> None:
    auth = make(store)
    auth.remember("SOON", {"status": "Accepted", "expiryDate": ts(-1)})
    auth.remember("LATER", {"status": "Accepted", "expiryDate": ts(3600)})
    assert auth.offline("SOON").status == "Expired"
    assert auth.offline("LATER").status == "Accepted"
    assert auth.pre_authorized("SOON") is None


def test_cache_disabled_neither_remembers_nor_answers(store: Store) -> None:
    make(store).remember("OLD", {"status": "Accepted"})
    off = make(store, AuthorizationCacheEnabled=False, AllowOfflineTxForUnknownId=True)
    off.remember("NEW", {"status": "Blocked"})
    assert store.cache_get("NEW") is None
    assert off.offline("OLD").source == "unknown"  # the cache is not consulted


def test_clear_cache(store: Store) -> None:
    auth = make(store)
    auth.remember("A", {"status": "Accepted"})
    assert auth.clear_cache() == "Accepted"
    assert auth.offline("A").source == "unknown"


def test_cache_is_bounded_dropping_refused_then_oldest(store: Store) -> None:
    store.cache_max = 3
    auth = make(store)
    auth.remember("OLDEST", {"status": "Accepted"})
    auth.remember("BLOCKED", {"status": "Blocked"})
    auth.remember("B", {"status": "Accepted"})
    auth.remember("C", {"status": "Accepted"})  # BLOCKED goes first
    assert store.cache_get("BLOCKED") is None
    auth.remember("D", {"status": "Accepted"})  # then the oldest
    assert store.cache_get("OLDEST") is None
    assert [store.cache_get(t) is not None for t in ("B", "C", "D")] == [True] * 3


def test_pre_authorize_only_when_enabled_and_accepted(store: Store) -> None:
    make(store).remember("KNOWN", {"status": "Accepted"})
    assert make(store).pre_authorized("KNOWN") is None
    assert make(store, LocalPreAuthorize=True).pre_authorized("KNOWN") == Decision(
        "Accepted", None, "cache"
    )
    make(store).remember("BAD", {"status": "Invalid"})
    assert make(store, LocalPreAuthorize=True).pre_authorized("BAD") is None


def test_tags_compare_case_insensitively(store: Store) -> None:
    auth = make(store)
    auth.remember("abc123", {"status": "Accepted"})
    auth.remember("ABC123", {"status": "Blocked"})  # the same idTag: replaces
    assert auth.offline("Abc123").status == "Blocked"
    assert auth.send_local_list(1, "Full", [entry("list-tag")]) == "Accepted"
    assert auth.offline("LIST-TAG").source == "list"


# ---------------------------------------------------------------------- local list
def test_local_list_takes_precedence_and_is_not_cached(store: Store) -> None:
    auth = make(store)
    auth.remember("TAG", {"status": "Accepted"})
    assert auth.send_local_list(1, "Full", [entry("TAG", "Blocked")]) == "Accepted"
    assert auth.offline("TAG") == Decision("Blocked", None, "list")
    auth.remember("TAG", {"status": "Accepted"})  # from the CSMS: the list is not overridden
    assert auth.offline("TAG").status == "Blocked"
    # Disabled, the list is ignored (the cache answers).
    assert make(store, LocalAuthListEnabled=False).offline("TAG") == Decision(
        "Accepted", None, "cache"
    )


def test_send_local_list_full_and_differential(store: Store) -> None:
    auth = make(store)
    assert auth.list_version() == 0
    # idTagInfo is required in a Full update: an entry without it fails the whole update.
    result = auth.send_local_list(
        5, "Full", [entry("A"), entry("B", parentIdTag="P"), entry("GONE", None)]
    )
    assert result == "Failed" and auth.list_version() == 0
    result = auth.send_local_list(5, "Full", [entry("A"), entry("B", parentIdTag="P")])
    assert result == "Accepted"
    assert auth.list_version() == 5
    assert sorted(store.local_list_entries()) == ["A", "B"]
    assert auth.offline("B") == Decision("Accepted", "P", "list")
    # Differential: versions must grow.
    assert auth.send_local_list(5, "Differential", [entry("C")]) == "VersionMismatch"
    assert auth.send_local_list(4, "Differential", [entry("C")]) == "VersionMismatch"
    diff = [entry("C", expiryDate=ts(60)), entry("A", None), entry("B", "Blocked")]
    assert auth.send_local_list(6, "Differential", diff) == "Accepted"
    assert sorted(store.local_list_entries()) == ["B", "C"]
    assert auth.offline("B").status == "Blocked"
    assert auth.list_version() == 6
    # Full with an empty list clears it; an empty list is version 0 (OCPP 1.6 5.10).
    assert auth.send_local_list(2, "Full", []) == "Accepted"
    assert store.local_list_entries() == {}
    assert auth.list_version() == 0


def test_send_local_list_failures_change_nothing(store: Store) -> None:
    auth = make(store, SendLocalListMaxLength=3, LocalAuthListMaxLength=4)
    assert auth.send_local_list(1, "Full", [entry(t) for t in "ABC"]) == "Accepted"
    before = store.local_list_entries()
    cases: list[tuple[int, str, list[dict[str, Any]]]] = [
        (2, "Full", [entry(t) for t in "DEFG"]),  # more than SendLocalListMaxLength
        (2, "Differential", [entry("D"), entry("E")]),  # the list would exceed 4
        (2, "Full", [entry("D"), entry("d")]),  # the same idTag twice
        (2, "Full", [entry("D", "Maybe")]),  # not an idTag status
        (2, "Full", [entry("D", expiryDate="tomorrow")]),
        (2, "Full", [{"idTag": ""}]),
    ]
    for version, kind, items in cases:
        assert auth.send_local_list(version, kind, items) == "Failed", items
    assert store.local_list_entries() == before
    assert auth.list_version() == 1
    assert auth.send_local_list(2, "Differential", [entry("D"), entry("A", None)]) == "Accepted"


def test_local_list_persists(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    make(store).send_local_list(7, "Full", [entry("KEEP", parentIdTag="P", expiryDate=ts(60))])
    store.close()
    store = Store.open(tmp_path)
    try:
        auth = make(store)
        assert auth.list_version() == 7
        assert auth.offline("KEEP") == Decision("Accepted", "P", "list")
    finally:
        store.close()
