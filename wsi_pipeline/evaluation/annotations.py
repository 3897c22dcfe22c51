"""Expert annotations -> shapely geometry: ASAP XML (ACDC@LUNGHP, CAMELYON), Aperio ImageScope XML
(TCGA) and QuPath GeoJSON.

Coordinates are level-0 pixels of the annotated slide. Groups decide what counts: by default every
polygon is positive (tumour) except those in an exclusion group (CAMELYON's ``_2``, ``Exclusion``,
...), which are cut out as non-tumour holes. Invalid polygons (self-intersections) are repaired with
``shapely.make_valid`` keeping their area; holes are kept. XML is parsed with defusedxml, so entity
expansion ("billion laughs") and external entities are refused.

The group of a polygon, per format:

* ASAP XML: the annotation's ``PartOfGroup``;
* QuPath GeoJSON: the feature's classification name, else ``properties.name``, else ``None``;
* ImageScope XML (``Annotations/Annotation/Regions/Region/Vertices/Vertex``): each ``<Annotation>``
  is a layer, and its group is the layer's ``Name`` when it has one, else the name of its first layer
  attribute other than ``Description`` (TCGA's ``<Attribute Name="CaP">``), else ``layer <Id>``.
  A region with ``NegativeROA="1"`` is an exclusion (a hole: cut out of the tumour like ASAP's
  ``_2``) unless its layer is ignored by the mapping; ImageScope's ``LineColor`` is not read.
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
    negative: int = 0  # ImageScope regions with NegativeROA="1" (exclusions) that were counted
    format: str = ""  # "asap", "imagescope" or "geojson"

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
    path: Path,
    items: Iterable[tuple[str, Any, bool]],
    skipped: dict[str, int],
    mapping: GroupMapping,
    fmt: str,
) -> Annotations:
    """Union ``(group, polygon, negative)`` items by what the mapping makes of their group; a negative
    item (an ImageScope ``NegativeROA`` region) of a counted group is an exclusion."""
    from shapely import MultiPolygon, union_all

    pos, exc = [], []
    groups: dict[str, int] = {}
    repaired = negative = 0
    for group, geom, is_negative in items:
        fixed, was_invalid = _repair(geom)
        repaired += was_invalid
        if fixed.is_empty:
            continue
        groups[group] = groups.get(group, 0) + 1
        kind = mapping.kind(group)
        if kind == "ignored":
            continue
        if is_negative:
            negative += 1
            exc.append(fixed)
        elif kind == "positive":
            pos.append(fixed)
        else:
            exc.append(fixed)
    return Annotations(
        path=path,
        positive=_polygonal(union_all(pos)) if pos else MultiPolygon(),
        exclusion=_polygonal(union_all(exc)) if exc else MultiPolygon(),
        groups=groups,
        repaired=repaired,
        skipped=skipped,
        negative=negative,
        format=fmt,
    )


MAX_COORD = 1e8
"""Largest plausible level-0 coordinate (px): 100x any real slide's side; beyond it is an error."""


def _coordinate(text: str) -> float:
    """A coordinate attribute: ``2100.5``, or ``2100,5`` as ASAP writes under comma-decimal locales."""
    t = text.strip()
    if "," in t and "." not in t:
        t = t.replace(",", ".")
    return float(t)


def _empty_file(p: Path) -> bool:
    """An empty (or blank) annotation file: annotated, no tumour (README)."""
    return p.is_file() and not p.read_bytes().strip()


def _parse_xml(p: Path) -> Any:
    """The root element of an XML annotation file, parsed safely; errors name the file and the fix."""
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    try:
        return DET.parse(str(p)).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{p}: no such annotation file") from None
    except DefusedXmlException as exc:
        raise AnnotationError(
            f"{p}: refused unsafe XML ({type(exc).__name__}: entity declarations or external references); "
            f"export the annotations again from ASAP or ImageScope"
        ) from exc
    except Exception as exc:  # ParseError and friends
        raise AnnotationError(
            f"{p}: malformed XML ({exc}); check the file is a complete ASAP or ImageScope export"
        ) from exc


def _point(p: Path, where: str, x_text: str | None, y_text: str | None) -> tuple[float, float]:
    """A vertex from its X and Y attributes, checked to be numbers within any slide."""
    try:
        x, y = _coordinate(x_text or ""), _coordinate(y_text or "")
    except ValueError:
        raise AnnotationError(f"{p}: {where} has a coordinate that is not a number") from None
    if not (abs(x) <= MAX_COORD and abs(y) <= MAX_COORD):
        raise AnnotationError(
            f"{p}: {where} has a coordinate ({x:g}, {y:g}) far outside any slide (|x|, |y| <= "
            f"{MAX_COORD:g} level-0 px); fix or re-export the annotation"
        )
    return x, y


def _asap_items(p: Path, root: Any) -> tuple[list[tuple[str, Any, bool]], dict[str, int]]:
    from shapely import Polygon

    items: list[tuple[str, Any, bool]] = []
    skipped: dict[str, int] = {}
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "Polygon").strip().lower()
        group = ann.get("PartOfGroup") or "None"
        coords = ann.find("Coordinates")
        where = f"annotation {i} ({ann.get('Name')!r})"
        pts: list[tuple[int, float, float]] = []
        for c in coords.iter("Coordinate") if coords is not None else []:
            x, y = _point(p, where, c.get("X"), c.get("Y"))
            try:
                order = int(c.get("Order", len(pts)))
            except ValueError:
                raise AnnotationError(f"{p}: {where} has a coordinate Order that is not a number") from None
            pts.append((order, x, y))
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
        items.append((group, Polygon(xy), False))
    return items, skipped


