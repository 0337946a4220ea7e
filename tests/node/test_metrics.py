"""The node's Prometheus counters count every transaction, however they are batched."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from medledger.ledger.errors import Code
from medledger.ledger.execution import TxResult
from medledger.metrics import Metrics


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_block_results_are_counted_by_type_and_code() -> None:
    metrics = Metrics()
    ok = TxResult(Code.OK, "", "member.rotate", "m1")
    refused = TxResult(Code.BAD_NONCE, "nonce", "member.rotate", "m1")
    undecodable = TxResult(Code.MALFORMED, "cannot decode")
    metrics.tx_results([ok, ok, refused, undecodable, ok])
    metrics.tx_results([refused])
    assert samples(metrics, "medledger_transactions_total") == {
        (("code", "0"), ("type", "member.rotate")): 3.0,
        (("code", str(int(Code.BAD_NONCE))), ("type", "member.rotate")): 2.0,
        (("code", str(int(Code.MALFORMED))), ("type", "invalid")): 1.0,
    }


def test_check_tx_answers_are_counted_by_code() -> None:
    metrics = Metrics()
    for result in [TxResult(Code.OK, ""), TxResult(Code.BAD_SIGNATURE, "x"), TxResult(Code.OK, "")]:
        metrics.check_tx(result)
    assert samples(metrics, "medledger_check_tx_total") == {
        (("code", "0"),): 2.0,
        (("code", str(int(Code.BAD_SIGNATURE))),): 1.0,
    }
