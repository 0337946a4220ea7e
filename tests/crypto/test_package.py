from __future__ import annotations

import itertools
from dataclasses import dataclass

import msgspec
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medledger.crypto.keys import KeyPair
from medledger.crypto.package import (
    Custodian,
    PackageError,
    RecordPackage,
    SealedRecord,
    Share,
    check_shares,
    combine_shares,
    decode_package,
    decrypt_record,
    open_custodian_share,
    open_envelope,
    package_digest,
    plaintext_commitment,
    reseal_share,
    seal_record,
    share_is_valid,
    unseal_share,
)
from medledger.ledger.records import threshold_for

PLAINTEXT = b'{"resourceType":"Observation","status":"final","code":{"text":"glucose"}}'
ORGS = ["st-mary", "riverside", "northside-lab", "careplus"]


@dataclass
class World:
    patient: KeyPair
    author: KeyPair
    nodes: dict[str, KeyPair]
    grantee: KeyPair

    def custodians(self) -> list[Custodian]:
        return [
            Custodian(organization=org, index=i, encryption_key=self.nodes[org].encryption_key)
            for i, org in enumerate(self.nodes, start=1)
        ]

    def seal(self, plaintext: bytes = PLAINTEXT, **overrides: object) -> SealedRecord:
        args: dict[str, object] = {
            "record_id": "rec-1",
            "record_version": 1,
            "patient": self.patient.member_id,
            "author": self.author.member_id,
            "patient_key": self.patient.encryption_key,
            "author_key": self.author.encryption_key,
            "custodians": self.custodians(),
            "threshold": threshold_for(len(self.nodes)),
        }
        args.update(overrides)
        return seal_record(plaintext, **args)  # type: ignore[arg-type]

    def released_share(self, package: RecordPackage, org: str) -> Share:
        """A custodian opens its share and re-seals it to the grantee, who unseals it."""
        share = open_custodian_share(package, org, self.nodes[org].encryption_secret)
        return unseal_share(reseal_share(share, self.grantee.encryption_key), self.grantee_secret)

    @property
    def grantee_secret(self) -> bytes:
        return self.grantee.encryption_secret


def make_world(n: int = 4) -> World:
    orgs = ORGS if n == 4 else [f"org-{i}" for i in range(1, n + 1)]
    return World(
        patient=KeyPair.generate(),
        author=KeyPair.generate(),
        nodes={org: KeyPair.generate() for org in orgs},
        grantee=KeyPair.generate(),
    )


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def sealed(world: World) -> SealedRecord:
    return world.seal()


@pytest.fixture(scope="module")
def package(sealed: SealedRecord) -> RecordPackage:
    return decode_package(sealed.package)


def _flip(data: bytes, position: int = 0) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


# -- thresholds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "t"), [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (7, 3), (10, 4), (13, 5)]
)
def test_threshold_is_f_plus_one_and_never_one_of_several(n: int, t: int) -> None:
    assert threshold_for(n) == t


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_via_patient_envelope(
    world: World, sealed: SealedRecord, package: RecordPackage
) -> None:
    data_key = open_envelope(package, world.patient.encryption_secret)
    assert decrypt_record(package, data_key, sealed.commitment) == PLAINTEXT
    assert sealed.commitment == plaintext_commitment(data_key, PLAINTEXT)


def test_round_trip_via_author_envelope(
    world: World, sealed: SealedRecord, package: RecordPackage
) -> None:
    data_key = open_envelope(package, world.author.encryption_secret)
    assert decrypt_record(package, data_key, sealed.commitment) == PLAINTEXT


def test_package_fields_and_digest(world: World, sealed: SealedRecord) -> None:
    package = decode_package(sealed.package)
    assert sealed.digest == package_digest(sealed.package)
    assert len(sealed.digest) == 64
    assert package.version == 1
    assert (package.record_id, package.record_version) == ("rec-1", 1)
    assert (package.patient, package.author) == (world.patient.member_id, world.author.member_id)
    assert package.threshold == 2
    assert [(e.organization, e.index) for e in package.shares] == [
        (org, i) for i, org in enumerate(ORGS, start=1)
    ]
    assert PLAINTEXT not in sealed.package
    assert len(sealed.commitment) == 32


