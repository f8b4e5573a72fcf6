"""Fixed costs of a command: what starting the CLI imports, the lazy parser's table, the KDF.

The lazy parser (cli/main.py) imports a command's module only once the command is named, and
light commands import no server, NBD or S3 stack; a command unlocks the key at most once, and
those that need no key never run the KDF (bench/startup.py times the whole processes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from snapship import crypto
from snapship.cli import main as cli_main
from tests.clihelp import cli_env, init_repo_fast_kdf, write_image

HEAVY = ("boto3", "botocore", "h11", "asyncio", "ssl", "http.client", "snapship.nbd.server",
         "snapship.nbd.handshake", "snapship.server.httpd", "snapship.server.app",
         "snapship.storage.s3", "snapship.engine.backup", "snapship.engine.restore")


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       check=False, timeout=60)
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_heavy_stack() -> None:
    loaded = _modules_after("import snapship.cli.main")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not any(m.startswith("snapship.cli.") and m.endswith("_commands") for m in loaded)


@pytest.mark.parametrize("argv", [["--help"], ["locks", "--help"], ["prune", "--help"]])
def test_help_and_light_commands_load_no_heavy_stack(argv: list[str]) -> None:
    code = ("import sys\nfrom snapship.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    loaded = _modules_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


KEYED = ("cryptography", "zstandard", "blake3", "snapship.crypto", "snapship.formats.envelope",
         "snapship.repository.repo")
"""What reading or sealing an object needs: 30-35 ms of start-up that keyless commands that
read no object's envelope (`locks`, `prune`) do not pay."""


@pytest.mark.parametrize("argv", [["locks"], ["prune", "--keep-last", "1", "--dry-run"]])
def test_keyless_commands_on_a_local_repository_load_no_heavy_or_crypto_stack(
        tmp_path: Path, argv: list[str]) -> None:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    code = ("import sys\nfrom snapship.cli.main import main\n"
            f"assert main(['--repo', {str(repo)!r}, *{argv!r}]) == 0")
    loaded = _modules_after(code, env=cli_env())
    assert "snapship.repository.locks" in loaded  # it did run
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not loaded & set(KEYED), sorted(loaded & set(KEYED))
    assert "snapship.cli.transfer_commands" not in loaded


def _registered() -> dict[str, tuple[str, str]]:
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for action in sub._choices_actions:
        func = sub.choices[action.dest].get_default("func")
        out[action.dest] = (func.__module__ if func else "", str(action.help))
    return out


def test_the_lazy_table_is_what_the_modules_register() -> None:
    registered = _registered()
    assert list(registered) == list(cli_main.COMMANDS)
    for name, (module, summary) in cli_main.COMMANDS.items():
        reg_module, reg_summary = registered[name]
        assert summary == reg_summary, name
        if reg_module:  # commands with subcommands have no func of their own
            assert reg_module == f"snapship.cli.{module}", name


def test_lazy_help_is_the_full_help() -> None:
    assert cli_main.build_parser(lazy=True).format_help() == \
        cli_main.build_parser().format_help()


@pytest.fixture
def kdf_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = crypto.derive_kek

    def counting(passphrase: bytes, params: crypto.ScryptParams) -> bytes:
        calls.append(1)
        return real(passphrase, params)

    monkeypatch.setattr(crypto, "derive_kek", counting)
    return calls


def test_each_command_runs_the_kdf_at_most_once(tmp_path: Path, kdf_calls: list[int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    image = tmp_path / "disk.img"
    write_image(image, bytes(range(256)) * 1024)
    r = ["--repo", str(repo)]
    expected = {
        ("backup", str(image), "--volume", "disk"): 1,
        ("versions",): 1,
        ("show", "disk"): 1,
        ("restore", "disk", str(tmp_path / "out.img")): 1,
        ("verify",): 1,
        ("gc",): 1,
        ("locks",): 0,
        ("prune", "--keep-last", "1"): 0,
        ("protect", "disk"): 0,
    }
    for argv, runs in expected.items():
        kdf_calls.clear()
        assert cli_main.main([*r, *argv, "--json"]) == 0, argv
        assert len(kdf_calls) == runs, (argv, len(kdf_calls))
    monkeypatch.delenv("SNAPSHIP_PASSPHRASE")
    kdf_calls.clear()
    assert cli_main.main([*r, "gc", "--json"]) == 0  # no passphrase at hand: no key at all
    assert kdf_calls == []
