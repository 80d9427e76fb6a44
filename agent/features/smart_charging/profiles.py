"""The charge point's installed charging profiles (OCPP 1.6 Smart Charging).

:class:`ChargingProfiles` owns the list of installed profiles: it checks a new profile
against the Smart Charging keys (ChargeProfileMaxStackLevel,
ChargingScheduleAllowedChargingRateUnit, ChargingScheduleMaxPeriods,
MaxChargingProfilesInstalled) and the charge point's state, applies the replacement rule,
persists every change through the store before answering, clears, and computes limits and
composite schedules with :mod:`agent.core.smart_charging`. It sends nothing and commands no
hardware: the charge point (:mod:`agent.chargepoint`) asks it for limits and actuates.

Replacement (OCPP 1.6 section 5.16.3 and errata): a new profile replaces an installed one
with the same chargingProfileId, or with the same chargingProfilePurpose, stackLevel and
connector. Validation happens before anything changes: a refused profile leaves the
installed set, the store and the limit untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from agent.core import smart_charging as sc
from agent.core.config_keys import ConfigKeys
from agent.core.timefmt import iso
from agent.store import Store
from drivers.base import IEC61851_MIN_CURRENT_A

log = logging.getLogger("evcp.charging")

ACCEPTED = "Accepted"
REJECTED = "Rejected"
UNKNOWN = "Unknown"

#: The most periods a GetCompositeSchedule answer carries; a longer schedule is cut there
#: (its duration says where): it bounds the work and the message.
MAX_COMPOSITE_PERIODS = 1000

#: ChargingScheduleAllowedChargingRateUnit items -> chargingRateUnit.
UNIT_OF_KEY = {"Current": "A", "Power": "W"}


def _anchored(body: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A ChargePointMaxProfile that counts from nothing (Relative, or Absolute without
    startSchedule: there is no transaction to count from) starts when it is received, and
    is stored so. OCPP 1.6 leaves the case open; CSMSs that switch chargers off and on with
    such a profile mean "from now", and refusing it would leave the charger on."""
    schedule = body.get("chargingSchedule")
    if body.get("chargingProfilePurpose") != sc.CP_MAX or not isinstance(schedule, dict):
        return body
    kind = body.get("chargingProfileKind")
    if kind == "Relative" or (kind == "Absolute" and schedule.get("startSchedule") is None):
        log.info("ChargePointMaxProfile %s without a start: it starts now (%s)",
                 body.get("chargingProfileId"), iso(now))  # fmt: skip
        return {
            **body,
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {**schedule, "startSchedule": iso(now)},
        }
    return body


