"""An asyncio ABCI 2.0 server over a Unix socket.

CometBFT opens four connections (consensus, mempool, query, snapshot). Each is read as a stream
of length-prefixed requests, answered strictly in order; handlers are synchronous and the event
loop runs one at a time, so the application never sees two requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Protocol

from tendermint.abci import types_pb2 as abci

from medledger.abci.framing import FrameDecoder, encode_uvarint

log = logging.getLogger("medledger.abci")


class Application(Protocol):
    """What the server dispatches to: one method per ABCI request it answers."""

    def info(self, req: abci.RequestInfo) -> abci.ResponseInfo: ...
    def init_chain(self, req: abci.RequestInitChain) -> abci.ResponseInitChain: ...
    def query(self, req: abci.RequestQuery) -> abci.ResponseQuery: ...
    def check_tx(self, req: abci.RequestCheckTx) -> abci.ResponseCheckTx: ...
    def prepare_proposal(
        self, req: abci.RequestPrepareProposal
    ) -> abci.ResponsePrepareProposal: ...
    def process_proposal(
        self, req: abci.RequestProcessProposal
    ) -> abci.ResponseProcessProposal: ...
    def finalize_block(self, req: abci.RequestFinalizeBlock) -> abci.ResponseFinalizeBlock: ...
    def commit(self, req: abci.RequestCommit) -> abci.ResponseCommit: ...
    def list_snapshots(self, req: abci.RequestListSnapshots) -> abci.ResponseListSnapshots: ...
    def load_snapshot_chunk(
        self, req: abci.RequestLoadSnapshotChunk
    ) -> abci.ResponseLoadSnapshotChunk: ...
    def offer_snapshot(self, req: abci.RequestOfferSnapshot) -> abci.ResponseOfferSnapshot: ...
    def apply_snapshot_chunk(
        self, req: abci.RequestApplySnapshotChunk
    ) -> abci.ResponseApplySnapshotChunk: ...


def dispatch(app: Application, request: abci.Request) -> abci.Response:
    """Answer one request. Vote-extension requests get the neutral answers of an application
    that adds no vote extensions."""
    kind = request.WhichOneof("value")
    match kind:
        case "echo":
            return abci.Response(echo=abci.ResponseEcho(message=request.echo.message))
        case "flush":
            return abci.Response(flush=abci.ResponseFlush())
        case "info":
            return abci.Response(info=app.info(request.info))
        case "init_chain":
            return abci.Response(init_chain=app.init_chain(request.init_chain))
        case "query":
            return abci.Response(query=app.query(request.query))
        case "check_tx":
            return abci.Response(check_tx=app.check_tx(request.check_tx))
        case "prepare_proposal":
            return abci.Response(prepare_proposal=app.prepare_proposal(request.prepare_proposal))
        case "process_proposal":
            return abci.Response(process_proposal=app.process_proposal(request.process_proposal))
        case "finalize_block":
            return abci.Response(finalize_block=app.finalize_block(request.finalize_block))
        case "commit":
            return abci.Response(commit=app.commit(request.commit))
        case "extend_vote":
            return abci.Response(extend_vote=abci.ResponseExtendVote())
        case "verify_vote_extension":
            return abci.Response(
                verify_vote_extension=abci.ResponseVerifyVoteExtension(
                    status=abci.ResponseVerifyVoteExtension.ACCEPT
                )
            )
        case "list_snapshots":
            return abci.Response(list_snapshots=app.list_snapshots(request.list_snapshots))
        case "offer_snapshot":
            return abci.Response(offer_snapshot=app.offer_snapshot(request.offer_snapshot))
        case "load_snapshot_chunk":
            return abci.Response(
                load_snapshot_chunk=app.load_snapshot_chunk(request.load_snapshot_chunk)
            )
        case "apply_snapshot_chunk":
            return abci.Response(
                apply_snapshot_chunk=app.apply_snapshot_chunk(request.apply_snapshot_chunk)
            )
    return abci.Response(exception=abci.ResponseException(error=f"unknown request {kind}"))


class AbciServer:
    def __init__(self, app: Application, socket_path: Path) -> None:
        self.app = app
        self.socket_path = socket_path
        self._server: asyncio.AbstractServer | None = None
        self.fatal: asyncio.Future[BaseException] | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.fatal = asyncio.get_running_loop().create_future()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        log.info("abci server listening", extra={"socket": str(self.socket_path)})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        try:
            while data := await reader.read(1 << 20):
                # Answers to every request that arrived in one read go out in one write.
                answers: list[bytes] = []
                flush = False
                for frame in decoder.feed(data):
                    request = abci.Request.FromString(frame)
                    try:
                        response = dispatch(self.app, request)
                    except Exception as exc:
                        # A failure while executing consensus requests must stop the node
                        # rather than let it diverge; CometBFT stops on an exception response.
                        log.exception("abci request failed")
                        response = abci.Response(exception=abci.ResponseException(error=str(exc)))
                        if self.fatal is not None and not self.fatal.done():
                            self.fatal.set_result(exc)
                    payload = response.SerializeToString()
                    answers.append(encode_uvarint(len(payload)) + payload)
                    flush = flush or request.WhichOneof("value") == "flush"
                if answers:
                    writer.write(b"".join(answers))
                if flush:
                    await writer.drain()
        except (ConnectionResetError, BrokenPipeError, ValueError) as exc:
            log.warning("abci connection closed", extra={"reason": str(exc)})
        finally:
            writer.close()
