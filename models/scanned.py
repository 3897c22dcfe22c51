"""Training and evaluation tiles from scanned tissue: GlaS regions, Kather and NCT tiles, unlabelled lung.

Torch-free (numpy + Pillow), so evaluation and tests can use it without the ``train`` extra.

GlaS regions (colon, cropped from Zeiss MIRAX whole-slide scans at 0.62005 um/px, binary gland masks)
are cut into 224 px tiles at the model's 0.5 um/px by resampling a window of ``224 * 0.5 / 0.62005``
source pixels. A tile is labelled by what it holds (``crop_label``):

- malignant region, gland fraction >= ``tumour_min_gland`` (0.20): **tumour** (tumour glands);
- malignant region, gland fraction <= ``stroma_max_gland`` (0.05): **non-tumour** (tumour-associated
  stroma, inflammation, lumen and background: a heatmap must not mark the stroma between tumour
  glands);
- malignant region, in between: **not used** (a tile that holds a little tumour is neither label);
- healthy region: **non-tumour** (normal crypts, lamina propria, muscle), whatever the gland fraction;
- adenomatous region (benign dysplastic adenoma): **non-tumour** or **not used**, by ``adenoma``.

Patients are split by hand, recorded in ``GLAS_SPLIT``: healthy tissue comes from only five patients
(9: 16 regions, 10: 19, 13: 3, 15: 3, 3: 1), so a hashed split could leave a split without normal
crypts. Test holds patient 10 (the other large healthy block); training holds three healthy patients
(3, 9, 13): a first split with patient 9 alone as the training source of normal crypts learnt that
patient's look, not normal crypts (validation AUC 0.55-0.68 on the other healthy patients); test was
not looked at. Every split holds healthy, adenomatous and malignant regions; no patient is in two.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from models import TILE_PX

TARGET_MPP = 0.5
GLAS_MPP = 0.62005
GLAS_SPLIT: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 5, 7, 8, 9, 13),
    "val": (11, 12, 14, 15),
    "test": (4, 6, 10, 16),
}
"""GlaS patient ids per split (train 97 regions, val 21, test 47)."""


def shared_tiles_dir() -> Path:
    """``<repo>/../shared/data/tiles`` (the shared data next to the checkout)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles"


@dataclass(frozen=True)
class LabelRule:
    """How a GlaS crop is labelled from its region's grade and its gland fraction (0..1)."""

    tumour_min_gland: float = 0.20
    stroma_max_gland: float = 0.05
    adenoma: str = "negative"  # "negative" or "exclude"

    def __post_init__(self) -> None:
        if not 0 <= self.stroma_max_gland < self.tumour_min_gland <= 1:
            raise ValueError(f"need 0 <= stroma_max_gland < tumour_min_gland <= 1, got {self}")
        if self.adenoma not in ("negative", "exclude"):
            raise ValueError(f"adenoma must be 'negative' or 'exclude', got {self.adenoma!r}")


def crop_label(grade: str, gland_fraction: float, rule: LabelRule) -> int | None:
    """1 (tumour), 0 (non-tumour) or None (not used) for a crop of a region of GlaS ``grade``.

    ``grade`` is the index label, e.g. ``malignant/moderately differentiated``, ``benign/healthy``,
    ``benign/adenomatous``.
    """
    if grade.startswith("malignant"):
        if gland_fraction >= rule.tumour_min_gland:
            return 1
        if gland_fraction <= rule.stroma_max_gland:
            return 0
        return None
    if grade.endswith("adenomatous"):
        return 0 if rule.adenoma == "negative" else None
    return 0


def consep_label(epithelial_fraction: float, nuclei_fraction: float) -> int | None:
    """Label of a CoNSeP window (colorectal adenocarcinoma) from its nucleus-type map.

    Fractions are of window pixels. Epithelial nuclei >= 60 % of the nuclear pixels and nuclei >= 5 %
    of the window: **tumour** (CoNSeP's epithelium is about 80-85 % malignant, so these positives are
    noisy); epithelial <= 10 % of the nuclear pixels: **non-tumour** (stroma, muscle, inflammation);
    otherwise, or with almost no nuclei, not used.
    """
    if nuclei_fraction < 0.02:
        return None
    share = epithelial_fraction / nuclei_fraction
    if share >= 0.6 and nuclei_fraction >= 0.05:
        return 1
    if share <= 0.1:
        return 0
    return None


