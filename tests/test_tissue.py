"""Tissue mask: known regions, background, borders, units, and per-tile fractions."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import Fixture, shared
from testkit.synthetic import Ellipse, SyntheticSlide, SyntheticSpec
from wsi_pipeline.io.slide import open_slide, read_thumbnail
from wsi_pipeline.tiling.tissue import TissueParams, tissue_fraction_in_boxes, tissue_mask


def _render(spec: SyntheticSpec, mask_mpp: float = 8.0):  # type: ignore[no-untyped-def]
    reader = SyntheticSlide(spec)
    th = read_thumbnail(reader, spec.mpp, target_mpp=mask_mpp)
    ys = (np.arange(th.image.shape[0]) + 0.5)[:, None] * th.downsample
    xs = (np.arange(th.image.shape[1]) + 0.5)[None, :] * th.downsample
    return th, spec.tissue_at(xs, ys)


SPEC = SyntheticSpec(
    width=8192, height=6144, mpp=0.5, tissue=(Ellipse(3000, 3000, 2000, 1500), Ellipse(6500, 2000, 900, 900)),
    black_border_px=300, downsamples=(1, 4, 16),
)  # fmt: skip


def test_mask_matches_known_tissue() -> None:
    th, truth = _render(SPEC)
    mask = tissue_mask(th.image, mpp=th.mpp)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    # The black scanner border is not tissue.
    border_cols = int(SPEC.black_border_px / th.downsample)
    assert not mask[:, :border_cols].any()


def test_white_slide_has_no_tissue() -> None:
    th, _ = _render(SyntheticSpec(width=4096, height=4096, mpp=0.5, tissue=()))
    mask = tissue_mask(th.image, mpp=th.mpp)
    assert not mask.any()


def test_black_and_empty_images_have_no_tissue() -> None:
    assert not tissue_mask(np.zeros((50, 60, 3), np.uint8), mpp=8.0).any()
    assert tissue_mask(np.zeros((0, 0, 3), np.uint8), mpp=8.0).shape == (0, 0)


def test_noisy_glass_is_not_tissue() -> None:
    rng = np.random.default_rng(3)
    glass = np.clip(rng.normal(240, 4, (200, 200, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(glass, mpp=8.0).mean() < 0.01


def test_specks_are_removed_by_area_in_um2() -> None:
    # A 40x40 um tissue speck (1600 um^2) is dropped with the default 10,000 um^2 minimum,
    # whatever the thumbnail resolution.
    for mpp in (4.0, 8.0):
        img = np.full((200, 200, 3), 242, np.uint8)
        side = int(40 / mpp)
        img[50 : 50 + side, 50 : 50 + side] = (200, 110, 170)
        img[100:190, 100:190] = (200, 110, 170)
        mask = tissue_mask(img, mpp=mpp)
        assert not mask[50 : 50 + side, 50 : 50 + side].any()
        assert mask[100:190, 100:190].all()
        kept = tissue_mask(img, mpp=mpp, params=TissueParams(min_tissue_um2=100.0))
        assert kept[50 : 50 + side, 50 : 50 + side].all()


def test_mask_is_consistent_across_scanner_resolutions() -> None:
    """The same physical slide scanned at 0.25 and 0.5 um/px gives the same tissue area (mm^2)."""
    areas = []
    for mpp in (0.25, 0.5):
        f = 0.5 / mpp
        spec = SyntheticSpec(
            width=int(8192 * f), height=int(6144 * f), mpp=mpp,
            tissue=tuple(Ellipse(e.cx * f, e.cy * f, e.rx * f, e.ry * f) for e in SPEC.tissue),
            downsamples=(1, 4, 16, 32),
        )  # fmt: skip
        th, _ = _render(spec)
        areas.append(tissue_mask(th.image, mpp=th.mpp).sum() * th.mpp**2 / 1e6)
    assert areas[0] == pytest.approx(areas[1], rel=0.02)
    truth_mm2 = sum(np.pi * e.rx * e.ry for e in SPEC.tissue) * 0.25 / 1e6
    assert areas[0] == pytest.approx(truth_mm2, rel=0.05)


def test_fraction_in_boxes_exact_on_toy_mask() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # 4x4 block
    boxes = np.array(
        [
            [20, 20, 60, 60],  # exactly the block (downsample 10)
            [0, 0, 40, 40],  # a quarter of it: 2x2 of 4x4
            [70, 70, 100, 100],  # none
            [20, 20, 21, 21],  # smaller than a mask pixel: at least one pixel
        ],
        float,
    )
    f = tissue_fraction_in_boxes(mask, boxes, downsample=10.0)
    np.testing.assert_allclose(f, [1.0, 4 / 16, 0.0, 1.0])


@pytest.mark.realdata
def test_real_slide_tissue_fraction() -> None:
    r = open_slide(shared("slides", "aperio", "CMU-1-Small-Region.svs"))
    th = read_thumbnail(r, 0.499)
    frac = tissue_mask(th.image, mpp=th.mpp).mean()
    assert 0.25 < frac < 0.5  # skin section covering about a third of the region (checked by eye)


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8])
def test_disk_footprint_is_scikit_images(radius: int) -> None:
    from skimage.morphology import disk as sk_disk

    from wsi_pipeline.tiling.tissue import disk

    np.testing.assert_array_equal(disk(radius), sk_disk(radius).astype(bool))


@pytest.mark.parametrize("threshold", [1, 10**12])
def test_the_mask_libraries_are_imported_during_a_large_thumbnail_decode_only(
    aperio_slide: Fixture, monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    """plan_slide imports scipy on another thread while a thumbnail of at least PRELOAD_MIN_PIXELS
    level pixels decodes (the decode releases the GIL); below, the import would only compete with the
    planning thread, so it is left to tissue_mask."""
    import threading

    import wsi_pipeline.tiling.plan as plan

    started: list[str] = []
    monkeypatch.setattr(plan, "preload_libraries", lambda: started.append(threading.current_thread().name))
    monkeypatch.setattr(plan, "PRELOAD_MIN_PIXELS", threshold)
    reader = open_slide(aperio_slide.path)
    plan.plan_slide(reader, plan.TileOptions())
    reader.close()
    for t in threading.enumerate():
        if t.name == "wsi-preload":
            t.join()
    assert started == (["wsi-preload"] if threshold == 1 else [])
