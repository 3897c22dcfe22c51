"""Expert annotations -> shapely geometry: ASAP XML (ACDC@LUNGHP, CAMELYON) and QuPath GeoJSON.

Coordinates are level-0 pixels of the annotated slide. Groups decide what counts: by default every
polygon is positive (tumour) except those in an exclusion group (CAMELYON's ``_2``, ``Exclusion``,
...), which are cut out as non-tumour holes. Invalid polygons (self-intersections) are repaired with
``shapely.make_valid`` keeping their area; holes are kept. XML is parsed with defusedxml, so entity
expansion ("billion laughs") and external entities are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import AnnotationError

#: Group names treated as exclusions (non-tumour holes) unless the caller says otherwise.
DEFAULT_EXCLUSION_GROUPS: frozenset[str] = frozenset(
    {"_2", "exclusion", "exclude", "excluded", "non-tumor", "non-tumour", "normal", "negative"}
)
#: Group names always ignored (no area meaning).
_POINT_TYPES = {"dot", "pointset", "point", "multipoint"}


@dataclass(frozen=True)
class GroupMapping:
    """Which annotation groups are positive, which are exclusions.

    ``positive``: if given, only these groups are positive (case-insensitive); otherwise every group
    that is not an exclusion is. ``exclusion``: groups subtracted from the positive area.
    """

    positive: frozenset[str] | None = None
    exclusion: frozenset[str] = DEFAULT_EXCLUSION_GROUPS

    def kind(self, group: str) -> str:
        g = group.strip().lower()
        if g in {e.lower() for e in self.exclusion}:
            return "exclusion"
        if self.positive is None or g in {p.lower() for p in self.positive}:
            return "positive"
        return "ignored"


@dataclass(frozen=True)
class Annotations:
    """Geometry read from one annotation file (level-0 pixels)."""

    path: Path
    positive: Any  # shapely (Multi)Polygon: union of positive polygons
    exclusion: Any  # shapely (Multi)Polygon: union of exclusion polygons
    groups: dict[str, int] = field(default_factory=dict)  # polygons per group
    repaired: int = 0  # invalid polygons that were repaired
    skipped: dict[str, int] = field(default_factory=dict)  # non-area annotations by type

    @property
    def tumour(self) -> Any:
        """Positive area minus exclusions: what a prediction is scored against."""
        return self.positive.difference(self.exclusion)

    def scaled(self, factor: float) -> Any:
        """The tumour geometry in the coordinates of a level ``factor`` times smaller than level 0."""
        from shapely import affinity

        return affinity.scale(self.tumour, xfact=1 / factor, yfact=1 / factor, origin=(0, 0))


def _polygonal(geom: Any) -> Any:
    """Keep only the polygonal part of a geometry (make_valid may return collections)."""
    from shapely import MultiPolygon, Polygon, union_all

    if isinstance(geom, Polygon | MultiPolygon):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon | MultiPolygon)]
    return union_all(parts) if parts else MultiPolygon()


def _repair(geom: Any) -> tuple[Any, bool]:
    from shapely import make_valid

    if geom.is_valid:
        return geom, False
    return _polygonal(make_valid(geom)), True


def _assemble(
    path: Path, items: Iterable[tuple[str, Any]], mapping: GroupMapping, skipped: dict[str, int]
) -> Annotations:
    from shapely import MultiPolygon, union_all

    pos, exc = [], []
    groups: dict[str, int] = {}
    repaired = 0
    for group, geom in items:
        fixed, was_invalid = _repair(geom)
        repaired += was_invalid
        if fixed.is_empty:
            continue
        groups[group] = groups.get(group, 0) + 1
        kind = mapping.kind(group)
        if kind == "positive":
            pos.append(fixed)
        elif kind == "exclusion":
            exc.append(fixed)
    return Annotations(
        path=path,
        positive=_polygonal(union_all(pos)) if pos else MultiPolygon(),
        exclusion=_polygonal(union_all(exc)) if exc else MultiPolygon(),
        groups=groups,
        repaired=repaired,
        skipped=skipped,
    )


MAX_COORD = 1e8
"""Largest plausible level-0 coordinate (px): 100x any real slide's side; beyond it is an error."""


def _coordinate(text: str) -> float:
    """A coordinate attribute: ``2100.5``, or ``2100,5`` as ASAP writes under comma-decimal locales."""
    t = text.strip()
    if "," in t and "." not in t:
        t = t.replace(",", ".")
    return float(t)


