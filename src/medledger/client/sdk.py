"""The Python SDK: talk to a node's CometBFT RPC, sign with keys that never leave the client,
and check answers against headers the validators signed."""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import msgspec

from medledger.client.lightclient import LightClientError, VerifiedHeader, verify_commit
from medledger.client.tx import sign_transaction
from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.app import app_hash_of
from medledger.ledger.errors import Code
from medledger.ledger.statetree import DEFAULT_DEPTH, StateProof, verify_state_proof

T = TypeVar("T")


class ClientError(Exception):
    """The node could not be reached or answered something unexpected."""


class QueryError(ClientError):
    def __init__(self, code: int, log: str) -> None:
        super().__init__(f"query refused (code {code}): {log}")
        self.code = code
        self.log = log


class TxRejected(ClientError):
    """The transaction was refused, in CheckTx or when its block executed."""

    def __init__(self, code: int, log: str, tx_hash: str, height: int | None = None) -> None:
        where = "by the mempool" if height is None else f"in block {height}"
        super().__init__(f"transaction {tx_hash[:16]} refused {where} (code {code}): {log}")
        self.code = code
        self.log = log
        self.tx_hash = tx_hash
        self.height = height


class ProofError(ClientError):
    """An answer did not verify against the validators' signed header."""


@dataclass(frozen=True)
class TxOutcome:
    tx_hash: str
    height: int
    code: int
    log: str

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True)
class VerifiedValue:
    value: bytes | None
    height: int
    header: VerifiedHeader


