"""The finding knowledge base (MLIP): the shipped file covers every default finding, agrees with the report
labeler's vocabulary, and malformed files are refused with messages naming the file, entry and fix."""

from __future__ import annotations

import pytest
import yaml

from radalign.data.knowledge import KnowledgeBase, default_knowledge_path
from radalign.data.labeler import Labeler
from radalign.data.schema import DEFAULT_FINDINGS
from radalign.errors import ConfigError


def test_the_shipped_knowledge_covers_every_default_finding():
    knowledge = KnowledgeBase.from_yaml()
    assert set(knowledge.findings) == set(DEFAULT_FINDINGS)
    entry = knowledge["pleural_effusion"]
    assert "blunting of the costophrenic angle" in entry.signs and "effusion" in entry.synonyms
    texts = entry.texts()
    assert len(texts) == 3 and texts[0].startswith("Pleural effusion: Fluid")
    assert knowledge.term_index()["hydrothorax"] == "pleural_effusion"


def test_every_knowledge_term_is_a_mention_for_the_report_labeler():
    """One vocabulary: a finding's name and synonyms are what the labeler recognises as that finding."""
    knowledge, labeler = KnowledgeBase.from_yaml(), Labeler.from_yaml()
    missed = [(e.finding, term) for e in knowledge.entries.values() if e.finding != "no_finding"
              for term in e.terms() if labeler.label_sentence(f"{term}.").get(e.finding) != 1]  # fmt: skip
    assert not missed


def _write(tmp_path, findings, **top):
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "findings": findings, **top}), encoding="utf-8")
    return path


def _entry(**changes):
    entry = {"name": "thing", "definition": "A thing.", "signs": ["a sign"], "locations": ["a place"],
             "synonyms": ["the thing"]}  # fmt: skip
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize(
    ("findings", "top", "message"),
    [
        ({"x": _entry(colour="red")}, {}, "entry 'x': unknown key 'colour'"),
        ({"x": _entry(definition="  ")}, {}, "entry 'x': definition is empty"),
        ({"x": _entry(signs=[])}, {}, "entry 'x': signs must be a non-empty list"),
        ({"x": _entry(synonyms=[True])}, {}, "not a phrase"),
        ({"x": _entry(locations=None)}, {}, "entry 'x': missing locations"),
        ({"x": _entry(), "y": _entry(name="other", synonyms=["The Thing"])}, {}, "'the thing' also names 'x'"),
        ({"x": _entry()}, {"extra": 1}, "unknown top-level key 'extra'"),
        ({}, {}, "non-empty 'findings'"),
    ],
)
def test_malformed_knowledge_files_are_refused_with_the_file_and_entry(tmp_path, findings, top, message):
    path = _write(tmp_path, findings, **top)
    with pytest.raises(ConfigError, match=message) as err:
        KnowledgeBase.from_yaml(path)
    assert str(path) in str(err.value)


def test_own_files_replace_or_extend_the_shipped_one(tmp_path):
    path = _write(tmp_path, {"bronchiectasis": _entry(name="bronchiectasis", synonyms=["dilated bronchi"])})
    assert KnowledgeBase.from_yaml(path).findings == ["bronchiectasis"]
    extended = KnowledgeBase.from_yaml(path, extend=True)
    assert "bronchiectasis" in extended and "cardiomegaly" in extended
    with pytest.raises(ConfigError, match="does not exist; start from a copy of"):
        KnowledgeBase.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no entry for finding 'x'"):
        KnowledgeBase.from_yaml()["x"]
    assert default_knowledge_path().is_file()
