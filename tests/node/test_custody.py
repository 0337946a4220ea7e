"""Custodial keystores sealed under the node's custody key: no Argon2id per identity, and the
same protection against whoever copies the custody directory without the node passphrase."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest

from medledger.crypto.keystore import KeystoreError
from medledger.services.custody import CUSTODY_KEY_FILE, Custody, CustodyError

PASSPHRASE = "node passphrase"


def test_a_new_identity_is_sealed_under_the_custody_key_and_reopens_after_a_restart(
    tmp_path: Path,
) -> None:
    custody = Custody(tmp_path / "custody", PASSPHRASE, fast_kdf=True)
    keys = custody.create("patient-1")
    document = json.loads((tmp_path / "custody" / "patient-1.json").read_text())
    assert document["kdf"]["name"] == "custody-key"
    assert "salt" not in document["kdf"]
    assert keys.signing_seed.hex() not in json.dumps(document)
    for path in (tmp_path / "custody" / "patient-1.json", tmp_path / "custody" / CUSTODY_KEY_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The custody key file is not an identity.
    assert [p.name for p in custody.members()] == ["patient-1"]
    restarted = Custody(tmp_path / "custody", PASSPHRASE)
    assert restarted.unlock_all() == 1
    assert restarted.keys_for(keys.member_id) == keys


def test_without_the_node_passphrase_nothing_opens(tmp_path: Path) -> None:
    keys = Custody(tmp_path / "custody", PASSPHRASE, fast_kdf=True).create("patient-2")
    thief = Custody(tmp_path / "custody", "a guess")
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        thief.unlock_all()
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        thief.keys_for(keys.member_id)


def test_a_keystore_from_another_nodes_custody_is_refused(tmp_path: Path) -> None:
    ours = Custody(tmp_path / "ours", PASSPHRASE, fast_kdf=True)
    ours.create("patient-ours")
    theirs = Custody(tmp_path / "theirs", PASSPHRASE, fast_kdf=True)
    planted = theirs.create("patient-theirs")
    (tmp_path / "ours" / "patient-theirs.json").write_bytes(
        (tmp_path / "theirs" / "patient-theirs.json").read_bytes()
    )
    with pytest.raises(KeystoreError, match="another custody key"):
        Custody(tmp_path / "ours", PASSPHRASE).keys_for(planted.member_id)


def test_a_tampered_keystore_is_refused(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "custody", PASSPHRASE, fast_kdf=True)
    keys = custody.create("patient-3")
    path = tmp_path / "custody" / "patient-3.json"
    document = json.loads(path.read_text())
    ciphertext = bytearray.fromhex(document["ciphertext"])
    ciphertext[0] ^= 1
    document["ciphertext"] = ciphertext.hex()
    path.write_text(json.dumps(document))
    with pytest.raises(KeystoreError, match="corrupted"):
        Custody(tmp_path / "custody", PASSPHRASE).keys_for(keys.member_id)


def test_keystores_sealed_under_the_passphrase_still_open(tmp_path: Path) -> None:
    """Custody directories from before the custody key keep working."""
    custody = Custody(tmp_path / "custody", PASSPHRASE, fast_kdf=True)
    legacy = custody.ring.create("ehr-legacy", PASSPHRASE, fast=True)
    fresh = custody.create("patient-new")
    restarted = Custody(tmp_path / "custody", PASSPHRASE)
    assert restarted.unlock_all() == 2
    assert restarted.keys_for(legacy.member_id) == legacy
    assert restarted.keys_for(fresh.member_id) == fresh


def test_identities_are_created_concurrently_and_names_stay_unique(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "custody", PASSPHRASE, fast_kdf=True)
    created: list[str] = []
    errors: list[Exception] = []

    def register(i: int) -> None:
        try:
            created.append(custody.create(f"patient-{i % 6}").member_id)
        except KeystoreError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each name is taken once; the second attempt at a name is refused, never overwrites.
    assert len(created) == 6 and len(errors) == 6
    assert all("already exists" in str(e) for e in errors)
    restarted = Custody(tmp_path / "custody", PASSPHRASE)
    assert restarted.unlock_all() == 6
    assert {restarted.keys_for(m).member_id for m in created} == set(created)
    with pytest.raises(CustodyError):
        restarted.keys_for("nobody")
