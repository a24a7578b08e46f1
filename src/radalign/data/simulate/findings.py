"""Which findings a simulated patient has: the finding vocabulary, its validation, and a prevalence sampler.

Design decisions (docs/simulated-data.md):

- Vocabulary. ``FINDING_KINDS`` lists the simulated kinds. Every kind has a fixed set of valid locations, sides
  and severities (``KIND_RULES``), checked in :class:`Finding`; a finding that fails is a ConfigError naming the
  field, the value and the allowed values. Locations are CT-mask lobes (``LOBES``, the same names as
  ``anatomy.LOBES``) for nodule, mass, consolidation and atelectasis, and zones for the rest: pneumothorax
  ``apical``, pleural effusion ``basal``, edema ``perihilar``, cardiomegaly ``heart``. Support devices have no
  location; their ``device`` is one of ``DEVICES`` (tubes and lines only, drawn as such in the volume).
- Sides. A lobe fixes the side (``right_lower`` -> ``right``); leaving ``side`` out derives it, and a side that
  contradicts the lobe is an error. Edema is always ``bilateral``; cardiomegaly, the endotracheal tube and the
  nasogastric tube have no side (None); a central venous catheter is ``left`` or ``right`` (subclavian).
- Sizes. Nodules are below 30 mm and masses 30 mm or more (the radiological definition); the sampler draws
  whole millimetres, 6-29 mm and 30-60 mm. ``tip_cm`` is the endotracheal tube tip's distance above the carina,
  3-6 cm when sampled ("standard position"), so the report can state it.
- Prevalence. ``normal_fraction`` of the samples have no finding at all (no device either). Every other sample
  is an abnormal study: each kind is drawn independently with its prevalence, and the draw is repeated until it
  has at least one finding (after 100 empty draws, which only happens with tiny prevalences, one kind is picked
  in proportion to its prevalence). A prevalence is therefore "the probability of the finding in an abnormal
  study", before conditioning; its share of the whole data set is roughly
  ``(1 - normal_fraction) * p / P(at least one finding)``. A prevalence of 0 always means never.
- Coupling. Edema is drawn first; with edema present, pleural effusion and cardiomegaly become more likely
  (``p -> p + (1 - p) * EDEMA_COUPLING[kind]``: congestive heart failure), and an effusion is bilateral more often.
- Counts. At most one finding per kind, except nodules: a second one, in another lobe, with probability
  ``SECOND_NODULE_PROBABILITY``.
- Certainty. Each finding except devices is ``uncertain`` with probability ``uncertain_fraction``. Uncertain
  findings are the subtle ones a radiologist would hedge on: mildest severity, nodules at most 15 mm.
- Order. The list is returned in ``FINDING_KINDS`` order, which is also the order the volume inserter edits the
  CT: parenchymal findings first, then pleural fluid and air, which displace lung, then devices on top.
- Determinism. All randomness comes from the ``rng`` argument: the same generator state gives the same list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from radalign.data.schema import finding_key
from radalign.errors import ConfigError

FINDING_KINDS: tuple[str, ...] = (
    "cardiomegaly", "edema", "consolidation", "atelectasis", "nodule", "mass",
    "pleural_effusion", "pneumothorax", "support_device",
)  # fmt: skip
SIDES: tuple[str, ...] = ("left", "right", "bilateral")
LOBES: tuple[str, ...] = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")
ZONES: tuple[str, ...] = ("apical", "basal", "perihilar", "heart")
LOCATIONS: tuple[str, ...] = (*LOBES, *ZONES)
EXTENT_SEVERITIES: tuple[str, ...] = ("small", "moderate", "large")  # effusion, pneumothorax
GRADE_SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")  # edema, cardiomegaly, consolidation
SEVERITIES: tuple[str, ...] = ("small", "mild", "moderate", "large", "severe")
CERTAINTIES: tuple[str, ...] = ("definite", "uncertain")
DEVICES: tuple[str, ...] = ("endotracheal tube", "central venous catheter", "nasogastric tube")
NODULE_MAX_MM = 30.0  # a nodule is < 3 cm; 3 cm or more is a mass


@dataclass(frozen=True)
class KindRule:
    locations: tuple[str | None, ...]
    sides: tuple[str | None, ...]
    severities: tuple[str, ...] = ()  # empty: severity must be None


_LATERAL = ("left", "right")
KIND_RULES: dict[str, KindRule] = {
    "cardiomegaly": KindRule(("heart",), (None,), GRADE_SEVERITIES),
    "edema": KindRule(("perihilar",), ("bilateral",), GRADE_SEVERITIES),
    "consolidation": KindRule(LOBES, _LATERAL, GRADE_SEVERITIES),
    "atelectasis": KindRule(LOBES, _LATERAL),
    "nodule": KindRule(LOBES, _LATERAL),
    "mass": KindRule(LOBES, _LATERAL),
    "pleural_effusion": KindRule(("basal",), SIDES, EXTENT_SEVERITIES),
    "pneumothorax": KindRule(("apical",), _LATERAL, EXTENT_SEVERITIES),
    "support_device": KindRule((None,), (None, *_LATERAL)),
}


def _allowed(values: Sequence[str | None]) -> str:
    return ", ".join("None" if v is None else repr(v) for v in values)


def _check(field: str, value: object, allowed: Sequence[str | None], context: str = "") -> None:
    if value not in allowed:
        raise ConfigError(f"Finding.{field}: {value!r} is not valid{context}; allowed: {_allowed(allowed)}")


@dataclass(frozen=True)
class Finding:
    """One simulated finding: what, where, how large or severe, and how sure the report is about it."""

    kind: str
    side: str | None = None  # "left" | "right" | "bilateral" | None (midline / whole heart); derived from a lobe
    location: str | None = None  # a lobe (LOBES) or a zone (ZONES); None for devices
    size_mm: float | None = None  # nodule < 30 mm, mass >= 30 mm; None for other kinds
    severity: str | None = None  # small/moderate/large or mild/moderate/severe, per kind (KIND_RULES)
    certainty: str = "definite"  # "definite" | "uncertain" (the report hedges; label -1)
    device: str | None = None  # support_device only: one of DEVICES
    tip_cm: float | None = None  # endotracheal tube only: tip distance above the carina (cm)

    def __post_init__(self) -> None:
        _check("kind", self.kind, FINDING_KINDS)
        _check("side", self.side, (*SIDES, None))
        _check("location", self.location, (*LOCATIONS, None))
        _check("severity", self.severity, (*SEVERITIES, None))
        _check("certainty", self.certainty, CERTAINTIES)
        _check("device", self.device, (*DEVICES, None))
        rule = KIND_RULES[self.kind]
        for_kind = f" for kind {self.kind!r}"
        _check("location", self.location, rule.locations, for_kind)
        if self.side is None and (self.location in LOBES or rule.sides == ("bilateral",)):
            # frozen dataclass: fill in the one side that the lobe (or the kind) allows
            derived = self.location.split("_")[0] if self.location in LOBES else "bilateral"
            object.__setattr__(self, "side", derived)
        if self.location in LOBES and self.side != self.location.split("_")[0]:
            raise ConfigError(
                f"Finding.side: {self.side!r} contradicts location {self.location!r}; "
                f"allowed: {self.location.split('_')[0]!r} (or leave side out)"
            )
        _check("side", self.side, rule.sides, for_kind)
        _check("severity", self.severity, (*rule.severities, None), for_kind)
        self._check_size()
        self._check_device()

    def _check_size(self) -> None:
        if self.kind not in ("nodule", "mass"):
            if self.size_mm is not None:
                raise ConfigError(
                    f"Finding.size_mm: {self.size_mm!r} given for kind {self.kind!r}; only nodules and "
                    f"masses have a size, leave it None"
                )
            return
        size = self.size_mm
        if size is None:
            return
        if not isinstance(size, int | float) or not math.isfinite(size) or size <= 0:
            raise ConfigError(f"Finding.size_mm: {size!r} is not a positive number of millimetres")
        if self.kind == "nodule" and size >= NODULE_MAX_MM:
            raise ConfigError(
                f"Finding.size_mm: {size!r} mm is too large for a nodule (< {NODULE_MAX_MM:g} mm); use kind 'mass'"
            )
        if self.kind == "mass" and size < NODULE_MAX_MM:
            raise ConfigError(
                f"Finding.size_mm: {size!r} mm is too small for a mass (>= {NODULE_MAX_MM:g} mm); use kind 'nodule'"
            )

    def _check_device(self) -> None:
        if self.kind != "support_device":
            if self.device is not None or self.tip_cm is not None:
                raise ConfigError(f"Finding.device/tip_cm: given for kind {self.kind!r}; only support_device has them")
            return
        if self.device is None:
            raise ConfigError(f"Finding.device: a support_device needs one; allowed: {_allowed(DEVICES)}")
        if self.certainty != "definite":
            raise ConfigError("Finding.certainty: support devices are always 'definite' (tubes are not hedged)")
        sides = _LATERAL if self.device == "central venous catheter" else (None,)
        _check("side", self.side, sides, f" for device {self.device!r}")
        if self.tip_cm is not None and (self.device != "endotracheal tube" or not 0 < self.tip_cm <= 10):
            raise ConfigError(
                f"Finding.tip_cm: {self.tip_cm!r}; only an endotracheal tube has a tip distance, "
                f"in (0, 10] cm above the carina"
            )


# Per-kind probability in an abnormal study (see the module docstring): roughly realistic ordering, but high
# enough that every kind is frequent in a few hundred samples.
DEFAULT_PREVALENCES: dict[str, float] = {
    "cardiomegaly": 0.20, "edema": 0.12, "consolidation": 0.20, "atelectasis": 0.20, "nodule": 0.15,
    "mass": 0.06, "pleural_effusion": 0.25, "pneumothorax": 0.08, "support_device": 0.15,
}  # fmt: skip
DEFAULT_NORMAL_FRACTION = 0.3
DEFAULT_UNCERTAIN_FRACTION = 0.1
EDEMA_COUPLING: dict[str, float] = {"pleural_effusion": 0.4, "cardiomegaly": 0.35}
SECOND_NODULE_PROBABILITY = 0.25
_MAX_ATTEMPTS = 100
_ALIASES = {"support_devices": "support_device", "effusion": "pleural_effusion"}  # label-key spellings

# Anatomical placement weights (lobe order as LOBES): nodules and masses favour the upper lobes, consolidation
# and atelectasis the dependent lower lobes.
_LOBE_WEIGHTS: dict[str, tuple[float, ...]] = {
    "nodule": (0.30, 0.10, 0.20, 0.25, 0.15),
    "mass": (0.30, 0.10, 0.20, 0.25, 0.15),
    "consolidation": (0.15, 0.15, 0.30, 0.15, 0.25),
    "atelectasis": (0.00, 0.15, 0.40, 0.05, 0.40),
}
_EXTENT_WEIGHTS = (0.50, 0.35, 0.15)  # small, moderate, large
_GRADE_WEIGHTS = (0.45, 0.40, 0.15)  # mild, moderate, severe
_DEVICE_WEIGHTS = (0.40, 0.35, 0.25)  # as DEVICES


def validate_prevalences(prevalences: Mapping[str, float] | None = None) -> dict[str, float]:
    """The full prevalence table: ``DEFAULT_PREVALENCES`` updated with ``prevalences`` (names as FINDING_KINDS,
    any case; the spellings "support_devices" and "effusion" are accepted). Unknown names and values outside
    [0, 1] are ConfigErrors."""
    table = dict(DEFAULT_PREVALENCES)
    for name, value in (prevalences or {}).items():
        key = finding_key(name) if isinstance(name, str) and name.strip() else str(name)
        key = _ALIASES.get(key, key)
        if key not in table:
            raise ConfigError(f"prevalences: unknown finding {name!r}; known: {', '.join(FINDING_KINDS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"prevalences: {name!r} = {value!r} is not a probability; use a number in [0, 1]")
        table[key] = float(value)
    return table


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} = {value!r} is not a fraction; use a number in [0, 1]")
    return float(value)


def _pick(rng: np.random.Generator, options: Sequence, weights: Sequence[float] | None = None):
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _draw_kinds(rng: np.random.Generator, table: Mapping[str, float]) -> list[str]:
    """One independent draw per kind (edema first, for the coupling); the same number of draws every time."""
    u = rng.random(len(FINDING_KINDS))
    has_edema = u[0] < table["edema"]
    kinds = []
    for kind, draw in zip(("edema", *(k for k in FINDING_KINDS if k != "edema")), u, strict=True):
        p = table[kind]
        if has_edema and p > 0:
            p += (1.0 - p) * EDEMA_COUPLING.get(kind, 0.0)
        if draw < p:
            kinds.append(kind)
    return kinds


def _make(rng: np.random.Generator, kind: str, uncertain: bool, *, edema: bool, taken: set[str]) -> Finding:
    certainty = "uncertain" if uncertain else "definite"
    if kind in _LOBE_WEIGHTS:
        weights = [0.0 if lobe in taken else w for lobe, w in zip(LOBES, _LOBE_WEIGHTS[kind], strict=True)]
        lobe = _pick(rng, LOBES, weights if sum(weights) > 0 else _LOBE_WEIGHTS[kind])
        size = None
        if kind == "nodule":
            size = float(rng.integers(6, 16 if uncertain else 30))
        elif kind == "mass":
            size = float(rng.integers(30, 61))
        severity = None
        if kind == "consolidation":
            severity = "mild" if uncertain else _pick(rng, GRADE_SEVERITIES, _GRADE_WEIGHTS)
        return Finding(kind, None, lobe, size, severity, certainty)
    if kind in ("cardiomegaly", "edema"):
        severity = "mild" if uncertain else _pick(rng, GRADE_SEVERITIES, _GRADE_WEIGHTS)
        return Finding(kind, None, KIND_RULES[kind].locations[0], severity=severity, certainty=certainty)
    if kind in ("pleural_effusion", "pneumothorax"):
        if kind == "pleural_effusion":
            side = _pick(rng, SIDES, (0.2, 0.2, 0.6) if edema else (0.4, 0.4, 0.2))
        else:
            side = _pick(rng, _LATERAL)
        severity = "small" if uncertain else _pick(rng, EXTENT_SEVERITIES, _EXTENT_WEIGHTS)
        return Finding(kind, side, KIND_RULES[kind].locations[0], severity=severity, certainty=certainty)
    device = _pick(rng, DEVICES, _DEVICE_WEIGHTS)
    side = _pick(rng, _LATERAL, (0.35, 0.65)) if device == "central venous catheter" else None
    tip = float(rng.integers(6, 13)) / 2.0 if device == "endotracheal tube" else None  # 3.0-6.0 cm, 0.5 steps
    return Finding(kind, side, device=device, tip_cm=tip)


def sample_findings(
    rng: np.random.Generator,
    prevalences: Mapping[str, float] | None = None,
    normal_fraction: float = DEFAULT_NORMAL_FRACTION,
    uncertain_fraction: float = DEFAULT_UNCERTAIN_FRACTION,
) -> list[Finding]:
    """Draw one simulated patient's findings (empty for a normal study), in ``FINDING_KINDS`` order.

    ``prevalences`` overrides ``DEFAULT_PREVALENCES`` per kind; see the module docstring for their meaning."""
    table = validate_prevalences(prevalences)
    normal_fraction = _fraction("normal_fraction", normal_fraction)
    uncertain_fraction = _fraction("uncertain_fraction", uncertain_fraction)
    if rng.random() < normal_fraction or not any(table.values()):
        return []
    for _ in range(_MAX_ATTEMPTS):
        kinds = _draw_kinds(rng, table)
        if kinds:
            break
    else:
        kinds = [_pick(rng, FINDING_KINDS, [table[k] for k in FINDING_KINDS])]
    if "nodule" in kinds and rng.random() < SECOND_NODULE_PROBABILITY:
        kinds.append("nodule")
    edema = "edema" in kinds
    findings: list[Finding] = []
    taken: set[str] = set()  # lobes holding a nodule: a second nodule goes elsewhere
    for kind in sorted(kinds, key=FINDING_KINDS.index):
        uncertain = kind != "support_device" and rng.random() < uncertain_fraction
        finding = _make(rng, kind, uncertain, edema=edema, taken=taken if kind == "nodule" else set())
        if kind == "nodule" and finding.location is not None:
            taken.add(finding.location)
        findings.append(finding)
    return findings