def test_every_seal_uses_a_fresh_key_and_nonce(world: World) -> None:
    first, second = world.seal(), world.seal()
    assert first.package != second.package
    assert first.commitment != second.commitment  # the commitment is keyed by K
    a, b = decode_package(first.package), decode_package(second.package)
    assert a.nonce != b.nonce
    assert open_envelope(a, world.patient.encryption_secret) != open_envelope(
        b, world.patient.encryption_secret
    )


@pytest.mark.parametrize("size", [2, 3, 4])
def test_any_t_of_n_shares_recover_the_key(
    world: World, sealed: SealedRecord, package: RecordPackage, size: int
) -> None:
    released = {org: world.released_share(package, org) for org in ORGS}
    expected = open_envelope(package, world.patient.encryption_secret)
    for subset in itertools.combinations(ORGS, size):
        data_key = combine_shares(package, [released[org] for org in subset])
        assert data_key == expected, subset
        assert decrypt_record(package, data_key, sealed.commitment) == PLAINTEXT


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plaintext=st.binary(max_size=2048),
    n=st.integers(min_value=1, max_value=7),
    data=st.data(),
)
def test_round_trip_property(plaintext: bytes, n: int, data: st.DataObject) -> None:
    world = make_world(n)
    threshold = data.draw(st.integers(min_value=1, max_value=n), label="threshold")
    sealed = world.seal(plaintext, threshold=threshold)
    package = decode_package(sealed.package)
    orgs = data.draw(
        st.lists(st.sampled_from(list(world.nodes)), min_size=threshold, unique=True),
        label="custodians",
    )
    shares = [world.released_share(package, org) for org in orgs]
    data_key = combine_shares(package, shares)
    assert decrypt_record(package, data_key, sealed.commitment) == plaintext
    assert open_envelope(package, world.patient.encryption_secret) == data_key


# -- custody: no single custodian can read ------------------------------------------------------


def test_one_custodian_alone_cannot_recover_the_key(
    world: World, sealed: SealedRecord, package: RecordPackage
) -> None:
    org = ORGS[0]
    node_secret = world.nodes[org].encryption_secret
    share = open_custodian_share(package, org, node_secret)

    with pytest.raises(PackageError, match="need 2 valid shares"):
        combine_shares(package, [share])
    with pytest.raises(PackageError, match="neither the patient nor the author"):
        open_envelope(package, node_secret)

    # Interpolating the lone share anyway (t-1 points) gives a key that does not decrypt.
    guess = Shamir.combine([(share.index, share.value[:16])]) + Shamir.combine(
        [(share.index, share.value[16:])]
    )
    assert guess != open_envelope(package, world.patient.encryption_secret)
    with pytest.raises(PackageError, match="does not authenticate"):
        decrypt_record(package, guess, sealed.commitment)


def test_custodian_cannot_open_another_custodians_share(
    world: World, package: RecordPackage
) -> None:
    with pytest.raises(PackageError, match="does not open"):
        open_custodian_share(package, ORGS[1], world.nodes[ORGS[0]].encryption_secret)
    with pytest.raises(PackageError, match="no share for organization"):
        open_custodian_share(package, "nobody", world.nodes[ORGS[0]].encryption_secret)


def test_released_share_opens_only_for_its_recipient(world: World, package: RecordPackage) -> None:
    share = open_custodian_share(package, ORGS[0], world.nodes[ORGS[0]].encryption_secret)
    sealed = reseal_share(share, world.grantee.encryption_key)
    assert unseal_share(sealed, world.grantee.encryption_secret) == share
    with pytest.raises(PackageError):
        unseal_share(sealed, world.patient.encryption_secret)
    with pytest.raises(PackageError):
        unseal_share(_flip(sealed, 40), world.grantee.encryption_secret)


# -- wrong shares are detected before combining ---------------------------------------------------


