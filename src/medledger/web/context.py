"""What the portal knows about the node it runs on, and how a member signs in to it.

A member's keystore (the same file `medledger keys new` writes, sealed with the member's own
passphrase) is placed in HOME/portal-keys/<name>.json by the operator. Sign-in opens it with
the passphrase the member types, in memory only; the portal then acts with those keys through
the SDK against this node's RPC and API, exactly as the member's own CLI would.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import nacl.pwhash.argon2id as argon2id

from medledger.client.records import HomeNode, RecordsClient
from medledger.client.sdk import LedgerClient, QueryError
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring, KeystoreError, validate_name
from medledger.ledger.model import Member, Organization, Status
from medledger.web.sessions import SessionStore, SignInLimiter
from medledger.web.settings import PortalSettings
from medledger.web.signin import AddressLimiter, KeyDerivations

DIRECTORY_TTL = 30.0


class SignInError(Exception):
    """Sign-in refused; the message is safe to show (it never tells a stranger whether a
    name exists)."""


class MemberClient(RecordsClient):
    """A signed-in member's records client, with a ledger client of its own (its own nonce
    bookkeeping), both closed when the session ends."""

    def close(self) -> None:
        super().close()
        self.ledger.close()


@dataclass
class PortalContext:
    organization: str
    chain_id: str
    rpc_url: str
    api_url: str
    peers: Mapping[str, str]
    keys_dir: Path
    settings: PortalSettings
    sessions: SessionStore
    limiter: SignInLimiter
    addresses: AddressLimiter
    # Keystore derivations run here, never on the default executor that FHIR, HL7 and
    # export share (see medledger.web.signin).
    derivations: KeyDerivations
    templates: jinja2.Environment
    reader: LedgerClient
    # Inside the node: ledger clients that read committed state in-process, and this node's
    # record services (see medledger.services); without them, the RPC and the HTTP API.
    ledger: Callable[[], LedgerClient] | None = None
    home: HomeNode | None = None
    _organizations: tuple[float, dict[str, Organization]] = (0.0, {})
    _members: dict[str, tuple[float, Member | None]] = field(default_factory=dict)

    def client_for(self, keys: KeyPair, member_id: str) -> MemberClient:
        return MemberClient(
            self.ledger() if self.ledger else LedgerClient(self.rpc_url, self.chain_id),
            self.api_url,
            keys,
            member_id,
            node_organization=self.organization,
            home=self.home,
        )

    def close(self) -> None:
        self.sessions.close()
        self.derivations.close()
        self.reader.close()

    # --- directory (public ledger metadata, cached briefly) -------------------------------

    def organizations(self) -> dict[str, Organization]:
        """The organizations on the ledger (blocking: call it in a worker thread)."""
        if self.directory_stale():
            listed = self.reader.query("/organizations", b"", list[Organization])
            self._organizations = (time.monotonic(), {o.id: o for o in listed})
        return self._organizations[1]

    def directory_stale(self) -> bool:
        fetched, cached = self._organizations
        return not cached or time.monotonic() - fetched > DIRECTORY_TTL

    def organization_name(self, organization: str) -> str:
        """The organization's name from the cached directory (never blocks: templates call
        it on the event loop, which also serves ABCI, so it must not wait on the RPC)."""
        found = self._organizations[1].get(organization)
        return found.name if found else organization

    def member(self, member_id: str) -> Member | None:
        fetched, cached = self._members.get(member_id, (0.0, None))
        if time.monotonic() - fetched > DIRECTORY_TTL:
            try:
                cached = self.reader.query("/member", member_id, Member)
            except QueryError:
                cached = None
            self._members[member_id] = (time.monotonic(), cached)
        return cached

    def members(self, organization: str = "") -> list[Member]:
        return self.reader.query("/members", organization, list[Member])  # type: ignore[no-any-return]

    # --- sign-in --------------------------------------------------------------------------

    def open_keystore(self, name: str, passphrase: str) -> KeyPair:
        """`name`'s keys, from its keystore opened with `passphrase` (blocking, and as costly
        for a name with no keystore: run it on `derivations`)."""
        refused = SignInError("Wrong name or passphrase.")
        try:
            path = Keyring(self.keys_dir).path_for(validate_name(name))
        except KeystoreError:
            raise refused from None
        if not path.exists():
            # As long as opening a real keystore, so timing does not tell who has one.
            self._spend_like_a_keystore()
            raise refused
        try:
            return Keyring(self.keys_dir).load(name, passphrase)
        except KeystoreError:
            raise refused from None

    def enrolled_member(self, keys: KeyPair) -> Member:
        """The member these keys belong to, if enrolled with them, active, and of this node's
        organization (blocking: it asks the ledger)."""
        try:
            member: Member = self.reader.query("/member", keys.member_id, Member)
        except QueryError:
            raise SignInError(
                "These keys are not enrolled on the ledger: ask your organization's desk."
            ) from None
        if member.verify_key != keys.verify_key:
            raise SignInError(
                "These keys were replaced (key rotation): ask your organization for the new"
                " keystore to be added to the portal."
            )
        if member.status is not Status.ACTIVE:
            raise SignInError(f"Your membership is {member.status}: ask your organization.")
        if member.organization != self.organization:
            home = self.organization_name(member.organization)
            raise SignInError(f"Please sign in at your own organization's portal ({home}).")
        return member

    def _spend_like_a_keystore(self) -> None:
        opslimit, memlimit = argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN
        for path in sorted(self.keys_dir.glob("*.json"))[:1]:
            try:
                kdf = json.loads(path.read_text(encoding="utf-8"))["kdf"]
                opslimit = min(int(kdf["opslimit"]), argon2id.OPSLIMIT_SENSITIVE)
                memlimit = min(int(kdf["memlimit"]), argon2id.MEMLIMIT_SENSITIVE)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        argon2id.kdf(
            32, secrets.token_bytes(16), secrets.token_bytes(argon2id.SALTBYTES), opslimit, memlimit
        )
