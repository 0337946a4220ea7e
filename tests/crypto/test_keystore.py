from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from medledger.crypto.keys import KeyPair, member_id_for
from medledger.crypto.keystore import (
    Keyring,
    KeystoreError,
    load_keystore,
    read_public,
    save_keystore,
)

PASS = "correct horse battery staple"


def _write(path: Path, keys: KeyPair, name: str = "alice") -> None:
    save_keystore(path, name, keys, PASS, fast=True)


def _edit(path: Path, change: Any) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_round_trip(tmp_path: Path) -> None:
    keys = KeyPair.generate()
    path = tmp_path / "alice.json"
    _write(path, keys)

    assert load_keystore(path, PASS) == keys

    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["kdf"]["name"] == "argon2id"
    assert document["cipher"] == "xsalsa20poly1305"
    assert keys.signing_seed.hex() not in path.read_text()
    assert keys.encryption_secret.hex() not in path.read_text()

    public = read_public(path)
    assert public.name == "alice"
    assert public.verify_key == keys.verify_key
    assert public.encryption_key == keys.encryption_key
    assert public.member_id == keys.member_id == member_id_for(keys.verify_key)


def test_default_cost_is_moderate(tmp_path: Path) -> None:
    import nacl.pwhash.argon2id as argon2id

    from medledger.crypto.keystore import encode_keystore

    document = json.loads(encode_keystore("alice", KeyPair.generate(), PASS))
    assert document["kdf"]["opslimit"] == argon2id.OPSLIMIT_MODERATE
    assert document["kdf"]["memlimit"] == argon2id.MEMLIMIT_MODERATE


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        load_keystore(path, PASS + "!")
    with pytest.raises(KeystoreError) as info:
        load_keystore(path, "")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "salt"])
def test_tampered_sealed_part(tmp_path: Path, field: str) -> None:
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())

    def flip(document: dict[str, Any]) -> None:
        holder = document["kdf"] if field == "salt" else document
        raw = bytearray(bytes.fromhex(holder[field]))
        raw[len(raw) // 2] ^= 0x01
        holder[field] = raw.hex()

    _edit(path, flip)
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        load_keystore(path, PASS)


def test_tampered_kdf_parameter(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())
    _edit(path, lambda d: d["kdf"].__setitem__("opslimit", d["kdf"]["opslimit"] + 1))
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        load_keystore(path, PASS)


def test_hostile_kdf_parameter_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())
    _edit(path, lambda d: d["kdf"].__setitem__("memlimit", 1 << 40))
    with pytest.raises(KeystoreError, match="memlimit"):
        load_keystore(path, PASS)


def test_tampered_public_field(tmp_path: Path) -> None:
    mallory = KeyPair.generate()
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())

    # Swap in another participant's public identity, consistently, so that only the sealed
    # copy can reveal it.
    def swap(document: dict[str, Any]) -> None:
        document["verify_key"] = mallory.verify_key.hex()
        document["member_id"] = mallory.member_id
        document["encryption_key"] = mallory.encryption_key.hex()

    _edit(path, swap)
    assert read_public(path).verify_key == mallory.verify_key
    with pytest.raises(KeystoreError, match="tampered"):
        load_keystore(path, PASS)


def test_renamed_public_name_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())
    _edit(path, lambda d: d.__setitem__("name", "bob"))
    with pytest.raises(KeystoreError, match="tampered"):
        load_keystore(path, PASS)


def test_inconsistent_member_id_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    _write(path, KeyPair.generate())
    _edit(path, lambda d: d.__setitem__("member_id", "00" * 20))
    with pytest.raises(KeystoreError, match="member_id"):
        read_public(path)


def test_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    first = KeyPair.generate()
    _write(path, first)
    before = path.read_bytes()
    with pytest.raises(KeystoreError, match="refusing to overwrite"):
        _write(path, KeyPair.generate())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["alice.json"]

    second = KeyPair.generate()
    save_keystore(path, "alice", second, PASS, fast=True, overwrite=True)
    assert load_keystore(path, PASS) == second


def test_permissions(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        path = tmp_path / "alice.json"
        _write(path, KeyPair.generate())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    ring = Keyring(tmp_path / "ring")
    ring.create("bob", PASS, fast=True)
    assert stat.S_IMODE(ring.path_for("bob").stat().st_mode) == 0o600
    assert stat.S_IMODE(ring.directory.stat().st_mode) & 0o077 == 0


def test_keyring(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "keys")
    assert ring.list() == []

    bob = ring.create("bob", PASS, fast=True)
    alice = ring.create("alice", "another passphrase", fast=True)

    listed = ring.list()
    assert [p.name for p in listed] == ["alice", "bob"]
    assert [p.member_id for p in listed] == [alice.member_id, bob.member_id]
    assert ring.path_for("alice") == tmp_path / "keys" / "alice.json"
    assert ring.load("bob", PASS) == bob
    assert ring.load("alice", "another passphrase") == alice

    with pytest.raises(KeystoreError, match="refusing to overwrite"):
        ring.create("bob", PASS, fast=True)
    assert ring.load("bob", PASS) == bob

    # Leftover temporaries and unrelated files are not keystores.
    (ring.directory / ".carol.json.1234.tmp").write_text("partial")
    (ring.directory / "notes.txt").write_text("hello")
    assert [p.name for p in ring.list()] == ["alice", "bob"]


def test_keyring_rejects_unsafe_names(tmp_path: Path) -> None:
    ring = Keyring(tmp_path)
    for bad in ["", "../evil", "a/b", ".hidden", "x" * 65]:
        with pytest.raises(KeystoreError, match="invalid keystore name"):
            ring.path_for(bad)


def test_keyring_detects_renamed_file(tmp_path: Path) -> None:
    ring = Keyring(tmp_path)
    ring.create("alice", PASS, fast=True)
    ring.path_for("alice").rename(ring.path_for("bob"))
    with pytest.raises(KeystoreError, match="holds 'alice'"):
        ring.load("bob", PASS)