def test_wrong_shares_are_detected_and_a_read_still_succeeds(
    world: World, sealed: SealedRecord, package: RecordPackage
) -> None:
    good = [world.released_share(package, org) for org in ORGS]
    tampered = Share(index=good[0].index, value=_flip(good[0].value, 5))
    wrong_index = Share(index=good[2].index, value=good[1].value)  # share 2's bytes claimed as 3
    unknown_index = Share(index=9, value=good[3].value)
    other_record = decode_package(world.seal().package)
    foreign = open_custodian_share(other_record, ORGS[3], world.nodes[ORGS[3]].encryption_secret)

    for bad in (tampered, wrong_index, unknown_index, foreign):
        assert not share_is_valid(package, bad)
    assert all(share_is_valid(package, share) for share in good)

    check = check_shares(package, [tampered, wrong_index, good[1], good[3], foreign])
    assert [s.index for s in check.valid] == [2, 4]
    assert check.invalid == (1, 3, 4)

    data_key = combine_shares(package, [tampered, wrong_index, foreign, good[1], good[3]])
    assert decrypt_record(package, data_key, sealed.commitment) == PLAINTEXT

    with pytest.raises(PackageError, match=r"have 1; invalid shares: 1, 3"):
        combine_shares(package, [tampered, wrong_index, good[1]])


def test_duplicate_shares_count_once(world: World, package: RecordPackage) -> None:
    share = world.released_share(package, ORGS[0])
    with pytest.raises(PackageError, match="have 1"):
        combine_shares(package, [share, share])


def test_swapped_sealed_share_is_refused(world: World, package: RecordPackage) -> None:
    """A custodian handed a share sealed for it but belonging to another index refuses it."""
    entries = list(package.shares)
    other = decode_package(world.seal().package)
    entries[0] = msgspec.structs.replace(entries[0], sealed=other.shares[0].sealed)
    swapped = msgspec.structs.replace(package, shares=tuple(entries))
    with pytest.raises(PackageError, match="does not match its commitment"):
        open_custodian_share(swapped, ORGS[0], world.nodes[ORGS[0]].encryption_secret)


# -- tampering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"record_id": "rec-2"},
        {"record_version": 2},
        {"patient": "0" * 40},
        {"author": "1" * 40},
    ],
)
def test_tampered_associated_data_fails(
    world: World, sealed: SealedRecord, package: RecordPackage, change: dict[str, object]
) -> None:
    data_key = open_envelope(package, world.patient.encryption_secret)
    tampered = msgspec.structs.replace(package, **change)
    with pytest.raises(PackageError, match="does not authenticate"):
        decrypt_record(tampered, data_key, sealed.commitment)


@settings(max_examples=30, deadline=None)
@given(position=st.integers(min_value=0), field=st.sampled_from(["ciphertext", "nonce"]))
def test_tampered_ciphertext_or_nonce_fails(position: int, field: str) -> None:
    world = _PROPERTY_WORLD
    package = decode_package(_PROPERTY_SEALED.package)
    original: bytes = getattr(package, field)
    tampered = msgspec.structs.replace(
        package, **{field: _flip(original, position % len(original))}
    )
    data_key = open_envelope(package, world.patient.encryption_secret)
    with pytest.raises(PackageError, match="does not authenticate"):
        decrypt_record(tampered, data_key, _PROPERTY_SEALED.commitment)


def test_wrong_commitment_fails(world: World, sealed: SealedRecord, package: RecordPackage) -> None:
    data_key = open_envelope(package, world.patient.encryption_secret)
    with pytest.raises(PackageError, match="on-chain plaintext commitment"):
        decrypt_record(package, data_key, _flip(sealed.commitment))
    with pytest.raises(PackageError, match="on-chain plaintext commitment"):
        decrypt_record(package, data_key, plaintext_commitment(data_key, PLAINTEXT + b" "))


def test_wrong_key_fails(sealed: SealedRecord, package: RecordPackage) -> None:
    with pytest.raises(PackageError, match="does not authenticate"):
        decrypt_record(package, bytes(32), sealed.commitment)
    with pytest.raises(PackageError, match="32 bytes"):
        decrypt_record(package, b"short", sealed.commitment)