def _imagescope_group(layer: Any) -> str:
    """A layer's group: its Name, else its first attribute other than Description, else ``layer <Id>``."""
    name = (layer.get("Name") or "").strip()
    if name:
        return name
    attrs = layer.find("Attributes")
    for a in attrs.findall("Attribute") if attrs is not None else []:
        a_name = (a.get("Name") or "").strip()
        if a_name and a_name.lower() != "description":
            return a_name
    return f"layer {(layer.get('Id') or '?').strip()}"


def _imagescope_items(p: Path, root: Any) -> tuple[list[tuple[str, Any, bool]], dict[str, int]]:
    from shapely import Polygon

    items: list[tuple[str, Any, bool]] = []
    skipped: dict[str, int] = {}
    for layer in root.findall("Annotation"):
        group = _imagescope_group(layer)
        regions = layer.find("Regions")
        for region in regions.findall("Region") if regions is not None else []:
            where = f"layer {group!r} region {region.get('Id')!r}"
            verts = region.find("Vertices")
            xy = [
                _point(p, where, v.get("X"), v.get("Y"))
                for v in (verts.findall("Vertex") if verts is not None else [])
            ]
            if len(xy) < 3:  # a point, line, arrow or ruler: no area
                skipped["degenerate"] = skipped.get("degenerate", 0) + 1
                continue
            negative = (region.get("NegativeROA") or "0").strip() == "1"
            items.append((group, Polygon(xy), negative))
    return items, skipped


def read_asap_xml(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """Read an ASAP XML file (``<ASAP_Annotations>``): Polygon, Rectangle and Spline areas; Dot and
    PointSet are counted in ``skipped``. Raises :class:`AnnotationError` naming the file."""
    p = Path(path)
    if _empty_file(p):
        return _assemble(p, [], {}, mapping or GroupMapping(), "asap")
    root = _parse_xml(p)
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{p}: root element <{root.tag}> is not <ASAP_Annotations>; not an ASAP file")
    return _assemble(p, *_asap_items(p, root), mapping or GroupMapping(), "asap")


def read_imagescope_xml(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """Read an Aperio ImageScope XML file (``<Annotations>`` of layers, each with ``Regions``):
    every region of three or more vertices is a polygon, grouped by its layer (see the module
    docstring); ``NegativeROA="1"`` regions are exclusions; regions of fewer vertices are counted in
    ``skipped``. Raises :class:`AnnotationError` naming the file."""
    p = Path(path)
    if _empty_file(p):
        return _assemble(p, [], {}, mapping or GroupMapping(), "imagescope")
    root = _parse_xml(p)
    if root.tag != "Annotations":
        raise AnnotationError(f"{p}: root element <{root.tag}> is not <Annotations>; not an ImageScope file")
    return _assemble(p, *_imagescope_items(p, root), mapping or GroupMapping(), "imagescope")


def read_xml(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """ASAP (``<ASAP_Annotations>``) or ImageScope (``<Annotations>``) XML, by the root element."""
    p = Path(path)
    if _empty_file(p):
        return _assemble(p, [], {}, mapping or GroupMapping(), "")
    root = _parse_xml(p)
    if root.tag == "ASAP_Annotations":
        return _assemble(p, *_asap_items(p, root), mapping or GroupMapping(), "asap")
    if root.tag == "Annotations":
        return _assemble(p, *_imagescope_items(p, root), mapping or GroupMapping(), "imagescope")
    raise AnnotationError(
        f"{p}: root element <{root.tag}> is neither <ASAP_Annotations> (ASAP) nor <Annotations> "
        f"(Aperio ImageScope); export the annotations in one of those formats or as QuPath GeoJSON"
    )


def read_geojson(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """Read QuPath GeoJSON (FeatureCollection, a list of Features, or one Feature). The group is the
    feature's classification name (else ``properties.name``, else "None"); holes are kept."""
    from shapely.geometry import shape

    p = Path(path)
    if _empty_file(p):
        return _assemble(p, [], {}, mapping or GroupMapping(), "geojson")
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
    items: list[tuple[str, Any, bool]] = []
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
        items.append((group, geom, False))
    return _assemble(p, items, skipped, mapping or GroupMapping(), "geojson")


def read_annotations(path: str | os.PathLike[str], mapping: GroupMapping | None = None) -> Annotations:
    """ASAP or ImageScope XML (.xml, told apart by the root element) or GeoJSON (.geojson/.json)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_xml(path, mapping)
    if suffix in (".geojson", ".json"):
        return read_geojson(path, mapping)
    raise AnnotationError(
        f"{path}: unknown annotation format (expected .xml ASAP or ImageScope, or .geojson/.json QuPath)"
    )


def write_asap_xml(
    path: str | os.PathLike[str],
    polygons: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    generator: str | None = None,
) -> Path:
    """Write ``(group, [(x, y), ...])`` polygons (level-0 px) as ASAP XML, with the groups declared;
    ``generator`` goes in a comment after the declaration (the mark of a file this package wrote)."""
    from xml.sax.saxutils import quoteattr

    from wsi_pipeline.provenance import atomic_write_bytes

    lines = ['<?xml version="1.0"?>']
    if generator:
        lines.append(f"<!-- generator: {generator.replace('--', '- -')} -->")
    lines += ["<ASAP_Annotations>", "\t<Annotations>"]
    colours = {"_2": "#64FE2E", "Exclusion": "#64FE2E"}
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
