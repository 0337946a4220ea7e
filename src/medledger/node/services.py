"""Settings of a node's services beyond consensus, in `HOME/medledger.toml`:

```toml
[services]
passphrase_file = "keys/node.passphrase"   # unlocks keys/node.json at start (mode 0600)
packages_dir = "packages"                  # the content-addressed package store
upload_ttl_seconds = 3600                  # an upload no committed record names is deleted
pending_upload_bytes_per_member = 268435456  # ... and counts against its uploader's quota
pending_uploads_per_member = 2000

[peers]                                    # other organizations' node APIs, for replication
org-2 = "http://10.0.0.2:26612"
```

The node's own keys (keys/node.json) sign its requests to peers and open its key shares; the
passphrase file is the operator's choice of how the node unlocks them unattended (as a
validator unlocks its signing key); `MEDLEDGER_NODE_PASSPHRASE` overrides it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit

from medledger.config import CONFIG_FILE, ConfigError
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import KeystoreError, load_keystore
from medledger.hl7.config import load_hl7_config
from medledger.services.custody import Custody
from medledger.store.uploads import UploadLimits

PASSPHRASE_ENV = "MEDLEDGER_NODE_PASSPHRASE"
# [services] keys of the limits on uploads that no committed record names.
_UPLOAD_LIMITS = {
    "upload_ttl_seconds": "ttl_seconds",
    "pending_upload_bytes_per_member": "max_bytes_per_member",
    "pending_uploads_per_member": "max_packages_per_member",
}
NODE_KEYSTORE = "keys/node.json"


@dataclass(frozen=True)
class ServicesConfig:
    home: Path
    passphrase_file: str = "keys/node.passphrase"
    packages_dir: str = "packages"
    peers: dict[str, str] = field(default_factory=dict)
    upload_limits: UploadLimits = field(default_factory=UploadLimits)

    def path(self, relative: str) -> Path:
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else self.home / candidate

    @property
    def packages_path(self) -> Path:
        return self.path(self.packages_dir)

    def node_passphrase(self) -> str:
        """The passphrase of the node's own keystore and of its custodial keystores."""
        passphrase = os.environ.get(PASSPHRASE_ENV)
        if passphrase:
            return passphrase
        try:
            return self.path(self.passphrase_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the node key passphrase ({self.passphrase_file}): {exc}"
                f"; set ${PASSPHRASE_ENV} or [services] passphrase_file"
            ) from None

    def unlock_node_keys(self) -> KeyPair:
        try:
            return load_keystore(self.home / NODE_KEYSTORE, self.node_passphrase())
        except KeystoreError as exc:
            raise ConfigError(
                f"cannot unlock the node's keys ({NODE_KEYSTORE}): {exc}; [services]"
                f" passphrase_file (or ${PASSPHRASE_ENV}) must hold the passphrase they were"
                " sealed with"
            ) from None


def load_services_config(home: Path) -> ServicesConfig:
    path = home / CONFIG_FILE
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    services = document.get("services", {})
    peers = document.get("peers", {})
    if not isinstance(services, dict) or not isinstance(peers, dict):
        raise ConfigError(f"{path}: [services] and [peers] must be tables")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in peers.items()):
        raise ConfigError(f"{path}: [peers] maps organization ids to URLs")
    unknown = set(services) - {"passphrase_file", "packages_dir", *_UPLOAD_LIMITS}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [services]: {', '.join(sorted(unknown))}")
    limits: dict[str, int] = {}
    for key, attribute in _UPLOAD_LIMITS.items():
        value = services.get(key, getattr(UploadLimits(), attribute))
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{path}: [services] {key} must be a positive number")
        limits[attribute] = int(value)
    return ServicesConfig(
        upload_limits=UploadLimits(**limits),
        home=home,
        passphrase_file=str(services.get("passphrase_file", "keys/node.passphrase")),
        packages_dir=str(services.get("packages_dir", "packages")),
        peers={str(k): str(v) for k, v in sorted(peers.items())},
    )


def write_services_config(home: Path, peers: dict[str, str], passphrase: str | None) -> None:
    """Write the [services] and [peers] tables (keeping [node]); with `passphrase`, also the
    node key passphrase file (mode 0600)."""
    path = home / CONFIG_FILE
    document = tomlkit.parse(path.read_text(encoding="utf-8"))
    services = tomlkit.table()
    services["passphrase_file"] = "keys/node.passphrase"
    services["packages_dir"] = "packages"
    document["services"] = services
    peer_table = tomlkit.table()
    for org, url in sorted(peers.items()):
        peer_table[org] = url
    document["peers"] = peer_table
    path.write_text(tomlkit.dumps(document), encoding="utf-8")
    if passphrase is not None:
        secret = home / "keys" / "node.passphrase"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(passphrase + "\n")


def require_custodial_member(custody: Custody, member: str, key: str) -> None:
    """A configuration key that names a member the node signs for (`[hl7] member`) must name
    the member id of one of its custodial identities; a ConfigError that names the key, the
    value and what it expects otherwise — most often the keystore's name instead of its id."""
    if custody.holds(member):
        return
    held = custody.members()
    by_name = next((public for public in held if public.name == member), None)
    if by_name is not None:
        raise ConfigError(
            f"{key} = {member!r} is the name of a custodial keystore; {key} takes its member"
            f" id: {key} = {by_name.member_id!r}"
        )
    listing = ", ".join(f"{p.name} = {p.member_id}" for p in held) or "none yet"
    raise ConfigError(
        f"{key} = {member!r}: this node holds no keys for it; {key} must be the member id of"
        f" one of the node's custodial identities (`medledger custody list --home HOME`;"
        f" held: {listing})"
    )


def check_hl7_member(home: Path, custody: Custody) -> None:
    """At start, before any socket opens: the `[hl7]` table parses and the members it names
    (`member`, `registration_member`) are custodial identities of this node."""
    config = load_hl7_config(home)
    if config is None:
        return
    require_custodial_member(custody, config.member, "[hl7] member")
    registration_member: str | None = getattr(config, "registration_member", None)
    if registration_member is not None:
        require_custodial_member(custody, registration_member, "[hl7] registration_member")
