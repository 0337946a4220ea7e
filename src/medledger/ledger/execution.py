"""Checking and executing one transaction.

`check_transaction` is what CheckTx runs against committed state; `execute_transaction` is
the authoritative, deterministic step FinalizeBlock runs for each transaction in order. Both
walk the same checks; execution then applies the type's state transition in its own overlay,
which is kept only when it succeeds, so a refused transaction changes no state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from medledger.crypto.keys import verify_signature
from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.context import BlockContext, BlockEffects, TransactionRule, TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.governance import load_params
from medledger.ledger.identity import is_active
from medledger.ledger.mempool import MAX_NONCE_AHEAD
from medledger.ledger.model import Member, member_key, nonce_key
from medledger.ledger.rules import TRANSACTION_RULES
from medledger.ledger.state import State


class AuditEntry(msgspec.Struct, frozen=True, array_like=True):
    """One leaf of the audit log: the result of one transaction. Never carries PHI."""

    height: int
    index: int
    tx_hash: bytes
    type: str
    sender: str
    code: int
    log: str
    subject: str


@dataclass(frozen=True)
class TxResult:
    code: Code
    log: str
    type: str = ""
    sender: str = ""
    subject: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.OK


class CheckCache:
    """What this node already worked out about a transaction from its bytes alone: that its
    signature verifies under a key, and its decoding (canonical envelope; body of its type,
    canonical). A transaction is checked when it enters the mempool, again after every block
    while it waits (the recheck), and when its block executes; only the checks against state
    differ between those, so the rest is done once. Keyed by the transaction's hash (and, for a
    signature, the key), so only speed depends on it, never a result. Bounded in entries and in
    the bytes of the transactions whose decoding it holds."""

    def __init__(self, capacity: int = 100_000, decoded_bytes: int = 64 << 20) -> None:
        self._capacity = capacity
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._decoded: OrderedDict[bytes, _Decoded] = OrderedDict()
        self._decoded_limit = decoded_bytes
        self._decoded_bytes = 0

    def verify(self, tx_hash: bytes, verify_key: bytes, message: bytes, signature: bytes) -> bool:
        token = tx_hash + verify_key
        if token in self._verified:
            self._verified.move_to_end(token)
            return True
        if not verify_signature(verify_key, message, signature):
            return False
        self._verified[token] = None
        if len(self._verified) > self._capacity:
            self._verified.popitem(last=False)
        return True

    def envelope(self, tx_hash: bytes, raw: bytes) -> Envelope:
        """`codec.decode(raw, Envelope)`, once per transaction."""
        known = self._decoded.get(tx_hash)
        if known is not None:
            self._decoded.move_to_end(tx_hash)
            return known.envelope
        envelope = codec.decode(raw, Envelope)
        self._decoded[tx_hash] = _Decoded(envelope, len(raw))
        self._decoded_bytes += len(raw)
        while len(self._decoded) > self._capacity or self._decoded_bytes > self._decoded_limit:
            _, dropped = self._decoded.popitem(last=False)
            self._decoded_bytes -= dropped.size
        return envelope

    def body(self, tx_hash: bytes, envelope: Envelope, kind: type[object]) -> object:
        """The envelope's body decoded as `kind`, checked canonical, once per transaction."""
        known = self._decoded.get(tx_hash)
        if known is None or known.envelope is not envelope:  # not decoded through this cache
            return decode_body(envelope, kind)
        if known.body is None:
            known.body = decode_body(envelope, kind)
        return known.body


@dataclass
class _Decoded:
    envelope: Envelope
    size: int
    body: object | None = None


