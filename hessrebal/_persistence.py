"""Saving and loading fitted hessrebal objects without pickle.

One file per object: tensors in the safetensors format, everything else
(constructor settings, fitted scalars, versions) as JSON in the safetensors
header's ``__metadata__``. Reading such a file never executes code, and
:func:`load_state` refuses anything that is not a well-formed hessrebal
safetensors file (a pickle, a ``torch.save`` zip, a truncated or corrupt file)
with a ``ValueError`` before any tensor is read.

Header layout (all values are strings, as safetensors requires)::

    {"format": "hessrebal", "kind": "<class name>", "version": "1",
     "library_version": "...", "torch_version": "...", "meta": "<JSON>"}
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "hessrebal"
FORMAT_VERSION = 1
# A safetensors header is JSON of a few KB per tensor; anything beyond this is
# not a file we wrote, and refusing it early avoids reading a huge bogus length.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

PathLike = str | os.PathLike


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays and tuples turned into JSON types.

    Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and
    ``"-inf"`` (strict JSON has no such numbers); :func:`from_jsonable`
    does not undo that, callers that store them convert back themselves.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if value is None or isinstance(value, (int, str)):
        return value
    raise TypeError(f"Cannot store a value of type {type(value).__name__} as JSON.")


def save_state(
    path: PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    kind: str,
    version: int = FORMAT_VERSION,
) -> Path:
    """Write ``tensors`` and the JSON-able ``meta`` to one safetensors file.

    Parameters
    ----------
    path : str or path-like
        Destination file (overwritten). Its parent directory must exist.
    tensors : dict of str to Tensor
        Saved as contiguous CPU copies; the caller's tensors are not changed.
    meta : dict
        Settings and fitted metadata; must be JSON-able after
        :func:`to_jsonable`.
    kind : str
        What the file holds (usually the class name); checked by
        :func:`load_state`.
    version : int, default=1
        Format version of ``kind``.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
        raise TypeError("tensors must be a dict mapping str to torch.Tensor.")
    clean = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors['{key}'] must be a torch.Tensor; got {type(t).__name__}.")
        # clone: safetensors refuses tensors that share storage.
        clean[key] = t.detach().to("cpu").contiguous().clone()
    header = {
        "format": FORMAT,
        "kind": str(kind),
        "version": str(int(version)),
        "library_version": __version__,
        "torch_version": torch.__version__,
        "meta": json.dumps(to_jsonable(meta), allow_nan=False),
    }
    save_file(clean, str(path), metadata=header)
    return path


def _sniff(head: bytes) -> str | None:
    """A guess at what a non-safetensors file is, for the error message."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save?)"
    return None


def _read_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        # Decide by structure, not by magic bytes alone: a safetensors length
        # prefix can itself start with 0x80.
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = fh.read(n) if 0 < n <= min(_MAX_HEADER_BYTES, size - 8) else b""
    header = None
    if raw:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        what = _sniff(head)
        if what is not None:
            raise ValueError(
                f"{path} looks like {what}; hessrebal never reads pickled data. "
                "Only files written by save() (safetensors + JSON) can be loaded."
            )
        raise ValueError(f"{path} is not a safetensors file (unreadable or corrupt header).")
    return header


def load_state(
    path: PathLike, expected_kind: str | None = None, max_version: int = FORMAT_VERSION
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state`.

    Parameters
    ----------
    path : str or path-like
    expected_kind : str or None
        Refuse a file of another kind (ValueError naming both).
    max_version : int, default=1
        Refuse files written by a newer format version.

    Returns
    -------
    tensors : dict of str to Tensor
        CPU tensors.
    meta : dict
        The JSON metadata given to :func:`save_state`, plus ``"_version"``
        (the file's format version) and ``"_library_version"``.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        For a pickle, a zip, a corrupt or truncated file, a safetensors file
        not written by hessrebal, or one of another kind or newer version.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    header = _read_header(path)
    info = header.get("__metadata__")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but was not written by hessrebal.")
    kind = info.get("kind")
    if expected_kind is not None and kind != expected_kind:
        raise ValueError(f"{path} holds a {kind!r}, not a {expected_kind!r}.")
    try:
        version = int(info.get("version", ""))
    except ValueError as exc:
        raise ValueError(f"{path} has an invalid format version.") from exc
    if version > max_version:
        raise ValueError(
            f"{path} was written with format version {version}; this hessrebal reads "
            f"up to {max_version}. Upgrade hessrebal."
        )
    try:
        meta = json.loads(info.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} has corrupt metadata: {exc}") from exc
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path} is corrupt: {exc}") from exc
    meta = dict(meta)
    meta.setdefault("_version", version)
    meta.setdefault("_library_version", info.get("library_version"))
    return tensors, meta
