"""The ledger explorer: height and throughput, recent blocks, each block's transactions
(type, sender, result code and log — metadata only, the ledger's logs carry no PHI), the
validators with each node's health, and governance proposals with their votes.

It is for signed-in members of any role, not the public: the chain's metadata is shared among
the member organizations, and even metadata (who wrote about whom, when) is theirs to see, not
everyone's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from aiohttp import web

from medledger.client.lightclient import parse_timestamp
from medledger.client.sdk import QueryError
from medledger.ledger.errors import Code
from medledger.ledger.governance import Proposal
from medledger.ledger.model import Validator
from medledger.web.common import (
    Audience,
    PageError,
    context_of,
    render,
    require,
    run,
    when,
    whole_number,
)
from medledger.web.context import PortalContext

# Throughput is measured over the last THROUGHPUT_BLOCKS blocks; the page lists RECENT_BLOCKS.
THROUGHPUT_BLOCKS = 20
RECENT_BLOCKS = 10
HEALTH_TIMEOUT = 2.0


def code_name(code: int) -> str:
    try:
        return Code(code).name.lower().replace("_", " ")
    except ValueError:
        return f"code {code}"


def _rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of CometBFT's RFC 3339 block time."""
    stamp = parse_timestamp(text)
    return int(stamp.seconds) * 1_000_000_000 + int(stamp.nanos)


@dataclass(frozen=True)
class BlockRow:
    height: int
    time: str
    time_ns: int
    txs: int
    proposer: str
    hash: str


@dataclass(frozen=True)
class ValidatorRow:
    organization: str
    name: str
    address: str
    power: int
    api_url: str
    health: str
    height: int | None


@dataclass(frozen=True)
class Overview:
    chain_id: str
    height: int
    latest_time: str
    catching_up: bool
    blocks: list[BlockRow]
    throughput: float
    window_seconds: float
    window_txs: int
    window_blocks: int
    validators: list[ValidatorRow]
    proposals: list[Proposal]


def action_text(action: Any) -> str:
    """A governance action in words: its type and its fields (keys as hex prefixes)."""
    tag = getattr(type(action).__struct_config__, "tag", None) or type(action).__name__
    parts = []
    for name, value in msgspec.structs.asdict(action).items():
        shown = value.hex()[:16] + "…" if isinstance(value, bytes) else value
        parts.append(f"{name} = {shown}")
    return f"{tag}: {', '.join(parts)}"


def _address(pub_key: bytes) -> str:
    return hashlib.sha256(pub_key).digest()[:20].hex().upper()


def _overview(
    context: PortalContext,
) -> tuple[dict[str, Any], list[BlockRow], list[Validator], list[Proposal]]:
    reader = context.reader
    status = reader.rpc("status")
    height = int(status["sync_info"]["latest_block_height"])
    validators = reader.query("/validators", b"", list[Validator])
    by_address = {_address(v.pub_key): v.organization for v in validators}
    chain = reader.rpc(
        "blockchain", minHeight=max(1, height - THROUGHPUT_BLOCKS + 1), maxHeight=height
    )
    blocks = []
    for meta in chain.get("block_metas", []):
        header = meta["header"]
        proposer = str(header["proposer_address"])
        blocks.append(
            BlockRow(
                height=int(header["height"]),
                time=when(_rfc3339_ns(header["time"]), seconds=True),
                time_ns=_rfc3339_ns(header["time"]),
                txs=int(meta["num_txs"]),
                proposer=context.organization_name(by_address.get(proposer, proposer[:12])),
                hash=str(meta["block_id"]["hash"]),
            )
        )
    blocks.sort(key=lambda b: b.height, reverse=True)
    proposals = reader.query("/proposals", b"", list[Proposal])
    proposals.sort(key=lambda p: p.id, reverse=True)
    return status, blocks, validators, proposals


async def _health(url: str) -> tuple[str, int | None]:
    try:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT) as client:
            response = await client.get(f"{url.rstrip('/')}/health")
        if response.status_code != 200:
            return f"unhealthy (HTTP {response.status_code})", None
        return "ok", int(response.json().get("height", 0))
    except (httpx.HTTPError, ValueError):
        return "unreachable", None


