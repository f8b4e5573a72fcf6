"""Progress bar and size parsing of the CLI."""

from __future__ import annotations

import io

import pytest

from snapship.cli.output import TerminalProgress, human_bytes, parse_size


class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_draws_bytes_rate_and_eta_on_a_terminal() -> None:
    out = FakeTerminal(tty=True)
    p = TerminalProgress("backup disk", out)
    p.start(4 << 20)
    p.advance(1 << 20)
    p.finish()
    text = out.getvalue()
    assert text.startswith("\rbackup disk  [") and "1.0 MiB / 4.0 MiB" in text
    assert "25.0%" in text and "/s" in text and "ETA" in text and text.endswith("\n")


def test_progress_is_silent_when_not_a_terminal() -> None:
    out = FakeTerminal(tty=False)
    p = TerminalProgress("restore", out)
    p.start(10)
    p.advance(10)
    p.finish()
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("text", "value"),
    [("65536", 65536), ("64K", 65536), ("1M", 1 << 20), ("4MiB", 4 << 20), ("16m", 16 << 20),
     ("1G", 1 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1", "4X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 40) == "3.0 TiB"