class ChargingProfiles:
    """The installed profiles, their validation, persistence and limits."""

    def __init__(
        self,
        *,
        store: Store,
        keys: ConfigKeys,
        connector_ids: Iterable[int],
        max_current_a: float,
        voltage_v: float,
        phases: int,
    ) -> None:
        self.store = store
        self.keys = keys
        self.connector_ids = frozenset(connector_ids)
        self.max_current_a = max_current_a
        self.voltage_v = voltage_v
        self.phases = phases
        self._profiles: list[sc.Profile] = []

    @property
    def installed(self) -> tuple[sc.Profile, ...]:
        return tuple(self._profiles)

    # ------------------------------------------------------------------ persistence
    def load(self) -> None:
        """Read the stored profiles. TxProfiles are dropped: the agent ends every transaction
        a restart interrupted, and a TxProfile ends with its transaction."""
        for raw in self.store.profiles():
            try:
                profile = sc.parse_profile(int(raw["_connector"]), raw["profile"])
            except (KeyError, TypeError, ValueError) as exc:
                log.error("dropping an unreadable stored charging profile: %s", exc)
                stored_id = raw.get("profile", {}).get("chargingProfileId")
                if isinstance(stored_id, int):
                    self.store.delete_profile(stored_id)
                continue
            if profile.purpose == sc.TX:
                log.info("charging profile %d: its transaction ended (restart)", profile.profile_id)
                self.store.delete_profile(profile.profile_id)
                continue
            self._profiles.append(_parsed_only(profile))
        if self._profiles:
            log.info("%d charging profile(s) reloaded", len(self._profiles))

    def _put(self, profile: sc.Profile) -> None:
        self.store.put_profile(
            profile.profile_id,
            profile.connector_id,
            {"_connector": profile.connector_id, "profile": profile.body},
        )

    # ------------------------------------------------------------------ SetChargingProfile
    def problem(self, p: sc.Profile, tx: sc.Tx | None, *, need_tx: bool = True) -> str | None:
        """Why ``p`` cannot be installed now (None: it can). ``tx`` is the transaction on
        ``p``'s connector; ``need_tx`` False checks a RemoteStartTransaction's profile before
        its transaction exists."""
        if p.connector_id != 0 and p.connector_id not in self.connector_ids:
            return f"no connector {p.connector_id}"
        max_level = self.keys.get_int("ChargeProfileMaxStackLevel")
        if p.stack_level > max_level:
            return f"stackLevel {p.stack_level} exceeds ChargeProfileMaxStackLevel {max_level}"
        max_periods = self.keys.get_int("ChargingScheduleMaxPeriods")
        if len(p.periods) > max_periods:
            return f"{len(p.periods)} periods exceed ChargingScheduleMaxPeriods {max_periods}"
        allowed = self.keys.get_list("ChargingScheduleAllowedChargingRateUnit")
        if p.unit not in {UNIT_OF_KEY[u] for u in allowed if u in UNIT_OF_KEY}:
            return f"chargingRateUnit {p.unit} is not in ChargingScheduleAllowedChargingRateUnit"
        if p.purpose == sc.TX and need_tx:
            if tx is None:
                return f"no transaction on connector {p.connector_id}"
            if p.transaction_id is not None and p.transaction_id != tx.transaction_id:
                return f"transactionId {p.transaction_id} is not the running transaction"
        kept = [q for q in self._profiles if not replaces(p, q)]
        max_installed = self.keys.get_int("MaxChargingProfilesInstalled")
        if len(kept) + 1 > max_installed:
            return f"MaxChargingProfilesInstalled ({max_installed}) reached"
        return None

    def set(
        self,
        connector_id: int,
        body: dict[str, Any],
        tx: sc.Tx | None,
        *,
        now: datetime | None = None,
    ) -> str:
        """SetChargingProfile: validate, replace, persist. Returns the status."""
        if now is not None:
            body = _anchored(body, now)
        try:
            profile = sc.parse_profile(connector_id, body)
        except sc.ProfileError as exc:
            log.warning("SetChargingProfile rejected: %s", exc)
            return REJECTED
        problem = self.problem(profile, tx)
        if problem:
            log.warning("SetChargingProfile %d rejected: %s", profile.profile_id, problem)
            return REJECTED
        self.install(profile)
        return ACCEPTED

    def remote_problem(self, connector_id: int, body: dict[str, Any]) -> str | None:
        """Why the chargingProfile of a RemoteStartTransaction is refused (None: it is fine)."""
        try:
            profile = sc.parse_profile(connector_id, _without_tx_id(body))
        except sc.ProfileError as exc:
            return str(exc)
        if profile.purpose != sc.TX:
            return "the profile of a RemoteStartTransaction must be a TxProfile"
        return self.problem(profile, None, need_tx=False)

    def install_remote(self, connector_id: int, body: dict[str, Any], tx: sc.Tx) -> bool:
        """Install the TxProfile a RemoteStartTransaction carried, now that ``tx`` runs.

        A transactionId in it is ignored: the CSMS could not know the id yet, and the profile
        ends with this transaction anyway.
        """
        try:
            profile = sc.parse_profile(connector_id, _without_tx_id(body))
        except sc.ProfileError as exc:
            log.warning("charging profile in RemoteStartTransaction ignored: %s", exc)
            return False
        problem = self.problem(profile, tx)
        if problem:
            log.warning("charging profile in RemoteStartTransaction ignored: %s", problem)
            return False
        self.install(profile)
        return True

    def install(self, profile: sc.Profile) -> None:
        """Install a checked profile (replacing as the rules say) and persist it."""
        replaced = [q for q in self._profiles if replaces(profile, q)]
        for old in replaced:
            if old.profile_id != profile.profile_id:
                self.store.delete_profile(old.profile_id)
        self._put(profile)
        profile = _parsed_only(profile)
        self._profiles = [q for q in self._profiles if q not in replaced]
        self._profiles.append(profile)
        log.info(
            "charging profile %d installed (%s, stack %d, connector %d)%s",
            profile.profile_id,
            profile.purpose,
            profile.stack_level,
            profile.connector_id,
            f", replacing {', '.join(str(q.profile_id) for q in replaced)}" if replaced else "",
        )

    # ------------------------------------------------------------------ clearing
    def clear(
        self,
        profile_id: int | None,
        connector_id: int | None,
        purpose: str | None,
        stack_level: int | None,
    ) -> str:
        """ClearChargingProfile: by id, else by every criterion given (none: all)."""

        def matches(p: sc.Profile) -> bool:
            if profile_id is not None:
                return p.profile_id == profile_id
            return (
                (connector_id is None or p.connector_id == connector_id)
                and (purpose is None or p.purpose == purpose)
                and (stack_level is None or p.stack_level == stack_level)
            )

        removed = [p for p in self._profiles if matches(p)]
        if not removed:
            return UNKNOWN
        self._remove(removed)
        log.info("charging profile(s) %s cleared", ", ".join(str(p.profile_id) for p in removed))
        return ACCEPTED

    def end_transaction(self, connector_id: int) -> bool:
        """A transaction ended on ``connector_id``: its TxProfiles go. True if any did."""
        ended = [p for p in self._profiles if p.purpose == sc.TX and p.connector_id == connector_id]
        self._remove(ended)
        return bool(ended)

    def _remove(self, removed: Sequence[sc.Profile]) -> None:
        for p in removed:
            self.store.delete_profile(p.profile_id)
        self._profiles = [p for p in self._profiles if p not in removed]

    # ------------------------------------------------------------------ limits
    def limit(
        self,
        connector_id: int,
        now: datetime,
        tx: sc.Tx | None,
        *,
        hardware_max_a: float | None = None,
    ) -> float:
        """The limit (A per phase) on one connector at ``now``, ignoring other connectors."""
        return sc.effective_limit_a(
            self._profiles,
            connector_id=connector_id,
            now=now,
            tx=tx,
            hardware_max_a=self.max_current_a if hardware_max_a is None else hardware_max_a,
            voltage_v=self.voltage_v,
            phases=self.phases,
        )

    def limits(
        self,
        now: datetime,
        txs: Mapping[int, sc.Tx | None],
        *,
        hardware_max_a: Mapping[int, float],
        charging: Sequence[int],
    ) -> dict[int, float]:
        """The limit of every connector at ``now``.

        ``charging`` lists the connectors with a transaction, first-started first: a
        ChargePointMaxProfile caps the charge point as a whole, so they share it
        (:func:`~agent.core.smart_charging.share`).
        """
        own = {
            cid: self.limit(cid, now, tx, hardware_max_a=hardware_max_a.get(cid))
            for cid, tx in txs.items()
        }
        if len(charging) > 1:
            cap = sc.cp_max_a(self._profiles, now, voltage_v=self.voltage_v, phases=self.phases)
            if cap is not None:
                wants = [(cid, own[cid]) for cid in charging]
                own.update(sc.share(cap, wants, minimum_a=IEC61851_MIN_CURRENT_A))
        return own

    def next_boundary(self, now: datetime, tx_starts: Iterable[datetime | None]) -> datetime | None:
        """The next instant any limit may change (for the actuation timer)."""
        found = [
            edge
            for tx_start in {*tx_starts, None}
            if (edge := sc.next_boundary(self._profiles, now, tx_start)) is not None
        ]
        return min(found) if found else None

    # ------------------------------------------------------------------ GetCompositeSchedule
    def composite(
        self,
        connector_id: int,
        now: datetime,
        duration_s: int,
        unit: str | None,
        tx: sc.Tx | None,
        *,
        hardware_max_a: float | None = None,
    ) -> tuple[str, dict[str, Any]] | None:
        """GetCompositeSchedule: ``(scheduleStart, chargingSchedule)``, None for Rejected.

        Connector 0 gives the charge point's limit: the hardware maximum capped by the
        ChargePointMaxProfile. Limits are in ``unit`` (default A), rounded down to 0.1. The
        schedule starts at the next whole second (``now`` itself when it is whole); it ends
        early, with a shorter duration, when it would exceed MAX_COMPOSITE_PERIODS.
        """
        if connector_id != 0 and connector_id not in self.connector_ids:
            return None
        unit = unit or "A"
        if unit not in sc.UNITS or duration_s < 0:
            return None
        # Whole seconds, from the next one: a schedule starting before ``now`` could show a
        # limit that is already over (a Relative profile whose transaction started at .5 s).
        start = now.replace(microsecond=0) + timedelta(seconds=1 if now.microsecond else 0)
        computed = sc.composite(
            self._profiles,
            connector_id=connector_id,
            start=start,
            duration_s=duration_s,
            tx=tx,
            hardware_max_a=self.max_current_a if hardware_max_a is None else hardware_max_a,
            voltage_v=self.voltage_v,
            phases=self.phases,
            max_periods=MAX_COMPOSITE_PERIODS,
        )
        if computed.duration_s < duration_s:
            log.warning(
                "GetCompositeSchedule: %d s asked, answering the first %d s (%d periods)",
                duration_s,
                computed.duration_s,
                MAX_COMPOSITE_PERIODS,
            )
        out: list[dict[str, Any]] = []
        for period in computed.periods:
            value = period.limit_a
            if unit == "W":
                value *= self.voltage_v * period.number_phases
            limit = sc.floor_tenth(value)
            if (
                out
                and out[-1]["limit"] == limit
                and out[-1]["numberPhases"] == period.number_phases
            ):
                continue
            out.append(
                {
                    "startPeriod": period.start_s,
                    "limit": limit,
                    "numberPhases": period.number_phases,
                }
            )
        schedule = {
            "duration": computed.duration_s,
            "startSchedule": iso(start),
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": out,
        }
        return iso(start), schedule


def replaces(new: sc.Profile, old: sc.Profile) -> bool:
    """Does installing ``new`` replace the installed ``old``?"""
    return new.profile_id == old.profile_id or (
        new.purpose == old.purpose
        and new.stack_level == old.stack_level
        and new.connector_id == old.connector_id
    )


#: The body an installed profile keeps in memory: none (see :func:`_parsed_only`).
_STORED: dict[str, Any] = {}


def _parsed_only(profile: sc.Profile) -> sc.Profile:
    """``profile`` without its received body: once stored, the parsed form is all the
    agent uses (limits, composite schedule). A profile of 48 periods takes 3.7 KiB parsed,
    13 KiB with its body (tracemalloc; 500 of them: 1.8 MiB instead of 6.4). The body is
    read back from the store on a restart."""
    return dataclasses.replace(profile, body=_STORED)


def _without_tx_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "transactionId"}
