"""Reading the library's safetensors files: every file fisherfast writes carries
its format name and version in the metadata, checked here before any tensor
is used. Never unpickles."""
from __future__ import annotations

import os

import torch


def read_versioned(path: str | os.PathLike, fmt: str, version: int,
                   what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of the safetensors file ``path`` whose metadata says
    format ``fmt`` and version ``version``.

    Raises FileNotFoundError ("no <what> at …") when absent, ValueError naming
    the file for an unreadable file or another format or version."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged headers/data
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} file (format {meta.get('format')!r})")
    if meta.get("version") != str(version):
        raise ValueError(f"{path} holds {what} version {meta.get('version')!r}; this fisherfast reads "
                         f"version {version}")
    return meta, tensors


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp)`` on a fresh temporary path in ``path``'s folder, give
    the file the mode a plain ``open`` would (0666 less the umask: safetensors
    and ``mkstemp`` leave 0600), then rename it onto ``path`` in one step.

    A reader never sees a half-written file, and a failing ``write`` leaves an
    existing ``path`` untouched. The temporary name keeps ``path``'s extension
    (matplotlib picks the format from it). Raises what ``write``, ``chmod`` or
    ``os.replace`` raise (OSError for I/O), after removing the temporary file."""
    import tempfile

    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