def trusted_validators_from_genesis(path: str) -> dict[bytes, int]:
    """The founding validator set in a genesis.json: the light client's root of trust."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    return {
        base64.b64decode(v["pub_key"]["value"]): int(v["power"]) for v in document["validators"]
    }


def _rpc_result(method: str, response: httpx.Response) -> Any:
    try:
        document = response.json()
    except ValueError:
        raise ClientError(f"{method}: HTTP {response.status_code}, not JSON") from None
    if "error" in document:
        error = document["error"]
        raise ClientError(f"{method}: {error.get('message')} {error.get('data', '')}".strip())
    return document["result"]


class LedgerClient:
    """With `trusted_validators` (e.g. from the genesis file) headers are verified the way
    CometBFT's light client skips ahead: more than 1/3 of the trusted set's power must have
    signed the new header as well as more than 2/3 of the header's own validator set, after
    which that set is trusted. Without it, the client trusts the validator set the node
    reports."""

    def __init__(
        self,
        rpc_url: str,
        chain_id: str | None = None,
        timeout: float = 10.0,
        trusted_validators: dict[bytes, int] | None = None,
    ) -> None:
        self.rpc_url = rpc_url.rstrip("/")
        self.trusted_validators = trusted_validators
        self._http = httpx.Client(timeout=timeout)
        self._chain_id = chain_id
        # Nonces this client has signed and sent, per sender, so that concurrent submissions
        # for one sender (a node acting for a custodial member) get consecutive nonces and
        # reach the mempool in nonce order.
        self._sent_nonces: dict[str, int] = {}
        self._nonce_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- CometBFT RPC -------------------------------------------------------------------

    def rpc(self, method: str, **params: Any) -> Any:
        try:
            response = self._http.get(f"{self.rpc_url}/{method}", params=params)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.rpc_url}: {exc}") from None
        return _rpc_result(method, response)

    def rpc_post(self, method: str, **params: Any) -> Any:
        """JSON-RPC over POST, for calls whose arguments do not fit in a URL."""
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        try:
            response = self._http.post(self.rpc_url, json=body)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.rpc_url}: {exc}") from None
        return _rpc_result(method, response)

    @property
    def chain_id(self) -> str:
        if self._chain_id is None:
            self._chain_id = str(self.rpc("status")["node_info"]["network"])
        return self._chain_id

    def height(self) -> int:
        return int(self.rpc("status")["sync_info"]["latest_block_height"])

    # --- queries ------------------------------------------------------------------------

    def query_raw(self, path: str, data: bytes = b"", prove: bool = False) -> tuple[int, bytes]:
        result = self.rpc(
            "abci_query",
            path=f'"{path}"',
            data="0x" + data.hex(),
            prove="true" if prove else "false",
        )["response"]
        code = int(result.get("code", 0))
        if code:
            raise QueryError(code, result.get("log", ""))
        value = base64.b64decode(result.get("value") or "")
        return int(result.get("height", 0)), value

    def query(self, path: str, data: str | bytes = b"", kind: type[T] | None = None) -> Any:
        raw = data.encode() if isinstance(data, str) else data
        _, value = self.query_raw(path, raw)
        return (
            msgspec.json.decode(value, type=kind)
            if kind is not None
            else msgspec.json.decode(value)
        )

    def query_found(self, path: str, data: str | bytes, kind: type[T]) -> T | None:
        """`query`, or None when the ledger answers that the thing asked for does not exist
        (any other refusal still raises)."""
        try:
            found: T = self.query(path, data, kind)
        except QueryError as exc:
            if exc.code == Code.NOT_FOUND:
                return None
            raise
        return found

    def next_nonce(self, member_id: str) -> int:
        return int(self.query("/nonce", member_id)["next"])

    def verified_header(self, height: int, wait: float = 15.0) -> VerifiedHeader:
        """The header at `height`, checked against its commit signatures."""
        deadline = time.monotonic() + wait
        while self.height() < height:
            if time.monotonic() > deadline:
                raise ClientError(f"block {height} was not committed within {wait}s")
            time.sleep(0.1)
        commit = self.rpc("commit", height=height)
        validators = self.rpc("validators", height=height, per_page=100)
        try:
            header = verify_commit(self.chain_id, commit, validators)
        except LightClientError as exc:
            raise ProofError(f"header {height} does not verify: {exc}") from None
        if self.trusted_validators is not None:
            trusted_total = sum(self.trusted_validators.values())
            trusted_signed = sum(self.trusted_validators.get(k, 0) for k in header.signers)
            if 3 * trusted_signed <= trusted_total:
                raise ProofError(
                    f"header {height}: only {trusted_signed}/{trusted_total} of the trusted"
                    " validators' power signed it (more than 1/3 is needed)"
                )
            self.trusted_validators = {
                base64.b64decode(v["pub_key"]["value"]): int(v["voting_power"])
                for v in validators["validators"]
            }
        return header

    def verified_state(self, key: bytes) -> VerifiedValue:
        """Read one state key with a proof, and check it against the app hash in the next
        block's header, which more than 2/3 of the validators signed."""
        height, raw = self.query_raw("/state", key, prove=True)
        answer = msgspec.json.decode(raw)
        proof = StateProof.from_json(answer["proof"])
        state_root = base64.b64decode(answer["state_root"])
        audit_root = base64.b64decode(answer["anchor_audit_root"])
        audit_size = int(answer["anchor_audit_size"])
        if proof.key != key:
            raise ProofError("the proof is for another key")
        if not verify_state_proof(state_root, proof, DEFAULT_DEPTH):
            raise ProofError(f"state proof for {key!r} does not verify against its state root")
        header = self.verified_header(height + 1)
        if app_hash_of(state_root, audit_root, audit_size) != header.app_hash:
            raise ProofError(
                f"state root at height {height} is not the one committed in header {height + 1}"
            )
        return VerifiedValue(proof.value, height, header)

    # --- transactions -------------------------------------------------------------------

    def broadcast(self, raw: bytes) -> str:
        """Send a signed transaction; returns its hash once the mempool accepted it."""
        # JSON-RPC over POST: a large transaction does not fit in a URL's query string.
        result = self.rpc_post("broadcast_tx_sync", tx=base64.b64encode(raw).decode())
        tx_hash = codec.tx_hash(raw).hex().upper()
        if int(result["code"]) != 0:
            raise TxRejected(int(result["code"]), result.get("log", ""), tx_hash)
        return tx_hash

    def tx_status(self, tx_hash: str) -> TxOutcome | None:
        """The committed result of a transaction, or None while it is not in a block."""
        try:
            result = self.rpc("tx", hash="0x" + tx_hash)
        except ClientError as exc:
            if "not found" in str(exc):
                return None
            raise
        tx_result = result["tx_result"]
        return TxOutcome(
            tx_hash, int(result["height"]), int(tx_result.get("code", 0)), tx_result.get("log", "")
        )

    def wait_for(self, tx_hash: str, timeout: float = 30.0) -> TxOutcome:
        deadline = time.monotonic() + timeout
        while True:
            outcome = self.tx_status(tx_hash)
            if outcome is not None:
                return outcome
            if time.monotonic() > deadline:
                raise ClientError(f"transaction {tx_hash[:16]} not committed within {timeout}s")
            time.sleep(0.1)

    def submit(
        self,
        keys: KeyPair,
        tx_type: str,
        body: object,
        *,
        sender: str = "",
        timeout: float = 30.0,
        check: bool = True,
    ) -> TxOutcome:
        """Sign, send and wait for a transaction; raise TxRejected if it failed (with check)."""
        sender_id = sender or keys.member_id
        tx_hash = self.send(keys, tx_type, body, sender=sender_id)
        return self.outcome_of(tx_hash, sender_id, timeout=timeout, check=check)

    def send(self, keys: KeyPair, tx_type: str, body: object, *, sender: str = "") -> str:
        """Sign and send a transaction without waiting for its block; its hash, once the
        mempool took it. Transactions sent for one sender get consecutive nonces, so a later
        one may rely on an earlier one that is still in the mempool (they execute in order)."""
        sender_id = sender or keys.member_id
        with self._nonce_lock:
            nonce = max(self.next_nonce(sender_id), self._sent_nonces.get(sender_id, 0) + 1)
            raw = sign_transaction(keys, self.chain_id, nonce, tx_type, body, sender=sender_id)
            try:
                tx_hash = self.broadcast(raw)
            except ClientError:
                self._sent_nonces.pop(sender_id, None)
                raise
            self._sent_nonces[sender_id] = nonce
        return tx_hash

    def outcome_of(
        self, tx_hash: str, sender: str, *, timeout: float = 30.0, check: bool = True
    ) -> TxOutcome:
        """Wait for a transaction `send` sent for `sender`; TxRejected if it failed (with
        check)."""
        sender_id = sender
        outcome = self.wait_for(tx_hash, timeout)
        if not outcome.ok and outcome.code != Code.ACCESS_DENIED:
            # A refused transaction leaves its nonce unused: start again from the chain's.
            # (A denied access request is a recorded decision and did use its nonce.)
            with self._nonce_lock:
                self._sent_nonces.pop(sender_id, None)
        if check and not outcome.ok:
            raise TxRejected(outcome.code, outcome.log, tx_hash, outcome.height)
        return outcome
