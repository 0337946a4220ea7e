"""`medledger portal add-key / list-keys / remove-key`."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner

from medledger.cli.portal import portal
from medledger.config import NodeConfig, write_node_config
from medledger.crypto.keystore import Keyring, load_keystore


def _node(tmp_path: Path) -> Path:
    home = tmp_path / "node0"
    write_node_config(
        NodeConfig(home=home, moniker="node0", chain_id="c", api_listen="127.0.0.1:26602")
    )
    return home


def test_add_key_copies_the_sealed_keystore_and_says_where_to_sign_in(tmp_path: Path) -> None:
    home = _node(tmp_path)
    ring = Keyring(tmp_path / "mine")
    keys = ring.create("patient-ana", "her passphrase", fast=True)
    runner = CliRunner()
    result = runner.invoke(
        portal, ["add-key", "--home", str(home), str(ring.path_for("patient-ana"))]
    )
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:26602/portal/" in result.output and keys.member_id in result.output
    copied = home / "portal-keys" / "patient-ana.json"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert stat.S_IMODE(copied.parent.stat().st_mode) == 0o700
    # Still sealed with the member's own passphrase.
    assert load_keystore(copied, "her passphrase") == keys
    again = runner.invoke(
        portal, ["add-key", "--home", str(home), str(ring.path_for("patient-ana"))]
    )
    assert again.exit_code == 1 and "--replace" in again.output
    replaced = runner.invoke(
        portal, ["add-key", "--home", str(home), "--replace", str(ring.path_for("patient-ana"))]
    )
    assert replaced.exit_code == 0
    listed = runner.invoke(portal, ["list-keys", "--home", str(home)])
    assert "patient-ana" in listed.output and keys.member_id in listed.output
    removed = runner.invoke(portal, ["remove-key", "--home", str(home), "patient-ana"])
    assert removed.exit_code == 0 and not copied.exists()


def test_add_key_refuses_what_is_not_a_keystore_or_a_node(tmp_path: Path) -> None:
    home = _node(tmp_path)
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    result = CliRunner().invoke(portal, ["add-key", "--home", str(home), str(junk)])
    assert result.exit_code == 1 and "keystore" in result.output
    not_a_node = CliRunner().invoke(portal, ["add-key", "--home", str(tmp_path), str(junk)])
    assert not_a_node.exit_code == 1 and "node configuration" in not_a_node.output
