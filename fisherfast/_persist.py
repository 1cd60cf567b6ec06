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
