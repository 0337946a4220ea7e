"""The ABCI adapter: framing that survives split reads, in-order answers, nonce-ordered
proposals."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import CHAIN_ID, keys_for
from hypothesis import given
from hypothesis import strategies as st
from tendermint.abci import types_pb2 as abci

from medledger.abci.application import LedgerApplication
from medledger.abci.framing import FrameDecoder, encode_uvarint
from medledger.abci.server import AbciServer
from medledger.client.tx import sign_transaction
from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.execution import order_by_nonce
from medledger.store.sqlite import SqliteStore


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), max_size=20))
def test_frames_survive_any_split(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_uvarint(len(f)) + f for f in frames)
    decoder = FrameDecoder()
    seen: list[bytes] = []
    position = 0
    for cut in cuts:
        seen += decoder.feed(stream[position : position + cut])
        position += cut
    seen += decoder.feed(stream[position:])
    assert seen == frames


def test_proposals_put_each_senders_transactions_in_nonce_order() -> None:
    a, b = keys_for("a"), keys_for("b")
    tx = lambda keys, n: sign_transaction(keys, CHAIN_ID, n, "member.rotate", {"n": n})  # noqa: E731
    txs = [tx(a, 3), tx(b, 2), b"junk", tx(a, 1), tx(b, 1), tx(a, 2)]
    ordered = order_by_nonce(txs)
    senders = []
    for raw in ordered:
        if raw == b"junk":
            senders.append(("junk", 0))
            continue
        envelope = codec.decode(raw, Envelope)
        senders.append((envelope.sender, envelope.nonce))
    assert senders == [
        (a.member_id, 1),
        (b.member_id, 1),
        ("junk", 0),
        (a.member_id, 2),
        (b.member_id, 2),
        (a.member_id, 3),
    ]


async def test_server_answers_in_order_over_a_real_socket(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    app = LedgerApplication(store)
    socket_path = tmp_path / "abci.sock"
    server = AbciServer(app, socket_path)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        requests = [
            abci.Request(echo=abci.RequestEcho(message="one")),
            abci.Request(info=abci.RequestInfo()),
            abci.Request(echo=abci.RequestEcho(message="two")),
            abci.Request(flush=abci.RequestFlush()),
        ]
        payload = b"".join(
            encode_uvarint(len(r.SerializeToString())) + r.SerializeToString() for r in requests
        )
        # Written one byte at a time: the server must reassemble the frames.
        for byte in payload:
            writer.write(bytes([byte]))
            await writer.drain()
        decoder = FrameDecoder()
        answers: list[abci.Response] = []
        while len(answers) < len(requests):
            answers += [abci.Response.FromString(f) for f in decoder.feed(await reader.read(4096))]
        kinds = [a.WhichOneof("value") for a in answers]
        assert kinds == ["echo", "info", "echo", "flush"]
        assert answers[0].echo.message == "one" and answers[2].echo.message == "two"
        writer.close()
    finally:
        await server.stop()
        store.close()
