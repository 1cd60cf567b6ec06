"""Output files of the CLI: checked before any work, written atomically, never lost.

``check_output`` runs before a model loads: the extension must suit the kind
of output, the folder must exist and be writable, and an existing file is
replaced only with ``--force`` and only if it is an output of the same kind
(a FisherSketch file for a sketch, an image of that format for a plot).
``write_output`` then writes through ``fisherfast.persist.atomic_write``
(temporary file in the same folder, umask mode, rename); if that still fails
(disk full, folder removed meanwhile), it saves the computed result to a
fallback path — the same folder, then the working directory, then the
system's temporary folder — and says where on stderr (the command then exits
with status 1).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable

from fisherfast.persist import atomic_write
from fisherfast.cli._args import UsageError


def safetensors_of_format(module: str) -> Callable[[str], bool]:
    """A test "is ``path`` a safetensors file whose metadata format is ``module``'s ``FORMAT``"
    (the module imported only when a file is tested; any unreadable or foreign file is not)."""
    def test(path: str) -> bool:
        import importlib

        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return (f.metadata() or {}).get("format") == importlib.import_module(module).FORMAT
        except Exception:
            return False
    return test


_IMAGE_MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".pdf": (b"%PDF-",), ".svg": (b"<?xml", b"<svg")}


def _is_image_file(path: str) -> bool:
    magic = _IMAGE_MAGIC.get(os.path.splitext(path)[1].lower(), ())
    try:
        with open(path, "rb") as f:
            head = f.read(16).lstrip()
    except OSError:
        return False
    return head.startswith(magic)


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of output file: its name in messages, the extensions it may
    have, and a test that an existing file is one of it."""
    name: str
    extensions: tuple[str, ...]
    is_same_kind: Callable[[str], bool]


SKETCH = OutputKind("FisherSketch state", (".safetensors",), safetensors_of_format("fisherfast.sketch.state"))
PLOT = OutputKind("plot", (".png", ".pdf", ".svg"), _is_image_file)


def check_output(path: str, kind: OutputKind, *, force: bool, option: str = "--out") -> str:
    """``path`` made absolute, after checking it can receive a ``kind`` output.

    Raises UsageError (one line naming ``option``) for a wrong extension, a
    missing or read-only folder, a folder in the way, or an existing file
    without ``force`` or of another kind."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in kind.extensions:
        raise UsageError(f"{option} {path}: a {kind.name} file must end in {_listing(kind.extensions)}, "
                         f"got {ext or 'no extension'}")
    full = os.path.abspath(path)
    _check_folder(os.path.dirname(full), f"{option} {path}")
    if os.path.isdir(full):
        raise UsageError(f"{option} {path} is a folder")
    if os.path.lexists(full):
        if not kind.is_same_kind(full):
            raise UsageError(f"{option} {path} exists and is not a {kind.name} file; not replacing it "
                             f"(choose another path)")
        if not force:
            raise UsageError(f"{option} {path} exists; pass --force to replace it, or choose another path")
    return full


def _listing(items) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def check_folder_output(folder: str, option: str = "--out") -> str:
    """``folder`` made absolute, after checking it is, or can be made as, a writable folder."""
    full = os.path.abspath(folder)
    if os.path.lexists(full) and not os.path.isdir(full):
        raise UsageError(f"{option} {folder} exists and is not a folder")
    _check_folder(full if os.path.isdir(full) else os.path.dirname(full), f"{option} {folder}")
    return full


def _check_folder(folder: str, what: str) -> None:
    if not os.path.isdir(folder):
        raise UsageError(f"{what}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: folder {folder} is not writable")


def _fallbacks(path: str):
    stem, ext = os.path.splitext(os.path.basename(path))
    name = f"{stem}.recovered-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{ext}"
    for folder in (os.path.dirname(path), os.getcwd(), tempfile.gettempdir()):
        yield os.path.join(folder, name)


def write_output(path: str, write: Callable[[str], None], what: str) -> bool:
    """Write ``what`` to ``path`` with ``write(tmp_path)``, atomically.

    Returns True when ``path`` was written; False when it could not be (said
    on stderr, with the fallback path the result went to, if any)."""
    try:
        atomic_write(path, write)
        return True
    except OSError as err:
        first = err
    for candidate in _fallbacks(path):
        try:
            atomic_write(candidate, write)
        except OSError:
            continue
        print(f"error: could not write the {what} to {path} ({first.strerror or first}); "
              f"saved it to {candidate} instead", file=sys.stderr)
        return False
    print(f"error: could not write the {what} to {path} ({first.strerror or first}), nor to the working folder "
          f"or {tempfile.gettempdir()}", file=sys.stderr)
    return False