async def overview(request: web.Request) -> web.StreamResponse:
    require(request, Audience.MEMBER)
    context = context_of(request)
    status, blocks, validators, proposals = await run(_overview, context)
    apis = {**context.peers, context.organization: context.api_url}
    checks = await asyncio.gather(
        *(
            _health(apis[v.organization]) if v.organization in apis else _unknown()
            for v in validators
        )
    )
    height = int(status["sync_info"]["latest_block_height"])
    rows = []
    for validator, (health, node_height) in zip(validators, checks, strict=True):
        if health == "ok" and node_height is not None and node_height < height - 2:
            health = f"behind by {height - node_height} blocks"
        rows.append(
            ValidatorRow(
                organization=validator.organization,
                name=context.organization_name(validator.organization),
                address=_address(validator.pub_key),
                power=validator.power,
                api_url=apis.get(validator.organization, ""),
                health=health,
                height=node_height,
            )
        )
    window_txs = sum(b.txs for b in blocks[:-1]) if len(blocks) > 1 else 0
    window = (blocks[0].time_ns - blocks[-1].time_ns) / 1e9 if len(blocks) > 1 else 0.0
    throughput = window_txs / (window / 60) if window > 0 else 0.0
    return render(
        request,
        "explorer/overview.html",
        overview=Overview(
            chain_id=str(status["node_info"]["network"]),
            height=height,
            latest_time=when(_rfc3339_ns(status["sync_info"]["latest_block_time"]), seconds=True),
            catching_up=bool(status["sync_info"]["catching_up"]),
            blocks=blocks[:RECENT_BLOCKS],
            throughput=throughput,
            window_seconds=window,
            window_txs=window_txs,
            window_blocks=len(blocks),
            validators=rows,
            proposals=proposals,
        ),
        total_power=sum(v.power for v in validators),
        action_text=action_text,
    )


async def _unknown() -> tuple[str, int | None]:
    return "no address known", None


@dataclass(frozen=True)
class TxRow:
    index: int
    hash: str
    type: str
    sender: str
    sender_role: str
    sender_organization: str
    code: int
    code_name: str
    log: str


def _block(context: PortalContext, height: int) -> dict[str, Any]:
    try:
        block = context.reader.query("/block", str(height))
    except QueryError:
        raise PageError(404, "No such block", f"Block {height} is not committed yet.") from None
    meta = context.reader.rpc("block", height=height)["block"]["header"]
    txs = []
    for index, (tx_hash, result) in enumerate(
        zip(block["tx_hashes"], block["results"], strict=True)
    ):
        code, log, tx_type, sender = result
        member = context.member(sender) if sender else None
        txs.append(
            TxRow(
                index=index,
                hash=str(tx_hash),
                type=str(tx_type),
                sender=str(sender),
                sender_role=str(member.role) if member else "",
                sender_organization=context.organization_name(member.organization)
                if member
                else "",
                code=int(code),
                code_name=code_name(int(code)),
                log=str(log),
            )
        )
    validators = context.reader.query("/validators", b"", list[Validator])
    by_address = {_address(v.pub_key): v.organization for v in validators}
    proposer = str(meta["proposer_address"])
    return {
        "height": height,
        "time": when(int(block["time_ns"]), seconds=True),
        "app_hash": base64.b64decode(block["app_hash"] or "").hex()
        if block.get("app_hash")
        else "",
        "proposer": context.organization_name(by_address.get(proposer, proposer)),
        "audit_size": int(block["audit_size"]),
        "txs": txs,
    }


async def block(request: web.Request) -> web.StreamResponse:
    require(request, Audience.MEMBER)
    height = whole_number(request.match_info["height"], "block height")
    details = await run(_block, context_of(request), height)
    return render(request, "explorer/block.html", block=details)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/explorer", overview)
    router.add_get("/explorer/blocks/{height}", block)
