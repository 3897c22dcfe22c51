"""Provenance: versions of what produced an output, and atomic file writes."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import mmap
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsi_pipeline import __version__
from wsi_pipeline.errors import OutputError

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
    """Versions of Python, this package and the libraries that shape its outputs (installed ones).

    Looked up once per process (22 ms: each version parses its package's metadata file), as a
    process's libraries do not change while it runs; a copy each call."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "wsi-pipeline": __version__}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``: clock ticks of 10 ms), None elsewhere."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, MiB (Linux ``VmHWM``: counted from the program's
    start, unlike ``getrusage``, which carries the parent's peak across fork and exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file (for models and reference images, not gigapixel slides).

    The file is mapped and hashed in one call, which gives up and takes back the GIL once: read in
    1 MB chunks, a 45 MB model took 0.49 s instead of 0.03 s to hash beside a busy Python thread (each
    chunk waited for the GIL), and models are hashed on a thread while the run starts.
    """
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        if os.fstat(fh.fileno()).st_size:  # an empty file cannot be mapped
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest()


#: Longest file name (bytes of UTF-8) an output may have: file systems allow 255, and each output is
#: first written as ``.NAME.PID.XXXXXXXX.tmp`` (22 bytes more; PIDs have up to 7 digits).
MAX_NAME_BYTES = 255 - 22


def name_bytes(name: str) -> int:
    """Length of a file name as the file system counts it (bytes)."""
    return len(os.fsencode(name))


def check_name_lengths(paths: Iterable[Path], *, fix: str) -> None:
    """Raise :class:`OutputError` naming the longest of ``paths`` when its name is longer than
    :data:`MAX_NAME_BYTES`, before any work: the write would fail (``ENAMETOOLONG``) at the end.
    ``fix`` ends the message; it is told how many bytes shorter the names must be."""
    longest = max(paths, key=lambda p: name_bytes(p.name), default=None)
    n = name_bytes(longest.name) if longest is not None else 0
    over = n - MAX_NAME_BYTES
    if over > 0:
        raise OutputError(
            f"{longest}: the file name is {n} bytes, {over} over the {MAX_NAME_BYTES} an output may have "
            f"(file systems allow 255, and each output is written under a longer temporary name first); "
            f"{fix.format(over=over)}"
        )


def valid_text(text: str) -> str:
    """``text`` that can be written as UTF-8: the bytes of a file name that are not UTF-8 (Python keeps
    them as lone surrogates: a Latin-1 ``caf\\xe9.svs`` from an old Windows share or a zip) shown as
    ``\\xe9``, so pages and tables name such a slide instead of failing to be written."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name gave
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never half of either. Problems of the output
    location (disk full, read-only, no permission) raise :class:`~wsi_pipeline.errors.OutputError`
    (an ``OSError``) naming the file.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        for stale in p.parent.glob(f".{p.name}.*.tmp"):  # left by a process killed mid-write
            if not _writer_alive(stale, p.name):
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise output_error(p, exc) from exc
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
                os.fchmod(fh.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; results are shared files
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise output_error(p, exc) from exc
        raise
    return p


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` runs (this process included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _writer_alive(tmp: Path, name: str) -> bool:
    """True when the process that owns temporary file ``tmp`` (``.NAME.PID.xxx.tmp``) still runs, so
    its write must not be disturbed (this process: another thread). Files without a PID are stale."""
    pid_part = tmp.name[len(name) + 2 :].split(".", 1)[0]
    return pid_part.isdigit() and pid_alive(int(pid_part))


@contextmanager
def remove_created_folders_on_failure(folder: Path) -> Iterator[None]:
    """Run a block that may create ``folder`` (and missing parents); if the block fails, remove the
    folders it created that are still empty, so a failed run leaves no empty output folders."""
    missing = []
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for d in missing:  # leaf first
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        raise


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there (before hours of work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as fh:
            fh.write(b"ok")
    except OSError as exc:
        raise output_error(folder, exc) from exc


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # hard links and symlinks too
    except OSError:
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the paths as given
        return a.absolute() == b.absolute()


def input_files(path: Path) -> list[Path]:
    """The files an input occupies: the file itself and, for MIRAX ``X.mrxs``, its data folder ``X/``."""
    return [path, path.with_suffix("")] if path.suffix.lower() == ".mrxs" else [path]


def refuse_overwriting_inputs(outputs: list[Path], inputs: list[Path], *, what: str = "--out") -> None:
    """Raise :class:`OutputError` when an output path is (or would replace) an input file or folder.

    Checked before anything is read or written, so a mistyped ``--out`` can never destroy a slide,
    a model or its card.
    """
    for inp in (f for i in inputs for f in input_files(i)):
        for out in outputs:
            if _same_path(out, inp):
                raise OutputError(
                    f"{out}: this output would overwrite the input {inp}; choose another {what} "
                    "(e.g. results/NAME.tif)"
                )


def output_error(path: Path, exc: OSError) -> OutputError:
    """One-line :class:`OutputError` for an OSError met while writing ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (
            f"{path}: disk full (or quota reached) while writing it; free space and re-run the same "
            f"command (finished results are kept and skipped)"
        )
    elif exc.errno == errno.ENAMETOOLONG:
        msg = f"{path}: the name is too long for this file system; choose a shorter --out"
    elif exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        msg = f"{path}: cannot write here ({exc.strerror}); choose a writable --out"
    else:
        msg = f"{path}: cannot write it ({exc}); check the output location"
    err = OutputError(msg)
    err.errno = exc.errno
    return err


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, Infinity) replaced by None: strict JSON parsers
    reject Python's ``NaN``/``Infinity`` tokens."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented, strict JSON (non-finite numbers become null; see
    :func:`atomic_write_bytes`)."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, default=str, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def model_name(manifest: dict[str, Any]) -> str | None:
    """``name version`` of the model a run's manifest records (None when it records neither)."""
    m = manifest.get("model") or {}
    text = " ".join(str(m[k]) for k in ("name", "version") if m.get(k))
    return text or None
