"""wsi-pipeline: find cancer in folders of H&E whole-slide images.

Stages (one module each): ``slide`` (readers, resolution), ``tissue`` (mask), ``grid`` (tile grid),
``tilestore`` (Zarr v3 tile stores), ``stain`` (Macenko), ``model``/``scoring`` (ONNX), ``aggregate``,
``outputs``, ``annotations``, ``evaluate``. Nothing heavy is imported here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-pipeline")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
