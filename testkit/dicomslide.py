"""Write a DICOM whole-slide image (VL Whole Slide Microscopy, TILED_FULL, uncompressed RGB) with pydicom.

One file per image, as scanners export them: level 0 and optional smaller levels (ImageType VOLUME)
and a thumbnail, all of one series, so tests can check that a folder of them is read as one slide
with exactly the pixels given (uncompressed frames: no codec in between).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _frames(rgb: np.ndarray, tile: int) -> tuple[bytes, int]:
    """TILED_FULL frames (row-major, edge tiles padded white) as one byte string, and their count."""
    h, w = rgb.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    padded[:h, :w] = rgb
    frames = padded.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2)
    return np.ascontiguousarray(frames).tobytes(), rows * cols


def _image(rgb: np.ndarray, *, kind: str, mpp: float, tile: int, uids: dict[str, str], number: int) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSM_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSM_SOP_CLASS, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PyramidUID = uids["frame"], uids["pyramid"]
    ds.Modality, ds.InstanceNumber, ds.SeriesNumber = "SM", number, 1
    ds.ImageType = ["DERIVED", "PRIMARY", kind, "NONE" if kind == "VOLUME" else "RESAMPLED"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    h, w = rgb.shape[:2]
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp / 1000, h * mpp / 1000  # mm
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm (row, column)
    measures.SliceThickness = 0.0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = Sequence([path])
    data, n = _frames(rgb, tile)
    ds.NumberOfFrames = n
    ds.PixelData = data
    return ds


def write_dicom_slide(
    folder: Path,
    rgb: np.ndarray,
    *,
    mpp: float,
    tile: int = 256,
    levels: int = 1,
    thumbnail: bool = True,
    prefix: str = "image",
) -> list[Path]:
    """Write ``rgb`` (level 0, uint8 (h, w, 3)) at ``mpp`` um/px as one DICOM series into ``folder``:
    ``levels`` VOLUME images (each half the previous, 2x2 box means) and a THUMBNAIL (long side 256 px).
    Returns the files written (level 0 first)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = {k: generate_uid() for k in ("study", "series", "frame", "pyramid")}
    images: list[tuple[str, np.ndarray, float]] = []
    level, level_mpp = rgb, mpp
    for _ in range(levels):
        images.append(("VOLUME", level, level_mpp))
        h2, w2 = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
        q = level[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2, 3).astype(np.uint16)
        level, level_mpp = ((q.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8), level_mpp * 2
    if thumbnail:
        step = max(1, -(-max(rgb.shape[:2]) // 256))
        images.append(("THUMBNAIL", np.ascontiguousarray(rgb[::step, ::step]), mpp * step))
    written = []
    for i, (kind, pixels, px_mpp) in enumerate(images):
        ds = _image(pixels, kind=kind, mpp=px_mpp, tile=tile, uids=uids, number=i + 1)
        target = folder / f"{prefix}_{i}.dcm"
        ds.save_as(target, enforce_file_format=True)  # type: ignore[attr-defined]
        written.append(target)
    return written
