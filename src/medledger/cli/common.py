"""Options and helpers shared by the commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

PASSPHRASE_ENV = "MEDLEDGER_PASSPHRASE"


def passphrase_option(func: F) -> F:
    return click.option(
        "--passphrase-file",
        "passphrase",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help=f"Read the keystore passphrase from this file (else ${PASSPHRASE_ENV}, else ask).",
    )(func)


def resolve_passphrase(path: str | None, *, confirm: bool = False) -> str:
    """The passphrase from a file, the environment, or an interactive prompt, in that order."""
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\n")
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env
    value: str = click.prompt("Keystore passphrase", hide_input=True, confirmation_prompt=confirm)
    return value


def keys_dir_option(func: F) -> F:
    return click.option(
        "--keys-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("MEDLEDGER_KEYS", str(Path.home() / ".medledger" / "keys")),
        show_default="$MEDLEDGER_KEYS or ~/.medledger/keys",
        help="Directory of keystore files.",
    )(func)