def _integral(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    ii[1:, 1:] = mask.cumsum(0).cumsum(1)
    return ii


def _window_mean(ii: npt.NDArray[np.int64], x0: float, y0: float, side: float) -> float:
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    a, b = int(np.clip(round(x0), 0, w)), int(np.clip(round(x0 + side), 0, w))
    c, d = int(np.clip(round(y0), 0, h)), int(np.clip(round(y0 + side), 0, h))
    area = (b - a) * (d - c)
    if area <= 0:
        return 0.0
    return float(ii[d, b] - ii[c, b] - ii[d, a] + ii[c, a]) / area


@dataclass
class Region:
    """One image region at ``mpp`` um/px with an optional binary mask (True = gland)."""

    name: str
    image: npt.NDArray[np.uint8]  # (H, W, 3)
    mpp: float
    label: str
    group: str
    mask: npt.NDArray[np.bool_] | None = None
    nuclei: npt.NDArray[np.bool_] | None = None  # CoNSeP: pixels of any typed nucleus (mask = epithelial)
    _pil: Image.Image | None = field(default=None, repr=False)
    _integral: npt.NDArray[np.int64] | None = field(default=None, repr=False)
    _nuclei_integral: npt.NDArray[np.int64] | None = field(default=None, repr=False)

    @property
    def pil(self) -> Image.Image:
        if self._pil is None:
            self._pil = Image.fromarray(self.image)
        return self._pil

    def window_px(self, target_mpp: float = TARGET_MPP, tile_px: int = TILE_PX) -> float:
        """Side (source pixels) of the window that becomes one ``tile_px`` tile at ``target_mpp``."""
        return tile_px * target_mpp / self.mpp

    def mask_fraction(self, x0: float, y0: float, side: float) -> float:
        """Fraction of mask pixels in the square window (source pixels; 0 without a mask)."""
        if self.mask is None:
            return 0.0
        if self._integral is None:
            self._integral = _integral(self.mask)
        return _window_mean(self._integral, x0, y0, side)

    def nuclei_fraction(self, x0: float, y0: float, side: float) -> float:
        """Fraction of typed-nucleus pixels in the window (0 without a nucleus map)."""
        if self.nuclei is None:
            return 0.0
        if self._nuclei_integral is None:
            self._nuclei_integral = _integral(self.nuclei)
        return _window_mean(self._nuclei_integral, x0, y0, side)

    def window_label(self, x0: float, y0: float, side: float, rule: LabelRule) -> int | None:
        """Label of a window: ``crop_label`` on the gland fraction, or for CoNSeP ``consep_label``."""
        if self.nuclei is not None:
            return consep_label(self.mask_fraction(x0, y0, side), self.nuclei_fraction(x0, y0, side))
        return crop_label(self.label, self.mask_fraction(x0, y0, side), rule)

    def crop(self, x0: float, y0: float, side: float, tile_px: int = TILE_PX) -> npt.NDArray[np.uint8]:
        """The square window (source pixels, may be fractional) resampled to ``tile_px`` (bilinear)."""
        box = (x0, y0, x0 + side, y0 + side)
        return np.asarray(self.pil.resize((tile_px, tile_px), Image.Resampling.BILINEAR, box=box))

    def grid(self, side: float, stride: float) -> list[tuple[float, float]]:
        """Window origins (source pixels) of a regular grid that stays inside the region."""
        h, w = self.image.shape[:2]
        xs = np.arange(0.0, w - side + 1e-6, stride)
        ys = np.arange(0.0, h - side + 1e-6, stride)
        return [(float(x), float(y)) for y in ys for x in xs]


def macenko_groups(images: npt.NDArray[np.uint8], groups: Sequence[str]) -> npt.NDArray[np.uint8]:
    """Macenko-normalize ``images`` ``(N, H, W, 3)`` to the pipeline's reference stain, one stain fit per
    group (a source picture, region or slide), as ``wsi-infer --normalize macenko`` does per slide.

    A group whose fit fails (too little stained tissue) is left as it is, as the pipeline falls back
    to the reference (an identity transform).
    """
    import warnings

    from wsi_pipeline.stain.macenko import StainFitWarning, apply_macenko, fit_macenko

    out = images.copy()
    g = np.asarray(groups)
    for name in np.unique(g):
        sel = np.flatnonzero(g == name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StainFitWarning)
            try:
                model = fit_macenko(images[sel])
            except ValueError:
                continue
        out[sel] = apply_macenko(images[sel], model)
    return out


def _normalized(reg: Region, stain: str) -> Region:
    if stain == "macenko":
        reg.image = macenko_groups(reg.image[None], ["region"])[0]
    return reg


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def glas_patient(group: str) -> int:
    """Patient id from a GlaS ``group`` (``glas_patient_4`` -> 4)."""
    return int(group.rsplit("_", 1)[1])


def load_glas(
    root: Path | None = None, patients: Sequence[int] | None = None, stain: str = "none"
) -> list[Region]:
    """GlaS regions (with gland masks) of the given patients (all when None), in index order;
    ``stain="macenko"`` normalizes each region with its own fit (``macenko_groups``)."""
    root = root or shared_tiles_dir() / "glas-colon"
    with (root / "index.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    masks = {r["label"].split(":")[-1]: root / r["path"] for r in rows if r["label"].startswith("MASK:")}
    keep = None if patients is None else set(patients)
    out = []
    for r in rows:
        if r["label"].startswith("MASK:") or (keep is not None and glas_patient(r["group"]) not in keep):
            continue
        name = Path(r["path"]).stem
        with Image.open(masks[name]) as im:
            mask = np.asarray(im.convert("L")) > 127
        reg = Region(name, _read_rgb(root / r["path"]), float(r["mpp"]), r["label"], r["group"], mask)
        out.append(_normalized(reg, stain))
    return out


def glas_tiles(
    regions: Sequence[Region], rule: LabelRule, stride_tiles: float = 0.5
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], list[str], list[str]]:
    """Deterministic evaluation tiles: a grid (stride ``stride_tiles`` x window) over every region.

    Returns tiles ``(N, 224, 224, 3)``, labels (crops that ``crop_label`` leaves unused are left out),
    the region label and the patient group of each tile.
    """
    tiles, labels, grades, groups = [], [], [], []
    for reg in regions:
        side = reg.window_px()
        for x0, y0 in reg.grid(side, side * stride_tiles):
            lab = reg.window_label(x0, y0, side, rule)
            if lab is None:
                continue
            tiles.append(reg.crop(x0, y0, side))
            labels.append(lab)
            grades.append(reg.label)
            groups.append(reg.group)
    images = np.stack(tiles) if tiles else np.zeros((0, TILE_PX, TILE_PX, 3), np.uint8)
    return images, np.asarray(labels, dtype=np.int64), grades, groups


CONSEP_MPP = 0.25


def load_consep(
    root: Path | None = None, split: str = "train", stain: str = "none", mask_type: int = 3
) -> list[Region]:
    """CoNSeP source tiles of ``split`` (``train``/``test``, the official split) as regions.

    Each 1000 px tile was re-cut into 16 patches of 256 px; patches 0-8 are its top-left 3 x 3 block,
    contiguous (checked: adjacent edges match to JPEG noise), so a region is that 768 x 768 px mosaic
    at 0.25 um/px (192 um square) with its nucleus-type mosaic: mask = epithelial nuclei (type 3),
    nuclei = any typed nucleus (types 1-4). ``mask_type`` 2 masks inflammatory nuclei instead.
    """
    root = root or shared_tiles_dir() / "consep-patches"
    with (root / "index.csv").open(newline="", encoding="utf-8") as fh:
        groups = sorted({r["group"] for r in csv.DictReader(fh) if r["path"].startswith(f"images/{split}/")})
    out = []
    for g in groups:
        name = g.removeprefix("consep-")
        img = np.zeros((768, 768, 3), np.uint8)
        types = np.zeros((768, 768), np.uint8)
        for k in range(9):
            y, x = divmod(k, 3)
            img[y * 256 : (y + 1) * 256, x * 256 : (x + 1) * 256] = _read_rgb(
                root / "images" / split / f"{name}_{k:03d}.jpg"
            )
            with Image.open(root / "seg_mask" / split / f"{name}_{k:03d}.png") as im:
                types[y * 256 : (y + 1) * 256, x * 256 : (x + 1) * 256] = np.asarray(im)
        reg = Region(name, img, CONSEP_MPP, "consep/adenocarcinoma", g, types == mask_type, types > 0)
        out.append(_normalized(reg, stain))
    return out


MONUSAC_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("TCGA-49-6743", "TCGA-55-7573"),
    "val": ("TCGA-50-6591", "TCGA-73-4662"),
}
"""MoNuSAC lung patients per split. Only these four have a region as large as one tile at 0.5 um/px
(448 px at 0.25 um/px); train holds the largest (31 + 14 half-stride windows), validation the other two
(10 + 20). No test split: there are too few patients, and the windows are all tumour (sensitivity only)."""


