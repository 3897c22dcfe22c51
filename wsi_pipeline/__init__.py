"""wsi-pipeline: find cancer in folders of H&E whole-slide images.

Subpackages, one per stage (see ARCHITECTURE.md): ``io`` (slide readers, the Zarr tile store, output
writers), ``tiling`` (tissue, grid, plan, tiler, ``TileSource``), ``stain`` (Macenko), ``inference``
(model card, onnxruntime sessions, Dask scoring), ``evaluation`` (annotations, metrics, evaluate),
``cli``; ``pipeline`` runs one slide end to end.

The public API, importable from here (loaded on first use, so ``import wsi_pipeline`` stays light):
``run_slide``, ``RunOptions``, ``TileOptions``, ``tile_slide``, ``open_tile_store``, ``open_source``,
``read_regions`` (``TileOptions(regions=read_regions("slide.geojson"))``: only the tissue inside them).
"""

import time as _time
from importlib import import_module
from typing import Any

#: perf_counter when this package began to import (the run manifest splits start-up with it)
IMPORTED_AT = _time.perf_counter()

# The single source of the version: pyproject.toml reads it from here (importlib.metadata, which the
# installed version would need, costs 0.02 s of every command's start).
__version__ = "0.1.0"

_API = {
    "run_slide": "wsi_pipeline.pipeline",
    "RunOptions": "wsi_pipeline.pipeline",
    "TileOptions": "wsi_pipeline.tiling.plan",
    "tile_slide": "wsi_pipeline.tiling.tiler",
    "open_tile_store": "wsi_pipeline.io.tilestore",
    "open_source": "wsi_pipeline.tiling.source",
    "read_regions": "wsi_pipeline.tiling.regions",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'wsi_pipeline' has no attribute {name!r}")
