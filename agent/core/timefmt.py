"""OCPP timestamps: the one place that formats and parses them.

Pure: no clock reads. OCPP-J 1.6 sends times as RFC 3339 strings; the agent sends UTC with
milliseconds and a ``Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: datetime) -> str:
    """OCPP timestamp: UTC, milliseconds, 'Z'."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str, *, require_zone: bool = False) -> datetime:
    """An OCPP timestamp as an aware datetime.

    A timestamp without a zone is taken as UTC, or refused when ``require_zone`` (a
    charging profile's times must say which instant they mean).

    Raises:
        ValueError: ``text`` is not an ISO 8601 timestamp, or has no zone and
            ``require_zone`` is set.
    """
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is not None:
        return value
    if require_zone:
        raise ValueError(f"timestamp without a time zone: {text}")
    return value.replace(tzinfo=UTC)
