"""The portal's settings: the optional `[portal]` table of `HOME/medledger.toml`.

```toml
[portal]
idle_timeout_seconds = 900        # a session ends after this long without a request
absolute_timeout_seconds = 28800  # and this long after sign-in, whatever happens
login_failures = 5                # wrong passphrases for one name ...
login_window_seconds = 300        # ... within this window lock that name for the window
login_address_failures = 20       # failed sign-ins from one address (IPv6: one /64) ...
login_address_attempts = 60       # ... or sign-ins of any outcome, per window, lock it
signin_workers = 2                # keystore derivations at once (each ~hundreds of MB)
signin_queue = 8                  # sign-ins waiting for one; more are told to retry (503)
max_sessions = 1000               # signed-in sessions held at once (oldest dropped first)
public_origin = "https://portal.st-mary.example"  # when a TLS proxy serves the portal
```

Behind a reverse proxy that terminates TLS, the node sees plain http: `public_origin` tells it
the origin browsers use, for the Origin check of every form and for Secure cookies. The
per-address limits then see the proxy's address for every member: raise them, or see
`medledger.web.signin` for taking the client address from a trusted proxy.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from medledger.config import CONFIG_FILE, ConfigError

PORTAL_KEYS_DIR = "portal-keys"


@dataclass(frozen=True)
class PortalSettings:
    idle_timeout_seconds: float = 900.0
    absolute_timeout_seconds: float = 8 * 3600.0
    login_failures: int = 5
    login_window_seconds: float = 300.0
    login_address_failures: int = 20
    login_address_attempts: int = 60
    signin_workers: int = 2
    signin_queue: int = 8
    max_sessions: int = 1000
    public_origin: str = ""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "public_origin":
                if not isinstance(value, str) or (
                    value and not re.fullmatch(r"https?://[^/\s]+", value)
                ):
                    raise ConfigError(
                        "[portal] public_origin must be scheme://host[:port], e.g."
                        " https://portal.example.org"
                    )
            elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"[portal] {item.name} must be a positive number")


def load_portal_settings(home: Path) -> PortalSettings:
    """The `[portal]` table of the node's configuration, or the defaults without one."""
    path = home / CONFIG_FILE
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    table = document.get("portal", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [portal] must be a table")
    known = {item.name for item in fields(PortalSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [portal]: {', '.join(unknown)}")
    try:
        return PortalSettings(**table)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
