"""On-disk cache of generated data sets: one ``.npz`` per parameter set, written atomically.

A data set is stored as a single ``.npz`` holding its arrays, its ids and its meta table (as
parquet bytes), so that one ``os.replace`` publishes it whole: a reader sees either no file or a
complete one, also when several processes generate the same set at once. The file name is a hash
of every generation parameter plus :data:`FORMAT_VERSION`; bump the version whenever the generator
changes its output, and old files are simply never read again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "FORMAT_VERSION",
    "cache_root",
    "cache_key",
    "cache_path",
    "save_arrays",
    "load_arrays",
]

# Part of every key: changing the generator must change this number.
FORMAT_VERSION = 1

_META_KEY = "__meta_parquet__"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder for cached data sets.

    Args:
        cache_dir: explicit folder; when ``None``, ``$SEGABILITY_CACHE`` if set, else
            ``~/.cache/segability``.

    Returns:
        The folder (not created here).

    Example:
        >>> cache_root("/tmp/sg").as_posix()
        '/tmp/sg'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SEGABILITY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "segability"


def cache_key(**params: Any) -> str:
    """A stable hash of the generation parameters and :data:`FORMAT_VERSION`.

    Args:
        **params: JSON-serialisable parameters (every one that changes the output).

    Returns:
        A 20-character hex digest.

    Example:
        >>> cache_key(function="f", n=3) == cache_key(n=3, function="f")
        True
    """
    payload = json.dumps({**params, "format_version": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_path(cache_dir: str | os.PathLike[str] | None, function: str, **params: Any) -> Path:
    """Where the data set made by ``function(**params)`` is cached.

    Example:
        >>> cache_path("/tmp/sg", "mni_lesions", n=2).name.startswith("mni_lesions-")
        True
    """
    return cache_root(cache_dir) / f"{function}-{cache_key(function=function, **params)}.npz"


def save_arrays(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: pd.DataFrame) -> Path:
    """Write ``arrays`` and ``meta`` to one ``.npz`` through a temporary file and a rename.

    Args:
        path: destination file; its folder is created.
        arrays: name -> array (no object arrays: the file is read with ``allow_pickle=False``).
        meta: table stored as parquet bytes inside the archive.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: if a name collides with the reserved meta key.

    Example:
        >>> import tempfile
        >>> p = save_arrays(Path(tempfile.mkdtemp()) / "a.npz", {"x": np.zeros(2)}, pd.DataFrame({"a": [1]}))
        >>> load_arrays(p)[0]["x"].tolist()
        [0.0, 0.0]
    """
    if _META_KEY in arrays:
        raise ValueError(f"arrays must not contain the reserved key {_META_KEY!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    meta.to_parquet(buffer, index=False)
    payload = {**arrays, _META_KEY: np.frombuffer(buffer.getvalue(), dtype=np.uint8)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **payload)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after the rename; left behind only on a failure
    return path


def load_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], pd.DataFrame] | None:
    """Read a file written by :func:`save_arrays`; ``None`` when it is missing or unreadable.

    An unreadable file (truncated by a crash before this format existed, or written by an
    incompatible version) is treated as a cache miss, so the caller regenerates and overwrites it.

    Example:
        >>> load_arrays("/nonexistent/file.npz") is None
        True
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = pd.read_parquet(io.BytesIO(arrays.pop(_META_KEY).tobytes()))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    return arrays, meta
