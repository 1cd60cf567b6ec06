"""Argument checking for the CLI: the parser that reports a mistake in one
line, argparse types that reject bad values at parse time, and readers of the
input text files. Everything here runs before a model loads."""
from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A user mistake found by a command: ``main`` prints it as one line
    ("fisherfast CMD: error: …") on stderr and exits with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except the uninformative None and False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser that shows defaults in --help."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text}")
    return value


def open_unit_float(text: str) -> float:
    """A float in the open interval (0, 1) (a probability or a tail mass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def nonempty_str(text: str) -> str:
    """Non-empty text that is valid UTF-8 (a byte that is not arrives from the
    command line as a lone surrogate, which a tokenizer cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start]) - 0xDC00
        shown = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"character {text[err.start]!r}"
        raise argparse.ArgumentTypeError(f"expected UTF-8 text, got the {shown} at character {err.start}") from None
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def read_text(path: str, option: str) -> str:
    """The UTF-8 contents of the file ``path`` given to ``option``; UsageError
    naming the option for a missing, unreadable or non-UTF-8 file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"cannot read {option} {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsageError(f"{option} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                         f"convert it, e.g. with iconv -t UTF-8") from None


def read_lines(path: str, option: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; UsageError if none."""
    lines = [line.strip() for line in read_text(path, option).splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{option} {path} holds no non-empty line")
    return lines


def note(message: str) -> None:
    """A notice to the user on stderr (not part of the command's output)."""
    print(f"note: {message}", file=sys.stderr)
