"""The `[hl7]` table of a node's medledger.toml: where the MLLP listener listens, which member
writes, and the limits and allow-lists that keep a hostile sender from exhausting the node or
writing into charts it has no business with.

```toml
[hl7]
listen = "127.0.0.1:2575"      # host:port of the MLLP listener
member = "<member id>"         # the custodial laboratory-system (role lis) member that writes
timezone = "Europe/Berlin"     # for HL7 times without a UTC offset (default UTC)
application = "MEDLEDGER"      # MSH-3 of our acknowledgements (MSH-4 is the organization id)
max_connections = 32           # connections over this are closed at once
idle_timeout_seconds = 60      # a connection that completes no message for this long is closed
max_message_bytes = 1048576    # a larger frame gets AR and the connection is closed
workers = 8                    # messages processed at the same time (one per connection)
allowed_senders = ["COBAS_LIS^STMARY_LAB"]   # MSH-3^MSH-4 that may send (default: any)
allowed_addresses = ["10.1.2.0/24"]          # peer IPs or networks that may connect (default: any)
match_without_authority = false  # match PID-3 without an assigning authority on its value alone
processing_ids = ["P"]         # MSH-11 values accepted (e.g. ["P", "T"] on a pilot network);
                               # others get AR naming this policy
unknown_patients = "refuse"    # an ORU, or an ADT^A08/A31 update, about a patient nobody
                               # registered: "refuse" (AE) or "register" (from its PID)
registration_member = "<member id>"  # the custodial EHR (role ehr) member that enrolls
                               # patients from ADT A01/A04/A05/A28 (and "register" above);
                               # without it ADT registration is refused (AR)

[hl7.authorities]              # per sender (MSH-3^MSH-4): its assigning authorities (PID-3.4.1,
                               # "" for identifiers that name none) → the identifier system
"COBAS_LIS^STMARY_LAB" = { "MRN" = "urn:oid:1.2.840.114350.1.13", "" = "urn:oid:1.2.3.4" }
```

Acknowledgements: original mode (MSH-15 empty) answers AA/AE/AR; enhanced mode (MSH-15 AL,
ER, SU or NE) answers with the commit acknowledgement CA/CE/CR once the message is committed
or refused; MLLP always answers, so NE and ER still get one.

Every value is checked when the node starts; a wrong one stops it with a `ConfigError` that
names the key and what it expects.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from medledger.config import CONFIG_FILE, ConfigError, parse_host_port

DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_IDLE_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_WORKERS = 8

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Hl7Config:
    """The `[hl7]` table of a node's medledger.toml."""

    listen: str
    member: str
    timezone: str = "UTC"
    application: str = "MEDLEDGER"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = DEFAULT_WORKERS
    # (MSH-3, MSH-4) pairs; None accepts every sender.
    allowed_senders: frozenset[tuple[str, str]] | None = None
    # None accepts every peer address.
    allowed_addresses: tuple[IpNetwork, ...] | None = field(default=None)
    match_without_authority: bool = False
    processing_ids: tuple[str, ...] = ("P",)
    unknown_patients: str = "refuse"
    registration_member: str | None = None
    # (MSH-3, MSH-4) → assigning authority name → identifier system.
    authorities: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "[hl7] listen")

    @property
    def zone(self) -> tzinfo:
        return zone_named(self.timezone)


def zone_named(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"[hl7] timezone: unknown time zone {name!r}") from None


def address_allowed(address: str, allowed: tuple[IpNetwork, ...] | None) -> bool:
    """Whether a peer's IP address is in one of the allowed networks (any when None); an
    IPv4 peer seen on an IPv6 socket (::ffff:a.b.c.d) counts as its IPv4 address."""
    if allowed is None:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == network.version and ip in network for network in allowed)


def load_hl7_config(home: Path) -> Hl7Config | None:
    """The `[hl7]` table of HOME/medledger.toml; None when the node runs no HL7 listener."""
    path = home / CONFIG_FILE
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    table = document.get("hl7")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [hl7] must be a table")
    try:
        config = _parse_table(table)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


_KEYS = (
    "listen",
    "member",
    "timezone",
    "application",
    "max_connections",
    "idle_timeout_seconds",
    "max_message_bytes",
    "workers",
    "allowed_senders",
    "allowed_addresses",
    "match_without_authority",
    "processing_ids",
    "unknown_patients",
    "registration_member",
    "authorities",
)


