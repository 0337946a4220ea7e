"""HOME/medledger.toml round-trips and rejects what is missing or invalid; find_cometbft."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import medledger
from medledger.config import (
    COMETBFT_ENV,
    CONFIG_ERROR_EXIT,
    ConfigError,
    NodeConfig,
    find_cometbft,
    load_node_config,
    write_node_config,
)
from medledger.crypto.keys import KeyPair
from medledger.hl7.config import Hl7Config
from medledger.node.services import (
    check_hl7_member,
    load_services_config,
    require_custodial_member,
)
from medledger.node.testnet import init_testnet
from medledger.services.custody import Custody
from medledger.store.uploads import UploadLimits


def sample(home: Path, **changes: str) -> NodeConfig:
    values = {
        "moniker": "node0",
        "chain_id": "medledger-local",
        "abci_socket": "abci.sock",
        "api_listen": "127.0.0.1:26660",
        "cometbft_rpc": "http://127.0.0.1:26657",
        "organization": "org-1",
    }
    values.update(changes)
    return NodeConfig(home=home, **values)


def write_raw(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "medledger.toml").write_text(text, encoding="utf-8")


def test_round_trip(tmp_path: Path) -> None:
    cfg = sample(tmp_path / "n0")
    path = write_node_config(cfg)
    assert path == tmp_path / "n0" / "medledger.toml"
    assert load_node_config(tmp_path / "n0") == cfg


def test_paths_are_relative_to_home(tmp_path: Path) -> None:
    cfg = sample(tmp_path)
    assert cfg.socket_path == tmp_path / "abci.sock"
    assert cfg.state_dir == tmp_path / "app"
    assert cfg.log_dir == tmp_path / "logs"
    assert cfg.keys_dir == tmp_path / "keys"
    assert cfg.app_pid_file == tmp_path / "app.pid"
    assert cfg.cometbft_pid_file == tmp_path / "cometbft.pid"
    assert cfg.node_pid_file == tmp_path / "node.pid"
    assert cfg.api_address == ("127.0.0.1", 26660)
    assert cfg.api_url == "http://127.0.0.1:26660"
    absolute = sample(tmp_path, abci_socket="/run/medledger/abci.sock")
    assert absolute.socket_path == Path("/run/medledger/abci.sock")


def test_wildcard_api_listen_is_reached_on_loopback(tmp_path: Path) -> None:
    assert sample(tmp_path, api_listen="0.0.0.0:8080").api_url == "http://127.0.0.1:8080"
    assert sample(tmp_path, api_listen="[::]:8080").api_url == "http://[::1]:8080"


def test_relative_home_is_resolved_on_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_node_config(sample(tmp_path / "n0"))
    monkeypatch.chdir(tmp_path)
    cfg = load_node_config(Path("n0"))
    assert cfg.home == tmp_path / "n0"
    assert cfg.home.is_absolute()


def test_write_keeps_other_tables_and_comments(tmp_path: Path) -> None:
    write_raw(
        tmp_path,
        '# operator notes\n[node]\nmoniker = "old"\n\n[api]\n# keep me\ncors = ["x"]\n',
    )
    write_node_config(sample(tmp_path, moniker="new"))
    text = (tmp_path / "medledger.toml").read_text(encoding="utf-8")
    assert "# operator notes" in text
    assert "# keep me" in text
    assert 'cors = ["x"]' in text
    assert load_node_config(tmp_path).moniker == "new"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no node configuration at .*medledger\.toml"):
        load_node_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node\n", "not valid TOML"),
        ('title = "x"\n', r"no \[node\] table"),
        ('[node]\nmoniker = "n"\n', "missing key"),
        ("[node]\nx = 1\n", "unknown key"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    write_raw(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_node_config(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("moniker", '""', "moniker must be a non-empty string"),
        ("moniker", "7", "moniker must be a string"),
        ("api_listen", '"localhost"', "api_listen must be host:port"),
        ("api_listen", '"127.0.0.1:99999"', "port must be in 1..65535"),
        ("cometbft_rpc", '"127.0.0.1:26657"', "cometbft_rpc must be an http"),
        ("chain_id", '"' + "c" * 51 + '"', "chain_id must be at most 50"),
        ("chain_id", '"two words"', "whitespace"),
    ],
)
def test_invalid_values(tmp_path: Path, field: str, value: str, message: str) -> None:
    write_node_config(sample(tmp_path))
    lines = (tmp_path / "medledger.toml").read_text(encoding="utf-8").splitlines()
    patched = [f"{field} = {value}" if line.startswith(f"{field} =") else line for line in lines]
    write_raw(tmp_path, "\n".join(patched) + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_node_config(tmp_path)
    assert "medledger.toml" in str(info.value)


def test_constructor_validates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_listen"):
        sample(tmp_path, api_listen="nope")


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n", encoding="ascii")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_cometbft_in_project_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COMETBFT_ENV, raising=False)
    found = find_cometbft()
    assert found.parts[-3:] == (".tools", "bin", "cometbft")
    assert os.access(found, os.X_OK)
    package = Path(medledger.__file__).resolve().parent
    assert found.parent.parent.parent in package.parents


def test_find_cometbft_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_executable(tmp_path / "bin" / "my-cometbft")
    monkeypatch.setenv(COMETBFT_ENV, str(fake))
    assert find_cometbft() == fake.resolve()
    monkeypatch.setenv(COMETBFT_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=COMETBFT_ENV):
        find_cometbft()


def test_find_cometbft_falls_back_to_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COMETBFT_ENV, raising=False)
    # Pretend the package lives somewhere with no .tools/bin/cometbft above it.
    monkeypatch.setattr(medledger, "__file__", str(tmp_path / "site" / "medledger" / "__init__.py"))
    on_path = make_executable(tmp_path / "path-bin" / "cometbft")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_cometbft() == on_path.resolve()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot find the cometbft binary"):
        find_cometbft()


def test_upload_limits_are_read_from_services(tmp_path: Path) -> None:
    path = tmp_path / "medledger.toml"
    path.write_text("[services]\n", encoding="utf-8")
    assert load_services_config(tmp_path).upload_limits == UploadLimits()
    path.write_text(
        "[services]\nupload_ttl_seconds = 600\npending_uploads_per_member = 10\n",
        encoding="utf-8",
    )
    limits = load_services_config(tmp_path).upload_limits
    assert (limits.ttl_seconds, limits.max_packages_per_member) == (600, 10)
    assert limits.max_bytes_per_member == UploadLimits().max_bytes_per_member
    path.write_text("[services]\npending_upload_bytes_per_member = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="pending_upload_bytes_per_member must be a positive"):
        load_services_config(tmp_path)


# -- configuration errors stop the node instead of a restart loop ----------------------------

CONFIG_PASSPHRASE = "config test passphrase"


def node_with_hl7_member(tmp_path: Path, member_of: Callable[[KeyPair], str]) -> NodeConfig:
    """A one-validator node home whose custody holds a laboratory system `lis`, with an
    `[hl7]` table naming `member_of(its keys)` as the member."""
    (cfg,) = init_testnet(
        tmp_path / "net", 1, passphrase=CONFIG_PASSPHRASE, base_port=27600, fast_kdf=True
    )
    services = load_services_config(cfg.home)
    lis = Custody(cfg.home / "custody", services.node_passphrase(), fast_kdf=True).create("lis")
    with open(cfg.config_path, "a", encoding="utf-8") as handle:
        handle.write(f'\n[hl7]\nlisten = "127.0.0.1:27609"\nmember = "{member_of(lis)}"\n')
    return cfg


def test_a_keystore_name_as_member_names_the_key_and_the_id_it_expects(tmp_path: Path) -> None:
    custody = Custody(tmp_path / "custody", CONFIG_PASSPHRASE, fast_kdf=True)
    lis = custody.create("lis")
    require_custodial_member(custody, lis.member_id, "[hl7] member")
    with pytest.raises(ConfigError) as raised:
        require_custodial_member(custody, "lis", "[hl7] member")
    assert str(raised.value) == (
        "[hl7] member = 'lis' is the name of a custodial keystore; [hl7] member takes its"
        f" member id: [hl7] member = {lis.member_id!r}"
    )
    with pytest.raises(ConfigError, match=r"\[hl7\] member = 'ab12': this node holds no keys"):
        require_custodial_member(custody, "ab12", "[hl7] member")
    with pytest.raises(ConfigError, match=f"held: lis = {lis.member_id}"):
        require_custodial_member(custody, "ab12", "[hl7] member")


def test_a_wrong_node_passphrase_is_a_configuration_error(tmp_path: Path) -> None:
    (cfg,) = init_testnet(
        tmp_path / "net", 1, passphrase=CONFIG_PASSPHRASE, base_port=27600, fast_kdf=True
    )
    (cfg.home / "keys" / "node.passphrase").write_text("not the passphrase\n")
    with pytest.raises(ConfigError, match=r"cannot unlock the node's keys \(keys/node\.json\)"):
        load_services_config(cfg.home).unlock_node_keys()


def test_the_node_app_stops_on_a_keystore_name_with_exit_status_78(tmp_path: Path) -> None:
    cfg = node_with_hl7_member(tmp_path, lambda lis: "lis")
    lis_id = Custody(cfg.home / "custody", CONFIG_PASSPHRASE).members()[0].member_id
    app = subprocess.run(
        [sys.executable, "-m", "medledger.cli.main", "node", "app", "--home", str(cfg.home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert app.returncode == CONFIG_ERROR_EXIT
    last = app.stderr.strip().splitlines()[-1]
    assert last == (
        "configuration error: [hl7] member = 'lis' is the name of a custodial keystore;"
        f" [hl7] member takes its member id: [hl7] member = {lis_id!r}"
    )
    # Nothing was served: the check runs before any socket opens.
    assert not cfg.socket_path.exists()


def test_the_supervisor_does_not_restart_a_configuration_error(tmp_path: Path) -> None:
    cfg = node_with_hl7_member(tmp_path, lambda lis: "lis")
    run = subprocess.run(
        [sys.executable, "-m", "medledger.cli.main", "node", "run", "--home", str(cfg.home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == CONFIG_ERROR_EXIT
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    names = [event.get("event") for event in events]
    assert "node.restarting" not in names
    assert names.count("app.started") == 1
    assert "cometbft.started" not in names
    (stopped,) = [event for event in events if event.get("event") == "node.config_error"]
    assert stopped["error"].startswith("configuration error: [hl7] member = 'lis' is the name")


def test_a_member_id_the_node_holds_passes_the_start_check(tmp_path: Path) -> None:
    cfg = node_with_hl7_member(tmp_path, lambda lis: lis.member_id)
    services = load_services_config(cfg.home)
    check_hl7_member(cfg.home, Custody(cfg.home / "custody", services.node_passphrase()))


def test_a_keystore_name_as_registration_member_is_named_too(tmp_path: Path) -> None:
    if "registration_member" not in Hl7Config.__dataclass_fields__:
        pytest.skip("[hl7] registration_member is not a key of this version of hl7.config")
    cfg = node_with_hl7_member(tmp_path, lambda lis: lis.member_id)
    services = load_services_config(cfg.home)
    custody = Custody(cfg.home / "custody", services.node_passphrase(), fast_kdf=True)
    ehr = custody.create("ehr")
    with open(cfg.config_path, "a", encoding="utf-8") as handle:
        handle.write('registration_member = "ehr"\n')
    with pytest.raises(ConfigError) as raised:
        check_hl7_member(cfg.home, custody)
    assert f"[hl7] registration_member = {ehr.member_id!r}" in str(raised.value)
