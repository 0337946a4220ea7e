"""What a transaction handler may know: the block it runs in and who sent it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medledger.ledger.model import Member, Role
from medledger.ledger.state import State


@dataclass(frozen=True)
class BlockContext:
    """The block being executed. `time_ns` is the block time CometBFT agreed on."""

    chain_id: str
    height: int
    time_ns: int


@dataclass
class BlockEffects:
    """What a block's transactions ask of the consensus engine, gathered during execution."""

    validator_updates: dict[bytes, int] = field(default_factory=dict)

    def sorted_validator_updates(self) -> list[tuple[bytes, int]]:
        return sorted(self.validator_updates.items())


@dataclass(frozen=True)
class TxContext:
    block: BlockContext
    sender: Member
    tx_hash: bytes
    effects: BlockEffects


Handler = Callable[[State, TxContext, Any], str]


@dataclass(frozen=True)
class TransactionRule:
    """One transaction type: its body, the roles that may send it, and its state transition."""

    body: type[Any]
    roles: frozenset[Role]
    handler: Handler
