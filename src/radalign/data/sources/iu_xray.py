"""Reader for the Indiana University chest X-ray reports (Demner-Fushman et al. 2016, Open-i; CC BY-NC-ND 4.0).

The archive ``NLMCXR_reports.tgz`` shipped with torchxrayvision (found by :func:`radalign.assets.iu_reports_path`
without importing it) holds one XML file per study, ``ecgen-radiology/<n>.xml``: 3,955 reports. It is read
straight from the archive with :mod:`tarfile`, nothing is extracted to disk, in well under a second.

Per report the reader keeps:
- ``uid`` ("CXR1"), from ``<uId id=...>``; reports are returned sorted by its number.
- ``sections``: the ``<AbstractText Label="...">`` elements in file order (COMPARISON, INDICATION, FINDINGS,
  IMPRESSION in every file), text exactly as stored, "" where the element is empty. The text still holds the
  de-identification placeholders (``XXXX``) and some markup (``<BR>``, ``&gt;``): cleaning is
  :func:`radalign.data.reports.clean_text`'s job.
- ``mesh_major`` / ``mesh_automatic``: the ``<MeSH>`` terms, ``<major>`` (assigned by the annotators) and
  ``<automatic>`` (assigned by NLM's Medical Text Indexer), e.g. "Opacity/lung/base/left/mild".
- ``image_ids``: ``<parentImage id=...>`` ("CXR1_1_IM-0001-3001"), the image file names without ".png";
  some reports have none.
"""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from radalign.errors import DataError


@dataclass
class IUReport:
    uid: str
    sections: dict[str, str] = field(default_factory=dict)  # XML label -> text ("" when empty), in file order
    mesh_major: tuple[str, ...] = ()
    mesh_automatic: tuple[str, ...] = ()
    image_ids: tuple[str, ...] = ()

    def raw_text(self, sections: Iterable[str] | None = None) -> str:
        """The report as "LABEL: text" lines (all non-empty sections, or those named), for parse_report."""
        wanted = None if sections is None else {s.upper() for s in sections}
        return "\n".join(
            f"{label}: {text.strip()}"
            for label, text in self.sections.items()
            if text.strip() and (wanted is None or label.upper() in wanted)
        )


def _uid_number(report: IUReport) -> tuple[int, str]:
    digits = "".join(c for c in report.uid if c.isdigit())
    return (int(digits) if digits else -1, report.uid)


def parse_iu_xml(data: bytes, source: str = "IU report") -> IUReport:
    """One ``ecgen-radiology/<n>.xml`` file -> IUReport."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise DataError(f"{source} is not well-formed XML ({err}); the archive is damaged, reinstall it") from None
    uid_element = root.find("uId")
    uid = uid_element.get("id") if uid_element is not None else None
    if not uid:
        raise DataError(f"{source} has no <uId id=...>; is this an IU X-ray (Open-i) report file?")
    sections: dict[str, str] = {}
    for element in root.iter("AbstractText"):
        label = (element.get("Label") or "").strip().upper()
        if label:
            # itertext: the text is plain in this archive, but nested tags would otherwise lose their words
            sections[label] = "".join(element.itertext())
    mesh = root.find("MeSH")
    terms = list(mesh) if mesh is not None else []
    return IUReport(
        uid=uid,
        sections=sections,
        mesh_major=tuple(t.text.strip() for t in terms if t.tag == "major" and t.text and t.text.strip()),
        mesh_automatic=tuple(t.text.strip() for t in terms if t.tag == "automatic" and t.text and t.text.strip()),
        image_ids=tuple(image.get("id", "") for image in root.iter("parentImage") if image.get("id")),
    )


def read_iu_reports(path: Path | None = None) -> list[IUReport]:
    """All reports in the IU archive (default: the one shipped with torchxrayvision), sorted by uid number."""
    if path is None:
        from radalign.assets import iu_reports_path

        path = iu_reports_path()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IU reports archive {path} does not exist; pass the path of NLMCXR_reports.tgz")
    reports = []
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                reports.append(parse_iu_xml(handle.read(), source=f"{path}:{member.name}"))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read the IU reports archive {path}: {err}; re-download or reinstall it") from None
    if not reports:
        raise DataError(f"{path} holds no ecgen-radiology/*.xml report files; is it NLMCXR_reports.tgz?")
    return sorted(reports, key=_uid_number)
