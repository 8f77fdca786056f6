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

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

FORMAT = "hessrebal"
FORMAT_VERSION = 1
# A safetensors header is JSON of a few KB per tensor; anything beyond this is
# not a file we wrote, and refusing it early avoids reading a huge bogus length.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

PathLike = str | os.PathLike


def _default_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give a new file.

    ``mkstemp`` makes its file 0600; without this a saved model would be
    unreadable to the rest of a group that shares it. The umask is read from
    /proc where it exists, because ``os.umask`` can only be read by setting it,
    which races with other threads creating files.
    """
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    if mask is None:
        mask = 0o022
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it atomically on success.

    The caller writes the whole file to the yielded path. When the block ends
    without an exception, the file is flushed to disk (``fsync``) and moved
    onto ``path`` with ``os.replace``, which is atomic on POSIX and Windows
    when both are on one file system (hence the same directory). A reader, or
    a process that dies at any moment, thus sees either the old file or the
    complete new one, never a mix. On an exception (``KeyboardInterrupt``
    included) the temporary file is removed and ``path`` is left as it was.
    A process killed outright (SIGKILL, power loss) cannot clean up: it may
    leave a ``.<name>.<random>.tmp`` file beside an intact ``path``.

    This is the one implementation every file hessrebal writes goes through.

    Parameters
    ----------
    path : str or path-like
        The destination. Its directory must exist.

    Yields
    ------
    pathlib.Path
        The temporary file (created empty, in ``path``'s directory).
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"The directory of {str(path)!r} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; expected a file path.")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        try:
            mode = path.stat().st_mode & 0o7777  # overwriting keeps the old permissions
        except FileNotFoundError:
            mode = _default_mode()
        os.chmod(tmp, mode)
        # Flush the data before the rename: otherwise a crash right after it
        # can leave the new name pointing at an empty file on some file systems.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on Windows (a directory
    # cannot be opened), where NTFS journals the rename anyway.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that only replaces ``path`` once everything is written.

    See :func:`atomic_path`. ``mode`` is ``"w"`` (text, ``encoding``) or
    ``"wb"`` (bytes).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from hessrebal._persistence import atomic_write
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_write(target) as fh:
    ...     _ = fh.write("done\\n")
    >>> target.read_text()
    'done\\n'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}.")
    with atomic_path(path) as tmp:
        if mode == "wb":
            with open(tmp, "wb") as fh:
                yield fh
        else:
            with open(tmp, "w", encoding=encoding, newline=newline) as fh:
                yield fh


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def save_figure_atomic(fig: Any, path: PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig(path, **savefig_kwargs)``, atomically (see :func:`atomic_path`).

    The format comes from ``path``'s suffix, as in ``savefig``: the temporary
    file's own name would not tell matplotlib what to write.
    """
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".").lower() or None)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, **savefig_kwargs)
    return path


def to_jsonable(value: Any, non_finite: str = "string") -> Any:
    """``value`` with numpy scalars/arrays, tensors and tuples turned into
    JSON types: the package's one JSON encoder.

    ``non_finite="string"`` (fitted state, which must round-trip) writes
    NaN and infinities as ``"nan"``, ``"inf"`` and ``"-inf"``; loaders turn
    them back with ``float()``. ``non_finite="null"`` (result files, read by
    other tools) writes them as ``null``. Strict JSON has no such numbers.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, non_finite) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), non_finite)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist(), non_finite)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        if math.isfinite(f):
            return f
        if non_finite == "null":
            return None
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
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
        Destination file, replaced atomically (:func:`atomic_path`): an
        interrupted save leaves the previous file intact. Its parent
        directory must exist.
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
    # Into a temporary file first: an interrupted save must not destroy the
    # file a previous save left at ``path``.
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=header)
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