def read_asap_xml(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """Read an ASAP XML file (``<ASAP_Annotations>``): Polygon, Rectangle and Spline areas; Dot and
    PointSet are counted in ``skipped``. Raises :class:`AnnotationError` naming the file."""
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException
    from shapely import Polygon

    p = Path(path)
    if p.is_file() and not p.read_bytes().strip():  # an empty file: annotated, no tumour (README)
        return _assemble(p, [], mapping or GroupMapping(), {})
    try:
        root = DET.parse(str(p)).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{p}: no such annotation file") from None
    except DefusedXmlException as exc:
        raise AnnotationError(
            f"{p}: refused unsafe XML ({type(exc).__name__}: entity declarations or external references); "
            f"export the annotations again from ASAP"
        ) from exc
    except Exception as exc:  # ParseError and friends
        raise AnnotationError(
            f"{p}: malformed XML ({exc}); check the file is a complete ASAP export"
        ) from exc
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{p}: root element <{root.tag}> is not <ASAP_Annotations>; not an ASAP file")
    items: list[tuple[str, Any]] = []
    skipped: dict[str, int] = {}
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "Polygon").strip().lower()
        group = ann.get("PartOfGroup") or "None"
        coords = ann.find("Coordinates")
        pts: list[tuple[int, float, float]] = []
        for c in coords.iter("Coordinate") if coords is not None else []:
            try:
                x, y = _coordinate(c.get("X", "")), _coordinate(c.get("Y", ""))
                pts.append((int(c.get("Order", len(pts))), x, y))
            except ValueError:
                raise AnnotationError(
                    f"{p}: annotation {i} ({ann.get('Name')!r}) has a coordinate that is not a number"
                ) from None
            if not (abs(x) <= MAX_COORD and abs(y) <= MAX_COORD):
                raise AnnotationError(
                    f"{p}: annotation {i} ({ann.get('Name')!r}) has a coordinate ({x:g}, {y:g}) far outside "
                    f"any slide (|x|, |y| <= {MAX_COORD:g} level-0 px); fix or re-export the annotation"
                )
        if kind in _POINT_TYPES:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        pts.sort()
        xy = [(x, y) for _, x, y in pts]
        if kind == "rectangle" and len(xy) == 2:
            (x0, y0), (x1, y1) = xy
            xy = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        if len(xy) < 3:
            skipped["degenerate"] = skipped.get("degenerate", 0) + 1
            continue
        items.append((group, Polygon(xy)))
    return _assemble(p, items, mapping or GroupMapping(), skipped)


def read_geojson(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """Read QuPath GeoJSON (FeatureCollection, a list of Features, or one Feature). The group is the
    feature's classification name (else ``properties.name``, else "None"); holes are kept."""
    from shapely.geometry import shape

    p = Path(path)
    if p.is_file() and not p.read_bytes().strip():  # an empty file: annotated, no tumour (README)
        return _assemble(p, [], mapping or GroupMapping(), {})
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"{p}: no such annotation file") from None
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{p}: not valid JSON ({exc}); export the annotations again") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        raise AnnotationError(f"{p}: not a GeoJSON Feature, FeatureCollection or list of Features")
    items: list[tuple[str, Any]] = []
    skipped: dict[str, int] = {}
    for f in feats:
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            skipped["no-geometry"] = skipped.get("no-geometry", 0) + 1
            continue
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        group = str(
            cls.get("name") if isinstance(cls, dict) and cls.get("name") else props.get("name") or "None"
        )
        try:
            geom = shape(f["geometry"])
        except Exception as exc:
            raise AnnotationError(f"{p}: a feature has an unreadable geometry ({exc})") from exc
        if not geom.is_empty and not all(abs(v) <= MAX_COORD for v in geom.bounds):
            raise AnnotationError(
                f"{p}: a feature has coordinates {geom.bounds} far outside any slide (|x|, |y| <= "
                f"{MAX_COORD:g} level-0 px); fix or re-export the annotation"
            )
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            t = geom.geom_type.lower()
            skipped[t] = skipped.get(t, 0) + 1
            continue
        items.append((group, geom))
    return _assemble(p, items, mapping or GroupMapping(), skipped)


def read_annotations(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """ASAP XML (.xml) or GeoJSON (.geojson/.json), by extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path, mapping)
    if suffix in (".geojson", ".json"):
        return read_geojson(path, mapping)
    raise AnnotationError(f"{path}: unknown annotation format (expected .xml ASAP or .geojson/.json)")


def write_asap_xml(
    path: str | os.PathLike[str], polygons: Sequence[tuple[str, Sequence[tuple[float, float]]]]
) -> Path:
    """Write ``(group, [(x, y), ...])`` polygons (level-0 px) as ASAP XML, with the groups declared."""
    from xml.sax.saxutils import quoteattr

    from wsi_pipeline.provenance import atomic_write_bytes

    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    colours = {"_2": "#64FE2E"}
    for i, (group, pts) in enumerate(polygons):
        lines.append(
            f'\t\t<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup={quoteattr(group)} '
            f'Color="{colours.get(group, "#F4FA58")}">'
        )
        lines.append("\t\t\t<Coordinates>")
        lines += [
            f'\t\t\t\t<Coordinate Order="{j}" X="{x:.4f}" Y="{y:.4f}" />' for j, (x, y) in enumerate(pts)
        ]
        lines += ["\t\t\t</Coordinates>", "\t\t</Annotation>"]
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for g in dict.fromkeys(g for g, _ in polygons):
        lines.append(
            f'\t\t<Group Name={quoteattr(g)} PartOfGroup="None" Color="{colours.get(g, "#FF0000")}">'
        )
        lines += ["\t\t\t<Attributes />", "\t\t</Group>"]
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>", ""]
    return atomic_write_bytes(path, "\n".join(lines).encode())
