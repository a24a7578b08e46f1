"""Draw the IU X-ray report sentences of the labeler's annotated evaluation set (a reproducible, seeded draw).

    .venv/bin/python benchmarks/labeler_draw.py --out /tmp/iu_sentences_skeleton.tsv [--seed 17]
    .venv/bin/python benchmarks/labeler_draw.py --check benchmarks/data/iu_sentences_annotated.tsv

Writes the skeleton of benchmarks/data/iu_sentences_annotated.tsv: one row per drawn sentence with its report uid,
the sentence's sha1 (first 12 hex digits of the sha1 of its UTF-8 text, exactly as
``parse_report(report.raw_text()).sentences`` gives it), its split and section, and empty label columns to fill
in by hand. ``--check`` draws again and says whether an annotated file holds exactly the drawn sentences.

The IU reports are CC BY-NC-ND 4.0: no sentence text is written, only references that
benchmarks/labeler_annotated.py resolves against the archive installed with torchxrayvision.

The draw, over FINDINGS + IMPRESSION sentences de-duplicated by exact text (the first occurrence in uid order
stands for the text; a text is drawn at most once):
1. RANDOM sentences drawn uniformly from all sentence occurrences (so frequent texts are likelier, as in real
   reports), skipping texts already drawn;
2. PER_OBSERVATION sentences per observation among those holding one of its broad keyword stems (``STEMS``: word
   starts, deliberately broader than the labeler's phrases so that the draw does not favour its phrasing);
3. HEDGED sentences holding a hedge word and NEGATED sentences holding a negation word;
4. TOP_UP more sentences for each observation the first three strata leave thin in IU (``TOP_UP_STEMS``: still
   stems, narrower than ``STEMS`` so that they find the rare findings).
The split is by report, so that all drawn sentences of one report fall in the same half: ``test`` when the first
hex digit of sha1(uid) is even, else ``dev``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from radalign.data.reports import parse_report
from radalign.data.sources.iu_xray import read_iu_reports

OBSERVATIONS = (
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
    "nodule",
    "mass",
)
COLUMNS = ("uid", "sha1", "split", "section", *OBSERVATIONS)

# word starts separated by "|", matched case-insensitively at a word boundary ("rib" matches "ribs", not "describe")
STEMS = {
    "enlarged_cardiomediastinum": "mediastin|cardiomediastin|widen|hila|contour|silhouette|aort",
    "cardiomegaly": "cardi|heart|silhouette|pericard",
    "lung_opacity": "opaci|infiltr|densit|hazy|haziness|airspace|air space|interstitial|marking|reticul|scar|fibros"
    "|ground",
    "lung_lesion": "lesion|nodul|mass|granulom|cavit|tumor|neoplas|carcinom|metasta",
    "edema": "edema|congest|vascular|cephaliz|kerley|heart failure|chf|overload|fluid",
    "consolidation": "consolid|airspace|air space|opaci|lobar",
    "pneumonia": "pneumon|infect|aspirat|inflamm|bronchit",
    "atelectasis": "atelecta|collapse|volume loss|subsegmental|platelike|plate-like|discoid|linear|scar",
    "pneumothorax": "pneumothor|pneumomediast|free air|subcutaneous|apical|lucen",
    "pleural_effusion": "effusion|pleural|costophrenic|blunt|fluid|meniscus",
    "pleural_other": "pleural|thicken|plaque|calcif|fibrothorax|apical cap|apical pleural",
    "fracture": "fractur|rib|deform|callus|heal|osseous|bony|vertebra|clavic|compression|skelet",
    "support_devices": "tube|catheter|pacemaker|pacer|wire|clip|stent|line|port|device|sternotomy|lead|valve|hardware"
    "|prosthe|surgical|picc|icd|drain",
    "nodule": "nodul|granulom|calcifi|round|densit|spot",
    "mass": "mass|tumor|neoplas|lesion|malignan|carcinom|metasta",
}
HEDGES = (
    "may|might|could|possibl|probabl|cannot|can not|suggest|versus|vs|likely|question|suspicious|concern|differential"
    "|equivocal|borderline|favor|represent|consider|presum|perhaps|uncertain|not exclude|indeterminate"
)
NEGATIONS = "no|not|without|negative|free of|resolved|resolution|absent|none"  # whole words

SEED = 17
RANDOM = 40
PER_OBSERVATION = 18
HEDGED = 30
NEGATED = 30
# rare in IU or diluted by generic matches of the broad stems ("osseous structures are normal")
TOP_UP = 10
TOP_UP_STEMS = {
    "enlarged_cardiomediastinum": "mediastin|widen|paratrach|aortic knob|aortic arch",
    "consolidation": "consolid|lobar|airspace|air space",
    "pneumonia": "pneumon|infect|aspirat",
    "pleural_other": "thicken|plaque|apical cap|pleural-parenchymal|pleuroparenchymal|pleural scar|fibrothorax",
    "fracture": "fractur|callus|healed|compression|wedg",
}


@dataclass(frozen=True)
class Drawn:
    uid: str
    sha1: str
    section: str
    text: str  # held in memory only, never written


def sentence_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def split_of(uid: str) -> str:
    return "test" if int(hashlib.sha1(uid.encode("utf-8")).hexdigest()[0], 16) % 2 == 0 else "dev"


def _pattern(stems: str, whole_words: bool = False) -> re.Pattern[str]:
    body = "|".join(re.escape(s) for s in stems.split("|"))
    return re.compile(rf"\b(?:{body})" + (r"\b" if whole_words else ""), re.IGNORECASE)


def iu_sentences() -> list[Drawn]:
    """Every FINDINGS + IMPRESSION sentence occurrence of the IU reports, in uid order."""
    out = []
    for report in read_iu_reports():
        parsed = parse_report(report.raw_text())
        for text, section in zip(parsed.sentences, parsed.sentence_sections, strict=True):
            out.append(Drawn(report.uid, sentence_sha1(text), section, text))
    return out


def draw(seed: int = SEED) -> list[tuple[Drawn, str]]:
    """The drawn sentences with the stratum that drew each, in draw order."""
    rng = random.Random(seed)
    occurrences = iu_sentences()
    first: dict[str, Drawn] = {}
    for s in occurrences:
        first.setdefault(s.text, s)
    unique = list(first.values())  # uid order
    taken: set[str] = set()
    drawn: list[tuple[Drawn, str]] = []

    def take(candidates: list[Drawn], n: int, stratum: str) -> None:
        order = list(range(len(candidates)))
        rng.shuffle(order)
        got = 0
        for i in order:
            if got == n:
                break
            s = first[candidates[i].text]
            if s.text not in taken:
                taken.add(s.text)
                drawn.append((s, stratum))
                got += 1

    take(occurrences, RANDOM, "random")
    for observation in OBSERVATIONS:
        pattern = _pattern(STEMS[observation])
        take([s for s in unique if pattern.search(s.text)], PER_OBSERVATION, observation)
    hedge, negation = _pattern(HEDGES), _pattern(NEGATIONS, whole_words=True)
    take([s for s in unique if hedge.search(s.text)], HEDGED, "hedged")
    take([s for s in unique if negation.search(s.text)], NEGATED, "negated")
    for observation, stems in TOP_UP_STEMS.items():
        pattern = _pattern(stems)
        take([s for s in unique if pattern.search(s.text)], TOP_UP, f"top-up {observation}")
    return drawn


def _uid_key(uid: str) -> tuple[int, str]:
    digits = "".join(c for c in uid if c.isdigit())
    return (int(digits) if digits else -1, uid)


def skeleton_rows(seed: int = SEED) -> list[tuple[str, str, str, str]]:
    """(uid, sha1, split, section) of the drawn sentences, sorted by report number then sha1."""
    rows = {(s.uid, s.sha1, split_of(s.uid), s.section) for s, _ in draw(seed)}
    return sorted(rows, key=lambda r: (_uid_key(r[0]), r[1]))


def read_rows(path: Path) -> list[tuple[str, str, str, str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    return [tuple(line.split("\t")[:4]) for line in lines[1:]]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, help="skeleton TSV to write (refuses to overwrite a file)")
    parser.add_argument("--check", type=Path, help="an annotated TSV: does it hold exactly this draw?")
    args = parser.parse_args()
    drawn = draw(args.seed)
    rows = skeleton_rows(args.seed)
    strata: dict[str, int] = {}
    for _, stratum in drawn:
        strata[stratum] = strata.get(stratum, 0) + 1
    splits = {name: sum(r[2] == name for r in rows) for name in ("dev", "test")}
    print(f"{len(rows)} sentences from {len({r[0] for r in rows})} reports (seed {args.seed}); by split {splits}")
    print("drawn per stratum:", strata)
    if args.check:
        have = read_rows(args.check)
        missing, extra = set(rows) - set(have), set(have) - set(rows)
        if missing or extra:
            sys.exit(f"{args.check} differs from the draw: {len(missing)} drawn rows missing, {len(extra)} extra")
        print(f"{args.check} holds exactly the drawn sentences")
    if args.out:
        if args.out.exists():
            sys.exit(f"{args.out} exists; not overwriting it (the annotations would be lost)")
        header = (
            f"# drawn by: .venv/bin/python benchmarks/labeler_draw.py --seed {args.seed} --out {args.out}\n"
            "# labels: 1 positive, 0 negative, -1 uncertain, empty not mentioned\n"
        )
        body = "".join("\t".join([*row, *[""] * len(OBSERVATIONS)]) + "\n" for row in rows)
        args.out.write_text(header + "\t".join(COLUMNS) + "\n" + body, encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
