"""Provenance: versions of what produced an output, and atomic file writes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from . import __version__

_PACKAGES = (
    "numpy",
    "zarr",
    "tifffile",
    "imagecodecs",
    "tiffslide",
    "openslide-python",
    "openslide-bin",
    "scikit-image",
    "onnxruntime",
    "onnxruntime-gpu",
    "dask",
    "distributed",
)


def environment_versions() -> dict[str, str]:
    """Versions of Python, this package and the libraries that shape its outputs (installed ones)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "wsi-pipeline": __version__}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def file_sha256(path: str | os.PathLike[str], *, block: int = 1 << 20) -> str:
    """Hex sha256 of a whole file (for models and reference images, not gigapixel slides)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never half of either.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary shared files
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())
