"""This node's record services as the SDK's `HomeNode`, for the custodial members its front
doors act for: a package is stored straight into the package store and this node's key share
released in-process, with the same decisions (`medledger.services.packages`) and the same
audit entries as the HTTP API makes for a client elsewhere."""

from __future__ import annotations

from medledger.client.records import NodeAnswer
from medledger.ledger.identity import is_active
from medledger.ledger.model import Member, member_key
from medledger.ledger.state import State
from medledger.services.packages import (
    PackageRefused,
    RecordServices,
    package_copy,
    refuse,
    release_share,
    release_shares,
    store_package,
    store_packages,
)
from medledger.store.sqlite import CommittedReads, CommittedView


class InProcessNode:
    def __init__(self, services: RecordServices, view: CommittedView) -> None:
        self.services = services
        self.view = view

    def node_apis(self) -> dict[str, str]:
        return {self.services.organization: self.services.api_url, **self.services.peers}

    def put_package(self, member_id: str, digest: str, data: bytes) -> NodeAnswer:
        with self.view.snapshot() as reads:
            try:
                member = _active_member(reads, member_id)
                stored = store_package(self.services, reads, member, digest, data)
            except PackageRefused as refusal:
                return NodeAnswer(refusal.status, refusal.reason.encode())
        return NodeAnswer(201 if stored.created else 200, b"")

    def put_packages(self, member_id: str, uploads: list[tuple[str, bytes]]) -> list[NodeAnswer]:
        with self.view.snapshot() as reads:
            try:
                member = _active_member(reads, member_id)
            except PackageRefused as refusal:
                return [NodeAnswer(refusal.status, refusal.reason.encode())] * len(uploads)
            answers = store_packages(self.services, reads, member, uploads)
        return [
            NodeAnswer(a.status, a.reason.encode(), a.retry_after)
            if isinstance(a, PackageRefused)
            else NodeAnswer(201 if a.created else 200, b"")
            for a in answers
        ]

    def get_package(self, member_id: str, digest: str, grant_id: str) -> NodeAnswer:
        with self.view.snapshot() as reads:
            try:
                member = _active_member(reads, member_id)
                data = package_copy(self.services, reads, member, digest, grant_id)
            except PackageRefused as refusal:
                return NodeAnswer(refusal.status, refusal.reason.encode())
        return NodeAnswer(200, data)

    def release_share(self, member_id: str, grant_id: str) -> NodeAnswer:
        with self.view.snapshot() as reads:
            try:
                member = _active_member(reads, member_id)
            except PackageRefused as refusal:
                refuse(self.services, member_id, grant_id, refusal.reason)
                return NodeAnswer(refusal.status, refusal.reason.encode())
            try:
                released = release_share(self.services, reads, member, grant_id)
            except PackageRefused as refusal:
                return NodeAnswer(refusal.status, refusal.reason.encode())
        return NodeAnswer(200, released.sealed_share)

    def release_shares(
        self, member_id: str, grant_id: str, records: list[tuple[str, int]]
    ) -> list[NodeAnswer]:
        with self.view.snapshot() as reads:
            try:
                member = _active_member(reads, member_id)
                answers = release_shares(self.services, reads, member, grant_id, records)
            except PackageRefused as refusal:
                refuse(self.services, member_id, grant_id, refusal.reason)
                return [NodeAnswer(refusal.status, refusal.reason.encode())] * len(records)
        return [
            NodeAnswer(a.status, a.reason.encode())
            if isinstance(a, PackageRefused)
            else NodeAnswer(200, a.sealed_share)
            for a in answers
        ]


def _active_member(reads: CommittedReads, member_id: str) -> Member:
    """The member the node acts for, as the HTTP API's authentication would find them."""
    state = State(reads)
    member = state.read(member_key(member_id), Member)
    if member is None:
        raise PackageRefused(401, f"unknown member {member_id}")
    if not is_active(state, member):
        raise PackageRefused(401, f"member {member_id} is {member.status} or its organization is")
    return member
