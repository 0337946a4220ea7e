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
    # Packages that nodes must now hold, and packages whose key material must be destroyed.
    packages_stored: list[str] = field(default_factory=list)
    packages_erased: list[str] = field(default_factory=list)
    # The patient a transaction concerns, for that patient's audit trail (per transaction).
    subject: str = ""

    def absorb(self, tx_effects: BlockEffects) -> None:
        """Keep the effects of a transaction that succeeded."""
        self.validator_updates.update(tx_effects.validator_updates)
        self.packages_stored.extend(tx_effects.packages_stored)
        self.packages_erased.extend(tx_effects.packages_erased)

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