def test_commitment_is_keyed() -> None:
    key_a, key_b = bytes(range(32)), bytes(range(1, 33))
    assert plaintext_commitment(key_a, b"x") == plaintext_commitment(key_a, b"x")
    assert plaintext_commitment(key_a, b"x") != plaintext_commitment(key_b, b"x")
    assert plaintext_commitment(key_a, b"x") != plaintext_commitment(key_a, b"y")


# -- encoding -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_is_a_package_error(data: bytes) -> None:
    with pytest.raises(PackageError):
        decode_package(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\xc1", msgspec.msgpack.encode({"version": 1}), msgspec.msgpack.encode([1])],
)
def test_malformed_packages_are_refused(data: bytes) -> None:
    with pytest.raises(PackageError, match="not a record package"):
        decode_package(data)


def test_truncated_and_non_canonical_packages_are_refused(sealed: SealedRecord) -> None:
    with pytest.raises(PackageError):
        decode_package(sealed.package[:-1])
    with pytest.raises(PackageError):
        decode_package(sealed.package + b"\x00")
    # The same package as a msgpack map instead of the canonical array.
    as_map = msgspec.msgpack.encode(msgspec.structs.asdict(decode_package(sealed.package)))
    with pytest.raises(PackageError):
        decode_package(as_map)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "unsupported package version"),
        ({"nonce": bytes(12)}, "nonce"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 5}, "threshold"),
        ({"record_id": ""}, "record_id"),
        ({"record_version": -1}, "record_version"),
        ({"patient_envelope": b"x"}, "patient envelope"),
        ({"shares": ()}, "1 to 255 shares"),
    ],
)
def test_structurally_invalid_packages_are_refused(
    package: RecordPackage, change: dict[str, object], message: str
) -> None:
    encoded = msgspec.msgpack.encode(msgspec.structs.replace(package, **change))
    with pytest.raises(PackageError, match=message):
        decode_package(encoded)


def test_reordered_shares_are_refused(package: RecordPackage) -> None:
    encoded = msgspec.msgpack.encode(
        msgspec.structs.replace(package, shares=tuple(reversed(package.shares)))
    )
    with pytest.raises(PackageError, match="share indices"):
        decode_package(encoded)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0))
def test_digest_changes_with_any_byte(position: int) -> None:
    data = _PROPERTY_SEALED.package
    changed = _flip(data, position % len(data))
    assert package_digest(changed) != _PROPERTY_SEALED.digest
    try:
        decoded = decode_package(changed)
    except PackageError:
        return
    assert decoded != decode_package(data)


# -- sealing arguments ------------------------------------------------------------------------


def test_seal_checks_its_arguments(world: World) -> None:
    custodians = world.custodians()
    with pytest.raises(PackageError, match="threshold"):
        world.seal(threshold=0)
    with pytest.raises(PackageError, match="threshold"):
        world.seal(threshold=5)
    with pytest.raises(PackageError, match="indices"):
        world.seal(custodians=[*custodians[:3], Custodian("x", 7, custodians[3].encryption_key)])
    with pytest.raises(PackageError, match="distinct"):
        world.seal(custodians=[*custodians[:3], Custodian("st-mary", 4, b"\x01" * 32)])
    with pytest.raises(PackageError, match="custodians"):
        world.seal(custodians=[])
    with pytest.raises(PackageError, match="patient encryption key"):
        world.seal(patient_key=b"short")
    with pytest.raises(PackageError, match="record_id"):
        world.seal(record_id="")


def test_custodians_may_be_listed_in_any_order(world: World) -> None:
    sealed = world.seal(custodians=list(reversed(world.custodians())))
    package = decode_package(sealed.package)
    assert [e.organization for e in package.shares] == ORGS
    shares = [world.released_share(package, org) for org in ORGS[2:]]
    data_key = combine_shares(package, shares)
    assert decrypt_record(package, data_key, sealed.commitment) == PLAINTEXT


_PROPERTY_WORLD = make_world()
_PROPERTY_SEALED = _PROPERTY_WORLD.seal()
