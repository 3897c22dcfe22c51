"""The per-user cache folder: what this package may keep between runs to start faster.

``$WSI_PIPELINE_CACHE`` when set (``off``, ``0``, ``none`` or empty: nothing is kept), else
``$XDG_CACHE_HOME/wsi-pipeline`` or ``~/.cache/wsi-pipeline``. Everything in it can be deleted at any
time; a run that cannot read or write it only does the work again.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    """The cache folder (not created here), or None when caching is off."""
    env = os.environ.get("WSI_PIPELINE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsi-pipeline"