def decode_body(envelope: Envelope, kind: type[object]) -> object:
    """The envelope's body as `kind`; INVALID_BODY if it is nested too deep, does not decode
    or is not in canonical encoding."""
    try:
        codec.check_nesting(envelope.body)
    except LedgerError as err:
        message = f"invalid {envelope.type} body: {err.message}"
        raise LedgerError(Code.INVALID_BODY, message) from None
    try:
        body = msgspec.msgpack.decode(envelope.body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise LedgerError(Code.INVALID_BODY, f"invalid {envelope.type} body: {exc}") from None
    if codec.encode(body) != envelope.body:
        raise LedgerError(Code.INVALID_BODY, f"{envelope.type} body is not canonical")
    return body


@dataclass(frozen=True)
class Checked:
    envelope: Envelope
    sender: Member
    rule: TransactionRule
    body: object


def check_transaction(
    state: State,
    raw: bytes,
    chain_id: str,
    tx_hash: bytes,
    checks: CheckCache,
    *,
    exact_nonce: bool,
) -> Checked:
    """Every check short of running the transition. With `exact_nonce` false (CheckTx), a
    nonce ahead of the committed one is accepted, since earlier ones may wait in the mempool."""
    max_bytes = load_params(state).max_tx_bytes
    if len(raw) > max_bytes:
        raise LedgerError(Code.TOO_LARGE, f"transaction is {len(raw)} bytes; limit {max_bytes}")
    envelope = checks.envelope(tx_hash, raw)
    if envelope.chain_id != chain_id:
        raise LedgerError(
            Code.WRONG_CHAIN, f"transaction is for chain {envelope.chain_id!r}, not {chain_id!r}"
        )
    rule = TRANSACTION_RULES.get(envelope.type)
    if rule is None:
        raise LedgerError(Code.UNKNOWN_TYPE, f"unknown transaction type {envelope.type!r}")
    sender = state.read(member_key(envelope.sender), Member)
    if sender is None:
        raise LedgerError(Code.UNKNOWN_SENDER, f"unknown sender {envelope.sender}")
    if not checks.verify(tx_hash, sender.verify_key, envelope.sign_bytes(), envelope.signature):
        raise LedgerError(Code.BAD_SIGNATURE, f"signature does not verify for {sender.id}")
    if not is_active(state, sender):
        raise LedgerError(
            Code.SENDER_INACTIVE, f"sender {sender.id} is {sender.status} or its organization is"
        )
    expected = (state.read(nonce_key(sender.id), int) or 0) + 1
    if envelope.nonce < expected or (exact_nonce and envelope.nonce != expected):
        raise LedgerError(
            Code.BAD_NONCE, f"nonce {envelope.nonce} for {sender.id}; expected {expected}"
        )
    if envelope.nonce >= expected + MAX_NONCE_AHEAD:
        raise LedgerError(
            Code.BAD_NONCE,
            f"nonce {envelope.nonce} for {sender.id} is too far ahead of {expected}"
            f" (at most {MAX_NONCE_AHEAD - 1} ahead)",
        )
    if sender.role not in rule.roles:
        raise LedgerError(Code.UNAUTHORIZED, f"role {sender.role} may not send {envelope.type}")
    body = checks.body(tx_hash, envelope, rule.body)
    return Checked(envelope, sender, rule, body)


def internal_error(exc: Exception) -> TxResult:
    """An exception no rule foresaw becomes a refusal instead of a crash: an exception out of
    FinalizeBlock would stop every validator at the same height, and the block would replay into
    the same crash on every restart. The transaction's overlay is dropped, so it changes no state,
    and its nonce stays unused. Inputs are bounded before they are parsed so that this stays a
    safety net: the log names only the exception's type, which is the same on every replica."""
    return TxResult(Code.INTERNAL, f"internal error ({type(exc).__name__}); nothing was changed")


def _decode_envelope(raw: bytes) -> Envelope:
    return codec.decode(raw, Envelope)


def order_by_nonce(
    txs: list[bytes], decode: Callable[[bytes], Envelope] = _decode_envelope
) -> list[bytes]:
    """Keep the mempool's order but put each sender's transactions in nonce order: a node can
    receive one sender's transactions out of order (from different peers), and execution
    requires consecutive nonces. The slots a sender's transactions occupy stay the same;
    transactions that do not decode keep their place (execution refuses them). `decode` is
    `codec.decode(raw, Envelope)` or a cached equivalent."""
    envelopes: list[Envelope | None] = []
    slots: dict[str, list[int]] = {}
    for position, tx in enumerate(txs):
        try:
            envelope = decode(tx)
        except LedgerError:
            envelopes.append(None)
            continue
        envelopes.append(envelope)
        slots.setdefault(envelope.sender, []).append(position)
    ordered = list(txs)
    for positions in slots.values():
        if len(positions) < 2:
            continue
        by_nonce = sorted(positions, key=lambda p: envelopes[p].nonce)  # type: ignore[union-attr]
        for slot, source in zip(positions, by_nonce, strict=True):
            ordered[slot] = txs[source]
    return ordered


def execute_transaction(
    state: State,
    block: BlockContext,
    effects: BlockEffects,
    raw: bytes,
    tx_hash: bytes,
    checks: CheckCache,
) -> TxResult:
    """Run one transaction of a block (`tx_hash` is `codec.tx_hash(raw)`); returns its single
    result."""
    try:
        checked = check_transaction(state, raw, block.chain_id, tx_hash, checks, exact_nonce=True)
    except LedgerError as err:
        return TxResult(err.code, err.message)
    except Exception as exc:  # execution is total: see `internal_error`
        return internal_error(exc)
    envelope = checked.envelope
    overlay = state.child()
    tx_effects = BlockEffects()
    try:
        log = checked.rule.handler(
            overlay, TxContext(block, checked.sender, tx_hash, tx_effects), checked.body
        )
    except LedgerError as err:
        if err.decision:
            state.write(nonce_key(envelope.sender), envelope.nonce)
        # A refusal concerning a member (a patient, say) goes into that member's trail too.
        subject = err.subject or tx_effects.subject
        return TxResult(err.code, err.message, envelope.type, envelope.sender, subject)
    except Exception as exc:  # execution is total: see `internal_error`
        failed = internal_error(exc)
        return TxResult(failed.code, failed.log, envelope.type, envelope.sender)
    overlay.write(nonce_key(envelope.sender), envelope.nonce)
    overlay.merge_into_parent()
    effects.absorb(tx_effects)
    return TxResult(Code.OK, log, envelope.type, envelope.sender, tx_effects.subject)
