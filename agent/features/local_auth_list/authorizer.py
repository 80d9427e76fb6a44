"""Authorization without the CSMS: the Local Authorization List, the Authorization Cache
and the offline rules of OCPP 1.6 (sections 3.5, 5.15, 9.1 and 9.2).

:class:`Authorizer` holds no state of its own: the list and the cache live in the store
(SQLite), so both survive a restart. It never sends anything; the charge point asks it

- :meth:`~Authorizer.pre_authorized` before sending an Authorize.req (LocalPreAuthorize:
  an idTag the list or the cache holds as Accepted starts at once);
- :meth:`~Authorizer.offline` when the CSMS cannot be asked (LocalAuthorizeOffline for a
  known idTag, AllowOfflineTxForUnknownId for an unknown one);
- :meth:`~Authorizer.remember` with every idTagInfo the CSMS sends (Authorize.conf,
  StartTransaction.conf, StopTransaction.conf) -- the cache, when enabled.

The list takes precedence over the cache (section 3.5.3), and an idTag on the list is not
cached. idTags compare case-insensitively (IdToken is a CiString20). An entry whose
expiryDate has passed counts as Expired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.chargepoint.model import ID_TAG_STATUSES
from agent.core.config_keys import ConfigKeys
from agent.core.timefmt import parse_time
from agent.store import AuthEntry, StagedLocalList, StagingFailed, Store

log = logging.getLogger("evcp.auth")

ACCEPTED = "Accepted"
INVALID = "Invalid"
EXPIRED = "Expired"

#: Work in one step of a SendLocalList applied in steps (seconds): the event loop runs
#: between steps (:meth:`Authorizer.send_local_list_in_steps`).
STEP_S = 0.002
#: Entries checked (then written) in the first step; the next steps take as many as fit
#: in :data:`STEP_S`, within these bounds.
FIRST_STEP_ENTRIES = 500
MIN_STEP_ENTRIES, MAX_STEP_ENTRIES = 100, 20_000
#: A Differential update of more entries than this writes the whole list afresh, the other
#: entries copied in steps first (:meth:`agent.store.StagedLocalList.carry`): its last step
#: is then about half as long as changing that many entries in place.
REBUILD_ENTRIES = 1000


@dataclass(frozen=True, slots=True)
class Decision:
    """An authorization outcome: the idTagInfo status, the parent idTag, and where it
    came from (``"csms"``, ``"list"``, ``"cache"`` or ``"unknown"``)."""

    status: str
    parent_id_tag: str | None = None
    source: str = "csms"

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED


class Authorizer:
    def __init__(self, *, store: Store, keys: ConfigKeys, now: Callable[[], datetime]) -> None:
        self.store = store
        self.keys = keys
        self.now = now
        #: A SendLocalList is being applied (in steps).
        self._updating = False

    # ------------------------------------------------------------------ decisions
    def local(self, id_tag: str) -> Decision | None:
        """What the charger knows of ``id_tag`` by itself: the list first, then the cache."""
        if self.keys.get_bool("LocalAuthListEnabled"):
            entry = self.store.local_list_get(id_tag)
            if entry is not None:
                return self._decide(entry, "list")
        if self.keys.get_bool("AuthorizationCacheEnabled"):
            cached = self.store.cache_get(id_tag)
            if cached is not None:
                return self._decide(AuthEntry(*cached), "cache")
        return None

    def pre_authorized(self, id_tag: str) -> Decision | None:
        """LocalPreAuthorize: an idTag known locally as Accepted needs no Authorize.req."""
        if not self.keys.get_bool("LocalPreAuthorize"):
            return None
        known = self.local(id_tag)
        return known if known is not None and known.accepted else None

    def offline(self, id_tag: str) -> Decision:
        """The decision when the CSMS cannot be asked."""
        known = self.local(id_tag)
        if known is not None:
            if self.keys.get_bool("LocalAuthorizeOffline"):
                return known
            return Decision(INVALID, known.parent_id_tag, known.source)
        if self.keys.get_bool("AllowOfflineTxForUnknownId"):
            return Decision(ACCEPTED, None, "unknown")
        return Decision(INVALID, None, "unknown")

    def parent_of(self, id_tag: str) -> str | None:
        """The parent idTag known locally for ``id_tag`` (for reservations), if any."""
        known = self.local(id_tag)
        return known.parent_id_tag if known is not None else None

    def _decide(self, entry: AuthEntry, source: str) -> Decision:
        status = entry.status
        if entry.expiry:
            try:
                if parse_time(entry.expiry) <= self.now():
                    status = EXPIRED
            except ValueError:
                log.warning("unreadable expiryDate %r in the %s: treated as expired",
                            entry.expiry, source)  # fmt: skip
                status = EXPIRED
        return Decision(status, entry.parent_id_tag, source)

    # ------------------------------------------------------------------ cache
    def remember(self, id_tag: str, info: Any) -> None:
        """Cache an idTagInfo from the CSMS (not for an idTag on the local list)."""
        if not isinstance(info, dict) or info.get("status") not in ID_TAG_STATUSES:
            return  # nothing usable (an answer that broke the schema)
        if not self.keys.get_bool("AuthorizationCacheEnabled"):
            return
        listed = self.store.local_list_get(id_tag) is not None
        if listed and self.keys.get_bool("LocalAuthListEnabled"):
            return  # the list decides for this idTag (a disabled list decides nothing)
        expiry, parent = info.get("expiryDate"), info.get("parentIdTag")
        self.store.cache_put(
            id_tag,
            str(info["status"]),
            expiry if isinstance(expiry, str) else None,
            parent if isinstance(parent, str) else None,
        )

    def clear_cache(self) -> str:
        self.store.cache_clear()
        log.info("authorization cache cleared")
        return "Accepted"

    # ------------------------------------------------------------------ local list
    def list_version(self) -> int:
        """GetLocalListVersion: the version of the list; 0 when it is empty (OCPP 1.6
        5.10: 0 says "empty", also after a Full update with no entries)."""
        if self.store.local_list_size() == 0:
            return 0
        return self.store.local_list_version()

    def send_local_list(self, version: int, update_type: str, entries: list[dict[str, Any]]) -> str:
        """SendLocalList: Accepted, Failed or VersionMismatch.

        ``entries`` are camelCase AuthorizationData. A Full update replaces the list; a
        Differential one adds or replaces the entries with an idTagInfo and removes those
        without, and must carry a version above the current one (VersionMismatch
        otherwise). Failed: more entries than SendLocalListMaxLength, a list longer than
        LocalAuthListMaxLength, an idTag given twice, an invalid entry or, in a Full
        update, an entry without idTagInfo; nothing changes.

        All in one go: :meth:`send_local_list_in_steps` is the same for the event loop.
        """
        steps = self._send_local_list(version, update_type, entries)
        try:
            while True:
                next(steps)
        except StopIteration as done:
            return str(done.value)

    async def send_local_list_in_steps(
        self, version: int, update_type: str, entries: list[dict[str, Any]]
    ) -> str:
        """:meth:`send_local_list`, in steps of about :data:`STEP_S` seconds of work, the
        event loop running in between: a list of 10,000 entries takes tens of
        milliseconds to check and write. Until the last step's commit every lookup (a
        swipe, GetLocalListVersion) sees the list as it was, and a refused list leaves it
        so (:class:`~agent.store.StagedLocalList`). Cancelled, it changes nothing (the commit
        is the last step: the answer follows it without a step in between)."""
        steps = self._send_local_list(version, update_type, entries)
        try:
            while True:
                next(steps)
                await asyncio.sleep(0)
        except StopIteration as done:
            return str(done.value)
        finally:
            steps.close()  # (cancelled between steps: the staged entries are dropped)

    def _send_local_list(
        self, version: int, update_type: str, entries: list[dict[str, Any]]
    ) -> Generator[None, None, str]:
        """SendLocalList, yielding between steps (see :meth:`send_local_list`)."""
        limit = self.keys.get_int("SendLocalListMaxLength")
        if len(entries) > limit:
            log.warning("SendLocalList with %d entries refused: SendLocalListMaxLength is %d",
                        len(entries), limit)  # fmt: skip
            return "Failed"
        full = update_type == "Full"
        current = self.store.local_list_version()
        if not full and version <= current:
            log.warning("differential SendLocalList version %d refused: the list is at %d",
                        version, current)  # fmt: skip
            return "VersionMismatch"
        if self._updating:  # (the adapter handles one CALL at a time: not reached)
            log.warning("SendLocalList refused: another one is being applied")
            return "Failed"
        maximum = self.keys.get_int("LocalAuthListMaxLength")
        self._updating = True
        staged: StagedLocalList | None = None
        try:
            staged = self.store.local_list_stage(full=full)
            seen: set[str] = set()
            count, first = FIRST_STEP_ENTRIES, 0
            while first < len(entries):
                started = time.monotonic()
                chunk: list[tuple[str, AuthEntry | None]] = []
                for item in entries[first : first + count]:
                    checked = _checked(item, full, seen)
                    if checked is None:
                        return "Failed"
                    chunk.append(checked)
                first += count
                checking = time.monotonic() - started
                yield
                started = time.monotonic()
                staged.add(chunk)  # (a step of its own: about as long as the checks)
                writing = time.monotonic() - started
                yield
                # As many entries in the next step as fit in STEP_S, checks or writes.
                each = max(checking, writing, 1e-6) / len(chunk)
                count = max(MIN_STEP_ENTRIES, min(int(STEP_S / each), MAX_STEP_ENTRIES))
            seen.clear()  # (the entries are all staged: no copy of them kept here)
            if not full and len(entries) > REBUILD_ENTRIES:
                rows = FIRST_STEP_ENTRIES
                while True:
                    started = time.monotonic()
                    more = staged.carry(rows)
                    yield
                    if not more:
                        break
                    each = max(time.monotonic() - started, 1e-6) / rows
                    rows = max(MIN_STEP_ENTRIES, min(int(STEP_S / each), MAX_STEP_ENTRIES))
            # No step after this commit: cancelled there, the list would be applied and
            # the CSMS never told (a Differential update sent again: VersionMismatch).
            size = staged.apply(version=version, max_size=maximum)
        except StagingFailed as exc:
            log.warning("SendLocalList failed, the list is unchanged: %s", exc)
            return "Failed"
        finally:
            if staged is not None:
                staged.close()
            self._updating = False
        if size is None:
            log.warning("SendLocalList refused: the list would exceed LocalAuthListMaxLength"
                        " (%d)", maximum)  # fmt: skip
            return "Failed"
        log.info("local authorization list %s update to version %d: %d entries",
                 update_type, version, size)  # fmt: skip
        return "Accepted"


def _checked(
    item: dict[str, Any], full: bool, seen: set[str]
) -> tuple[str, AuthEntry | None] | None:
    """One AuthorizationData of a SendLocalList as the store takes it (``None``: remove
    the idTag); None, with a log line, when it makes the update fail. ``seen``: the idTags
    before it, case-folded (this one is added)."""
    id_tag = item.get("idTag")
    if not isinstance(id_tag, str) or not 1 <= len(id_tag) <= 20:
        log.warning("SendLocalList refused: an entry without a valid idTag")
        return None
    folded = id_tag.casefold()
    if folded in seen:
        log.warning("SendLocalList refused: idTag %s given twice", id_tag)
        return None
    seen.add(folded)
    info = item.get("idTagInfo")
    if info is None:
        if full:  # required in a Full update (OCPP 1.6 7.2): not "left out"
            log.warning("SendLocalList refused: Full update without idTagInfo for"
                        " idTag %s", id_tag)  # fmt: skip
            return None
        return id_tag, None
    status, expiry = info.get("status"), info.get("expiryDate")
    if status not in ID_TAG_STATUSES:
        log.warning("SendLocalList refused: status %r for idTag %s", status, id_tag)
        return None
    if expiry is not None:
        try:
            parse_time(str(expiry))
        except ValueError:
            log.warning("SendLocalList refused: expiryDate %r", expiry)
            return None
    return id_tag, AuthEntry(status, expiry, info.get("parentIdTag"))
