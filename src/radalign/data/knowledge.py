"""Finding knowledge: a definition, radiographic signs, typical locations and synonyms per finding (MLIP).

The shipped file (``configs/knowledge/default.yaml``, docs/knowledge.md) was written for radalign from general
radiology knowledge: UMLS, which MLIP used, is licensed and cannot ship. A user can pass their own file, for
example one exported from UMLS under their own licence, or extend the shipped one. Files are checked strictly:
an unknown key, an empty field or a synonym claimed by two findings is an error naming the file, the entry and the
fix, because a knowledge text that silently goes missing would only show up as a weaker model.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from radalign.errors import ConfigError

FIELDS = ("name", "definition", "signs", "locations", "synonyms")
LIST_FIELDS = ("signs", "locations", "synonyms")


def default_knowledge_path() -> Path:
    return Path(str(resources.files("radalign") / "configs" / "knowledge" / "default.yaml"))


@dataclass(frozen=True)
class KnowledgeEntry:
    finding: str  # radalign's finding name (the label_<finding> column)
    name: str  # how reports name it
    definition: str
    signs: tuple[str, ...]
    locations: tuple[str, ...]
    synonyms: tuple[str, ...]

    def texts(self) -> list[str]:
        """The entry as sentences for the text encoder: the definition, the signs, the locations."""
        return [
            f"{self.name.capitalize()}: {self.definition}",
            f"Signs of {self.name}: {', '.join(self.signs)}.",
            f"{self.name.capitalize()} is typically seen in: {', '.join(self.locations)}.",
        ]

    def terms(self) -> tuple[str, ...]:
        """The name and every synonym: the words that mention this finding."""
        return (self.name, *self.synonyms)


class KnowledgeBase:
    """Finding -> :class:`KnowledgeEntry`, in file order. ``KnowledgeBase.from_yaml()`` reads the shipped file."""

    def __init__(self, entries: dict[str, KnowledgeEntry], source: str = "") -> None:
        self.entries = dict(entries)
        self.source = source

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, *, extend: bool = False) -> KnowledgeBase:
        """The knowledge in ``path`` (default: the shipped file); ``extend`` adds its findings to the shipped ones
        (a finding in both: the file's entry replaces the shipped one)."""
        import yaml

        shipped = default_knowledge_path()
        path = shipped if path is None else Path(path)
        if not path.is_file():
            raise ConfigError(f"knowledge file {path} does not exist; start from a copy of {shipped}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"knowledge file {path} is not valid YAML: {err}") from err
        findings = _check_shape(data, path)
        if extend and path != shipped:
            base = yaml.safe_load(shipped.read_text(encoding="utf-8"))["findings"]
            findings = {**base, **findings}
        return cls(parse_entries(findings, path), str(path))

    @property
    def findings(self) -> list[str]:
        return list(self.entries)

    def __getitem__(self, finding: str) -> KnowledgeEntry:
        if finding not in self.entries:
            raise ConfigError(
                f"knowledge {self.source}: no entry for finding {finding!r}; it has {', '.join(self.entries)}. Add "
                "an entry (docs/knowledge.md) or leave the finding out"
            )
        return self.entries[finding]

    def __contains__(self, finding: object) -> bool:
        return finding in self.entries

    def term_index(self) -> dict[str, str]:
        """Lower-cased name or synonym -> its finding: one vocabulary for everything that names findings."""
        return {term.lower(): entry.finding for entry in self.entries.values() for term in entry.terms()}


def _check_shape(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict) or not data["findings"]:
        raise ConfigError(f"knowledge file {path}: expected a mapping with a non-empty 'findings' mapping")
    unknown = sorted(set(data) - {"version", "findings"})
    if unknown:
        raise ConfigError(f"knowledge file {path}: unknown top-level key {unknown[0]!r}; valid: version, findings")
    return data["findings"]


def parse_entries(findings: dict[str, Any], path: Path | str) -> dict[str, KnowledgeEntry]:
    """Validate and build the entries; every message names the file, the entry and what to change."""
    entries: dict[str, KnowledgeEntry] = {}
    claimed: dict[str, str] = {}  # lower-cased term -> the finding that uses it
    for finding, spec in findings.items():
        where = f"knowledge file {path}, entry {finding!r}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a mapping with {', '.join(FIELDS)}")
        unknown = sorted(set(spec) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(FIELDS)}")
        missing = [k for k in FIELDS if k not in spec]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}; every entry needs {', '.join(FIELDS)}")
        for key in ("name", "definition"):
            if not isinstance(spec[key], str) or not spec[key].strip():
                raise ConfigError(f"{where}: {key} is empty or not text; write it (quote it if YAML misreads it)")
        lists: dict[str, tuple[str, ...]] = {}
        for key in LIST_FIELDS:
            value = spec[key]
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}: {key} must be a non-empty list of phrases, got {value!r}")
            bad = [v for v in value if not isinstance(v, str) or not v.strip()]
            if bad:
                raise ConfigError(f"{where}: {key} holds {bad[0]!r}, which is not a phrase (quote yes / no / on)")
            lists[key] = tuple(v.strip() for v in value)
        entry = KnowledgeEntry(finding, spec["name"].strip(), " ".join(spec["definition"].split()), lists["signs"],
                               lists["locations"], lists["synonyms"])  # fmt: skip
        for term in dict.fromkeys(t.lower() for t in entry.terms()):
            other = claimed.get(term)
            if other is not None and other != finding:
                raise ConfigError(
                    f"{where}: the term {term!r} also names {other!r}; a synonym may belong to one finding only "
                    "(keep it where it fits best, or make it more specific)"
                )
            claimed[term] = finding
        entries[finding] = entry
    return entries