def _parse_table(table: dict[str, Any]) -> Hl7Config:
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in [hl7]: {', '.join(unknown)} (known: {', '.join(_KEYS)})"
        )
    for key in ("listen", "member"):
        if key not in table:
            raise ConfigError(f"[hl7] needs {key}")
    config = Hl7Config(
        listen=_text(table, "listen"),
        member=_text(table, "member"),
        timezone=_text(table, "timezone", "UTC"),
        application=_text(table, "application", "MEDLEDGER"),
        max_connections=_integer(table, "max_connections", DEFAULT_MAX_CONNECTIONS, 1, 10_000),
        idle_timeout_seconds=_seconds(table, "idle_timeout_seconds", DEFAULT_IDLE_TIMEOUT_SECONDS),
        max_message_bytes=_integer(
            table, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, 1024, 64 * 1024 * 1024
        ),
        workers=_integer(table, "workers", DEFAULT_WORKERS, 1, 256),
        allowed_senders=_senders(table),
        allowed_addresses=_networks(table),
        match_without_authority=_flag(table, "match_without_authority", False),
        processing_ids=_processing_ids(table),
        unknown_patients=_choice(table, "unknown_patients", ("refuse", "register"), "refuse"),
        registration_member=(
            _text(table, "registration_member") if "registration_member" in table else None
        ),
        authorities=_authorities(table),
    )
    if config.unknown_patients == "register" and config.registration_member is None:
        raise ConfigError(
            '[hl7] unknown_patients = "register" needs registration_member: the member id of'
            " the node's custodial EHR member that enrolls patients"
        )
    config.address  # noqa: B018 - validates listen
    config.zone  # noqa: B018 - validates timezone
    return config


def _text(table: dict[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[hl7] {key} must be a non-empty string, not {value!r}")
    return value


def _integer(table: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = table.get(key, default)
    # TOML booleans are Python ints; `true` is not a count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"[hl7] {key} must be an integer from {low} to {high}, not {value!r}")
    return value


def _seconds(table: dict[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 86_400
    ):
        raise ConfigError(
            f"[hl7] {key} must be a number of seconds above 0 and at most 86400, not {value!r}"
        )
    return float(value)


def _flag(table: dict[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"[hl7] {key} must be true or false, not {value!r}")
    return value


def _strings(table: dict[str, Any], key: str, expected: str) -> list[str] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[hl7] {key} must be a list of {expected}, not {value!r}")
    return list(value)


def _senders(table: dict[str, Any]) -> frozenset[tuple[str, str]] | None:
    entries = _strings(table, "allowed_senders", 'strings "MSH-3^MSH-4" such as "LIS^LAB"')
    if entries is None:
        return None
    senders = set()
    for entry in entries:
        application, separator, facility = entry.partition("^")
        if (
            not separator
            or "^" in facility
            or not application.strip()
            or not facility.strip()
            or application != application.strip()
            or facility != facility.strip()
        ):
            raise ConfigError(
                f'[hl7] allowed_senders: {entry!r} must be "MSH-3^MSH-4": the sending'
                ' application and facility, both non-empty, such as "COBAS_LIS^STMARY_LAB"'
            )
        senders.add((application, facility))
    return frozenset(senders)


def _networks(table: dict[str, Any]) -> tuple[IpNetwork, ...] | None:
    entries = _strings(
        table, "allowed_addresses", 'IP addresses or networks such as "10.1.2.3" or "10.1.2.0/24"'
    )
    if entries is None:
        return None
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError:
            raise ConfigError(
                f"[hl7] allowed_addresses: {entry!r} must be an IP address or network"
                ' (CIDR without host bits, such as "10.1.2.0/24")'
            ) from None
    return tuple(networks)


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = table.get(key, default)
    if value not in choices:
        expected = " or ".join(f'"{c}"' for c in choices)
        raise ConfigError(f"[hl7] {key} must be {expected}, not {value!r}")
    return str(value)


def _processing_ids(table: dict[str, Any]) -> tuple[str, ...]:
    entries = _strings(table, "processing_ids", 'HL7 processing ids such as ["P", "T"]')
    if entries is None:
        return ("P",)
    if not entries or any(e not in ("P", "T", "D") for e in entries):
        raise ConfigError(
            '[hl7] processing_ids must be a non-empty list of "P" (production), "T"'
            f' (training) and "D" (debugging), not {entries!r}'
        )
    return tuple(dict.fromkeys(entries))


def _authorities(table: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    value = table.get("authorities", {})
    expected = (
        '[hl7.authorities] must map "MSH-3^MSH-4" to a table of assigning authority names and'
        ' identifier systems, such as "COBAS_LIS^STMARY_LAB" = { "MRN" = "urn:oid:1.2.3" }'
    )
    if not isinstance(value, dict):
        raise ConfigError(f"{expected}, not {value!r}")
    found: dict[tuple[str, str], dict[str, str]] = {}
    for sender, systems in value.items():
        application, separator, facility = sender.partition("^")
        if not separator or not application or "^" in facility:
            raise ConfigError(f"{expected}: {sender!r} is not MSH-3^MSH-4")
        if not isinstance(systems, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in systems.items()
        ):
            raise ConfigError(f"{expected}: {sender!r} = {systems!r}")
        found[(application, facility)] = dict(systems)
    return found