def load_monusac(
    root: Path | None = None, patients: Sequence[str] | None = None, stain: str = "none"
) -> list[Region]:
    """MoNuSAC scanned lung regions (TCGA LUAD primary-tumour slides, 0.25 um/px) of ``patients``
    (all when None) as regions for ``consep_label``: mask = epithelial nuclei, nuclei = any typed
    nucleus (epithelial, lymphocyte, macrophage, neutrophil; stroma nuclei are not typed).

    MoNuSAC does not tell malignant from benign epithelium; in these primary-tumour crops epithelial
    nuclei are predominantly carcinoma cells, so epithelium-rich windows are a weak tumour label.
    Masks are lossy JPEG colour maps, decoded by threshold.
    """
    root = root or shared_tiles_dir() / "monusac-lung"
    keep = None if patients is None else set(patients)
    with (root / "index.csv").open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if "he-image" in r["label"]]
    out = []
    for r in rows:
        if keep is not None and r["group"] not in keep:
            continue
        epithelial, typed = _monusac_masks(root / r["path"].replace("images/", "masks/", 1))
        image = _read_rgb(root / r["path"])
        name = Path(r["path"]).stem
        reg = Region(name, image, float(r["mpp"]), "monusac/lung", r["group"], epithelial, typed)
        out.append(_normalized(reg, stain))
    return out


