"""Which files are slides, by name: the suffixes the readers open, and the whole-slide formats that
neither reads (listed so that a folder run reports them with the way out instead of passing over
them). No imports beyond the standard library: the command line uses it before any heavy import."""

from __future__ import annotations

#: Opened by OpenSlide or tiffslide (``io.slide.open_slide``); ``.dcm``: see ``io.dicom``.
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".dcm", ".scn", ".bif", ".vms", ".vmu", ".svslide",
)  # fmt: skip
DICOM_SUFFIX = ".dcm"
#: TIFF variants that open (tiffslide) but are not brightfield RGB: scored, they are refused by what
#: they hold (e.g. "axes CYX, multiplex fluorescence"), which a folder run reports.
OTHER_TIFF_SUFFIXES = (".qptiff",)
#: Whole-slide formats that neither OpenSlide nor tiffslide reads.
UNSUPPORTED_FORMATS = {
    ".czi": "Zeiss CZI",
    ".isyntax": "Philips iSyntax",
    ".vsi": "Olympus/Evident VSI",
    ".kfb": "KFBio KFB",
    ".sdpc": "SQRAY SDPC",
}
#: What a folder run lists as slides.
LISTED_SUFFIXES = SLIDE_SUFFIXES + OTHER_TIFF_SUFFIXES + tuple(UNSUPPORTED_FORMATS)


def unsupported_message(path: str) -> str | None:
    """The one-line error for a file of a format no reader here opens, or None."""
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    name = UNSUPPORTED_FORMATS.get(suffix)
    if name is None:
        return None
    return (
        f"{path}: {name} slides cannot be read here (neither OpenSlide nor tiffslide reads the format); "
        "convert the slide to OME-TIFF or DICOM (e.g. QuPath, or Bio-Formats' bfconvert) and score that"
    )
