"""Building signed transactions on the client side, where the keys are."""

from __future__ import annotations

from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.codec import Envelope


def sign_transaction(
    keys: KeyPair, chain_id: str, nonce: int, tx_type: str, body: object, *, sender: str = ""
) -> bytes:
    """The canonical bytes of a transaction signed by `keys`. `sender` defaults to the id the
    keys derive; after a key rotation it is the member's original id."""
    unsigned = Envelope(chain_id, sender or keys.member_id, nonce, tx_type, codec.encode(body), b"")
    signature = keys.sign(unsigned.sign_bytes())
    return codec.encode(
        Envelope(
            unsigned.chain_id,
            unsigned.sender,
            unsigned.nonce,
            unsigned.type,
            unsigned.body,
            signature,
        )
    )