def pad_reflect(tile: npt.NDArray[np.uint8], tile_px: int = TILE_PX) -> npt.NDArray[np.uint8]:
    """Mirror-pad (or centre-crop) a tile to ``tile_px`` square without changing its scale."""
    h, w = tile.shape[:2]
    if h > tile_px:
        tile = tile[(h - tile_px) // 2 : (h - tile_px) // 2 + tile_px]
    if w > tile_px:
        tile = tile[:, (w - tile_px) // 2 : (w - tile_px) // 2 + tile_px]
    h, w = tile.shape[:2]
    ph, pw = tile_px - h, tile_px - w
    return np.pad(tile, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")


def load_labelled_tiles(
    folder: Path, target_mpp: float = TARGET_MPP, stain: str = "none"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], list[str], list[str]]:
    """Kather-style tile sets (``index.csv`` with ``mpp``): rescaled to ``target_mpp``, mirror-padded.

    Returns tiles ``(N, 224, 224, 3)``, tumour labels, class labels and groups.
    """
    with (folder / "index.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    tiles, labels, classes, groups = [], [], [], []
    for r in rows:
        img = _read_rgb(folder / r["path"])
        scale = float(r["mpp"]) / target_mpp
        if abs(scale - 1.0) > 0.02:
            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        tiles.append(pad_reflect(macenko_groups(img[None], ["tile"])[0] if stain == "macenko" else img))
        labels.append(int(r["tumour"]))
        classes.append(r["label"])
        groups.append(r["group"])
    return np.stack(tiles), np.asarray(labels, dtype=np.int64), classes, groups


def load_unlabelled_regions(
    tiles_dir: Path | None = None, target_mpp: float = TARGET_MPP, stain: str = "none"
) -> list[Region]:
    """Unlabelled scanned lung regions (MoNuSAC, MoNuSeg) large enough for one tile at ``target_mpp``."""
    tiles_dir = tiles_dir or shared_tiles_dir()
    out = []
    for name in ("monusac-lung", "monuseg-lung"):
        folder = tiles_dir / name
        if not (folder / "index.csv").exists():
            continue
        with (folder / "index.csv").open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if "he-image" not in r["label"]:
                    continue
                mpp = float(r["mpp"])
                side = TILE_PX * target_mpp / mpp
                if min(int(r["width"]), int(r["height"])) < side:
                    continue
                reg = Region(Path(r["path"]).stem, _read_rgb(folder / r["path"]), mpp, "", r["group"])
                out.append(_normalized(reg, stain))
    return out


IMMUNE_MIN_SHARE = {"monusac": 0.8, "consep": 0.4}
"""Least share of a window's typed-nucleus pixels that immune nuclei must hold for it to count as
inflammation. MoNuSAC types every immune nucleus (lymphocyte, macrophage, neutrophil) but no stroma,
so an immune region is almost all immune (lymphocyte images: 0.96-0.97); CoNSeP also types stroma
(spindle) nuclei, so an inflamed stroma window holds 40 % or more."""
IMMUNE_VAL_MONUSAC = ("TCGA-50-6591", "TCGA-73-4662", "TCGA-55-7570", "TCGA-78-7152", "TCGA-MP-A4T7")
"""MoNuSAC patients whose inflamed regions validate (all but ``MONUSAC_SPLIT["train"]``: the immune
regions of the patients without a region as large as a tile are still wide enough, once padded)."""
IMMUNE_MIN_NUCLEI = 0.05
"""Least share of a window's pixels that are typed nuclei (an inflamed window is crowded)."""


def _monusac_masks(path: Path) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(epithelial, any typed nucleus) from a MoNuSAC lossy JPEG colour mask."""
    colours = _read_rgb(path).astype(np.int16)
    red, green, blue = colours[..., 0], colours[..., 1], colours[..., 2]
    epithelial = (green > 128) & (red < 100) & (blue < 100)
    typed = (red > 128) | (green > 128) | (blue > 128)
    return epithelial, typed


def load_immune(
    tiles_dir: Path | None = None,
    monusac_patients: Sequence[str] | None = None,
    consep_split: str | None = None,
    stain: str = "none",
) -> list[Region]:
    """Scanned regions with immune-nucleus masks, for inflammation as non-tumour.

    MoNuSAC lung regions of ``monusac_patients`` (mask = lymphocyte, macrophage and neutrophil nuclei,
    i.e. typed but not epithelial; label ``monusac/immune``) and the CoNSeP tiles of ``consep_split``
    (mask = inflammatory nuclei, type 2; label ``consep/immune``); ``nuclei`` = any typed nucleus.
    Which windows count is ``immune_windows``'s business.
    """
    tiles_dir = tiles_dir or shared_tiles_dir()
    out = []
    if monusac_patients:
        root = tiles_dir / "monusac-lung"
        with (root / "index.csv").open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if "he-image" in r["label"]]
        for r in rows:
            if r["group"] not in set(monusac_patients):
                continue
            epithelial, typed = _monusac_masks(root / r["path"].replace("images/", "masks/", 1))
            reg = Region(
                Path(r["path"]).stem, _read_rgb(root / r["path"]), float(r["mpp"]), "monusac/immune",
                r["group"], typed & ~epithelial, typed,
            )  # fmt: skip
            out.append(_normalized(reg, stain))
    if consep_split:
        for reg in load_consep(tiles_dir / "consep-patches", consep_split, stain=stain, mask_type=2):
            out.append(replace(reg, label="consep/immune"))
    return out


def immune_windows(
    regions: Sequence[Region], stride_tiles: float = 0.25, max_zoom: float = 1.25
) -> list[tuple[int, float, float, float]]:
    """Inflamed windows of ``regions`` (from ``load_immune``): ``(region index, x0, y0, side)``.

    A window is the model's tile (``window_px`` source pixels) or, in a region narrower than that, a
    square as wide as the region where that zooms in by at most ``max_zoom`` (the scale jitter that
    training applies anyway); immune nuclei must hold ``IMMUNE_MIN_SHARE`` of its typed-nucleus pixels
    and nuclei ``IMMUNE_MIN_NUCLEI`` of its pixels.
    """
    out = []
    for i, reg in enumerate(regions):
        h, w = reg.image.shape[:2]
        nominal = reg.window_px()
        side = min(nominal, h, w)
        if side < nominal / max_zoom:
            continue
        for x0, y0 in reg.grid(side, nominal * stride_tiles):
            if is_inflamed(reg, x0, y0, side):
                out.append((i, x0, y0, side))
    return out


def is_inflamed(reg: Region, x0: float, y0: float, side: float) -> bool:
    """Whether the window (source pixels) of an immune region is inflamed (see ``immune_windows``)."""
    return _inflamed(reg, reg.nuclei_fraction(x0, y0, side), reg.mask_fraction(x0, y0, side))


def _inflamed(reg: Region, nuclei: float, immune: float) -> bool:
    """The rule, on a window's shares of typed-nucleus and immune-nucleus pixels."""
    return nuclei >= IMMUNE_MIN_NUCLEI and immune >= IMMUNE_MIN_SHARE[reg.label.split("/")[0]] * nuclei


def immune_tiles(
    regions: Sequence[Region], stride_tiles: float = 0.5
) -> tuple[npt.NDArray[np.uint8], list[str]]:
    """Deterministic evaluation tiles of inflamed windows (all non-tumour) and their groups.

    Windows are at the model's scale; a region narrower than a tile but at least half a tile wide
    gives windows as wide as it is, mirror-padded to the tile (as Kather tiles are), not zoomed.
    """
    tiles, groups = [], []
    for reg in regions:
        h, w = reg.image.shape[:2]
        nominal = reg.window_px()
        if min(h, w) < nominal / 2:
            continue
        sw, sh = min(nominal, w), min(nominal, h)
        xs = np.arange(0.0, w - sw + 1e-6, nominal * stride_tiles)
        ys = np.arange(0.0, h - sh + 1e-6, nominal * stride_tiles)
        for y0 in ys:
            for x0 in xs:
                nuclei = _window_mean_rect(reg.nuclei, x0, y0, sw, sh)
                if not _inflamed(reg, nuclei, _window_mean_rect(reg.mask, x0, y0, sw, sh)):
                    continue
                size = (round(sw * TILE_PX / nominal), round(sh * TILE_PX / nominal))
                box = (float(x0), float(y0), float(x0 + sw), float(y0 + sh))
                crop = np.asarray(reg.pil.resize(size, Image.Resampling.BILINEAR, box=box))
                tiles.append(pad_reflect(crop))
                groups.append(reg.group)
    images = np.stack(tiles) if tiles else np.zeros((0, TILE_PX, TILE_PX, 3), np.uint8)
    return images, groups


def _window_mean_rect(mask: npt.NDArray[np.bool_] | None, x0: float, y0: float, w: float, h: float) -> float:
    if mask is None:
        return 0.0
    a, b = round(y0), round(y0 + h)
    c, d = round(x0), round(x0 + w)
    return float(mask[a:b, c:d].mean()) if b > a and d > c else 0.0
