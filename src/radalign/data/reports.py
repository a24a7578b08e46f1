"""Radiology report text: sections, cleaning and sentence splitting.

:func:`parse_report` runs the whole pipeline: decode bytes (UTF-8 only) -> :func:`extract_sections` on the raw
text, whose line structure it needs -> :func:`clean_text` on each section -> sentence splitting of the chosen
sections -> :class:`~radalign.data.schema.Report`.

Decisions:

Sections (:func:`extract_sections`)
- Only headers in ``SECTION_SYNONYMS`` are recognised, in any case, as ``HEADER:``, ``Header :``, or a header
  alone on its line without a colon. Mid-line (``"... clear. IMPRESSION: Normal."``) a header needs its colon
  and must be written in capitals, or in title case right after ``. ! ? ; :``; so prose such as "the following
  findings:" stays text. Unknown headers (MIMIC's "PA AND LATERAL VIEWS OF THE CHEST:") stay in the text of
  the section they appear in: nothing is dropped.
- Synonyms map to one canonical key: REPORT, RESULT(S), OBSERVATIONS, DESCRIPTION -> FINDINGS; CONCLUSION(S),
  OPINION, SUMMARY, INTERPRETATION, DIAGNOSIS, ASSESSMENT -> IMPRESSION; HISTORY, CLINICAL HISTORY/DETAILS/NOTES,
  CLINICAL INDICATION/INFORMATION, REASON FOR EXAM(INATION)/STUDY/REFERRAL -> INDICATION; PROCEDURE, PROTOCOL ->
  TECHNIQUE; EXAM -> EXAMINATION; RECOMMENDATIONS -> RECOMMENDATION (the full list: ``SECTION_SYNONYMS``).
  A combined "FINDINGS AND IMPRESSION" (or ``/``, ``&``) section goes to FINDINGS only, so the default
  FINDINGS + IMPRESSION selection reads it once.
- Text before the first header goes to ``PREAMBLE``. MIMIC-CXR's "FINAL REPORT" title (and CheXpert-Plus's
  NARRATIVE) is a header that maps to PREAMBLE too, so a WET READ before it ends there and unheaded text after
  it is kept.
- A header that appears again (or two synonyms) concatenates its texts, in reading order, as paragraphs.
  Keys are in order of first appearance. Lines of only ``_``, ``=``, ``-`` or ``*`` (4 or more) are separators.

Cleaning (:func:`clean_text`)
- De-identification placeholders, IU's ``XXXX`` (any case, 4+ x, also inside words: ``x-XXXX``),
  MIMIC-CXR's ``___`` and MIMIC-III's ``[**...**]``, all become one token, ``PLACEHOLDER = "___"`` (MIMIC's own
  convention, a token of no BERT vocabulary's special set). A run of placeholders separated only by spaces is one
  placeholder. They are kept rather than removed because removal breaks grammar ("There are no of a pleural
  effusion"); pass ``placeholder=""`` to remove them.
- List markers ("1. ", "2)", "(3)", "2.No", and bullets "- ", "* ", "•" at line starts) are removed. A number
  counts as a marker at a line start, after sentence-final punctuation (``. ! ? : ;``), or as part of a run
  1, 2, 3... followed by a capital (IU writes "1. Cardiomegaly 2. Ectatic aorta"); "1.5 cm", "ESR of 92." and
  "rib 5." are untouched; so is a lone mid-line "1." (IU's "Chest 1. No acute disease." keeps "Chest 1." as a
  sentence, since "rib 1. No effusion" looks the same). A removed marker and a blank line (paragraph break) end a
  sentence: a "." is added to the text before them when it has no final punctuation, as list items and
  paragraphs often lack it ("Hand 1. Fracture. 2. Lucency." -> "Hand. Fracture. Lucency.").
- HTML entities are decoded, ``<br>`` is a line break, IU's editing marks ``[<`` and ``>]`` are dropped,
  whitespace is collapsed to single spaces, a space before ``. , ; :`` is removed, runs of periods become one,
  and leading ``. , ; : - * •`` and trailing ``, ; : - * •`` are stripped. Nothing else changes: case, words and
  other punctuation are kept. The steps repeat until nothing changes, so ``clean_text`` is idempotent.

Sentences (:func:`split_sentences`)
- Rule-based: a sentence ends at ``. ! ?`` (plus closing quotes or brackets) followed by a space or the end,
  or at "word.Word" with no space (IU: "effusion.Heart size"). IU starts sentences in lower case too
  ("pneumothoraces. heart size is normal"), so the next word's case matters only after an ambiguous
  abbreviation. Never an end: after titles and Latin abbreviations (``Dr. vs. approx. e.g. i.e. pt.`` ...), a
  single letter (initials), a detached mark ("pt with ? h/o"), or inside a number ("1.5"). Ambiguous (a unit,
  "etc.", "a.m.", "No."): an end only when a capital follows ("6 cm. No effusion" splits; "1 cm. nodule",
  "10 a.m. on", "at ___ p.m. ___", "No. 5" do not).
- Like cleaning, splitting removes list markers and ends sentences at list items and blank lines, so it can be
  used on raw text ("1. Stable. 2. No effusion." -> ["Stable.", "No effusion."]).
- Fragments without a word character (a stray "." or ")") join the neighbouring sentence. No sentence is
  empty and each is stripped, with inner whitespace collapsed.
- Guarantee: the sentences of a cleaned section, joined, equal the section up to whitespace. Splitting only
  cuts, and cleaned text has no list marker or blank line left (cleaning is idempotent), so nothing is lost;
  the numbering markers that cleaning removed are the only characters of the raw text missing from sentences.

Reports (:func:`parse_report`)
- Sentences come from the chosen sections (default FINDINGS and IMPRESSION; synonyms accepted) in reading
  order of first appearance (not the order of the ``sections`` argument). If none of them has text but the report
  has unheaded text (PREAMBLE; typically a report without any header), that text is used and its sentences are
  labelled ``PREAMBLE``; other sections (INDICATION...) never stand in. An empty or whitespace-only report gives a
  Report without sentences and no error: the caller decides whether that is one.
- ``Report.sections`` holds every non-empty section, cleaned; ``Report.raw`` the decoded input.
- Bytes must be UTF-8 (a BOM is allowed); anything else is refused with a :class:`DataError` that gives the byte
  offset and how to re-encode, because guessing a code page silently corrupts characters such as "°" or "µ".
  Input that is neither str nor bytes (None, a pandas NaN) is a DataError too.
"""

from __future__ import annotations

import html
import itertools
import re
from collections.abc import Iterable

from radalign.data.schema import Report
from radalign.errors import DataError

PLACEHOLDER = "___"
PREAMBLE = "PREAMBLE"

# MIMIC-CXR, IU X-ray, CheXpert-Plus (its section_* columns) and the spellings of typical hospital exports
# (docs/data.md, "Report sections"); a header not listed stays text of the section it appears in.
SECTION_SYNONYMS: dict[str, str] = {
    "FINDINGS": "FINDINGS", "FINDING": "FINDINGS",
    "FINDINGS AND IMPRESSION": "FINDINGS", "FINDINGS/IMPRESSION": "FINDINGS", "FINDINGS & IMPRESSION": "FINDINGS",
    "REPORT": "FINDINGS", "RESULT": "FINDINGS", "RESULTS": "FINDINGS", "OBSERVATIONS": "FINDINGS",
    "DESCRIPTION": "FINDINGS", "REPORT TEXT": "FINDINGS",
    "IMPRESSION": "IMPRESSION", "IMPRESSIONS": "IMPRESSION", "CONCLUSION": "IMPRESSION",
    "CONCLUSIONS": "IMPRESSION", "OPINION": "IMPRESSION", "SUMMARY": "IMPRESSION", "INTERPRETATION": "IMPRESSION",
    "DIAGNOSIS": "IMPRESSION", "ASSESSMENT": "IMPRESSION",
    "INDICATION": "INDICATION", "INDICATIONS": "INDICATION", "CLINICAL INDICATION": "INDICATION",
    "HISTORY": "INDICATION", "CLINICAL HISTORY": "INDICATION", "CLINICAL INFORMATION": "INDICATION",
    "REASON FOR EXAM": "INDICATION", "REASON FOR EXAMINATION": "INDICATION", "REASON FOR STUDY": "INDICATION",
    "CLINICAL DETAILS": "INDICATION", "CLINICAL NOTES": "INDICATION", "CLINICAL QUESTION": "INDICATION",
    "REASON FOR REFERRAL": "INDICATION", "REFERRAL REASON": "INDICATION",
    "TECHNIQUE": "TECHNIQUE", "PROCEDURE": "TECHNIQUE", "PROTOCOL": "TECHNIQUE",
    "PROCEDURE COMMENTS": "TECHNIQUE",
    "COMPARISON": "COMPARISON", "COMPARISONS": "COMPARISON", "PRIOR STUDIES": "COMPARISON",
    "EXAMINATION": "EXAMINATION", "EXAM": "EXAMINATION",
    "RECOMMENDATION": "RECOMMENDATION", "RECOMMENDATIONS": "RECOMMENDATION",
    "NOTIFICATION": "NOTIFICATION", "WET READ": "WET READ", "ADDENDUM": "ADDENDUM",
    "END OF IMPRESSION": "END OF IMPRESSION",  # CheXpert-Plus: sign-off text after it is not the impression
    "ACCESSION NUMBER": "ACCESSION NUMBER",
    "FINAL REPORT": PREAMBLE, "NARRATIVE": PREAMBLE,
}  # fmt: skip


def _header_pattern(name: str) -> str:
    """'FINDINGS AND IMPRESSION' -> words apart by spaces or tabs; '/' and '&' with optional spaces around."""
    tokens = re.findall(r"[^\s/&]+|[/&]", name)
    pattern = re.escape(tokens[0])
    for previous, token in itertools.pairwise(tokens):
        joint = r"[ \t]*" if "/" in (previous, token) or "&" in (previous, token) else r"[ \t]+"
        pattern += joint + re.escape(token)
    return pattern


# Longest names first so that "EXAMINATION" wins over "EXAM" and "FINDINGS AND IMPRESSION" over "FINDINGS".
_HEADER = re.compile(
    r"(?<![\w/&])(?P<name>"
    + "|".join(_header_pattern(n) for n in sorted(SECTION_SYNONYMS, key=len, reverse=True))
    + r")(?![\w/&])(?P<colon>[ \t]*:)?",
    re.IGNORECASE,
)
_SEPARATOR_LINE = re.compile(r"^[ \t]*[_=*-]{4,}[ \t]*$", re.MULTILINE)
_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_IU_EDIT_MARKS = re.compile(r"\[<|>\]")
_DEID = re.compile(r"\[\*\*.*?\*\*\]|[Xx]{4,}|_{3,}")
_PARAGRAPH_END = re.compile(r"(?<=[^\s.!?:;])(?=[^\S\n]*\n[^\S\n]*\n)")
_DETACHED_PUNCT = re.compile(r" ([.,;:])(?= |$)")
_REPEATED_PERIODS = re.compile(r"\.{2,}(?!\d)")
_LEADING_JUNK = re.compile(r"^[\s.,;:*•·-]+")
_TRAILING_JUNK = re.compile(r"[\s,;:*•·-]+$")
_TERMINAL = ".!?:;"

# "1." "2)" "(3)", optionally with a stray comma ("2., Mild"); never a decimal ("1.5") or inside a token.
_MARKER = re.compile(r"(?<!\S)(?:\((?P<paren>\d{1,2})\)|(?P<num>\d{1,2})[.)]),?(?=\s|[A-Za-z_(\[]|$)[^\S\n]*")
_BULLET = re.compile(r"^[ \t]*[-*•·‣▪][ \t]+", re.MULTILINE)
_CAPITAL_NEXT = re.compile(r"\s*[A-Z_]")

_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*")
_WORD_CHAR = re.compile(r"\w")
# Never end a sentence: titles and Latin abbreviations.
_NEVER_END = frozenset({
    "dr", "drs", "mr", "mrs", "ms", "prof", "st", "vs", "approx", "apprx", "e.g", "i.e", "eg", "ie", "cf", "viz",
    "fig", "figs", "pt", "pts", "incl", "esp", "resp",
})  # fmt: skip
# End a sentence only before a capital: units, times, "etc.", "No." (as in "No. 5").
_AMBIGUOUS_END = frozenset({
    "cm", "mm", "km", "in", "ft", "kg", "mg", "mcg", "ml", "cc", "sec", "min", "hr", "hrs", "yr", "yrs", "wk", "wks",
    "mo", "mos", "etc", "al", "a.m", "p.m", "am", "pm", "no", "nos", "y.o",
})  # fmt: skip
_BRACKETS = "([{\"'“‘)]}”’"
_NO_SPACE_WORD = re.compile(r"[A-Za-z_]*[a-z_]")


def canonical_section(name: str) -> str:
    """'Conclusion', 'findings :' -> 'IMPRESSION', 'FINDINGS'; unknown names are upper-cased as they are."""
    key = re.sub(r"\s*([/&])\s*", r"\1", " ".join(name.strip().rstrip(":").split()).upper())
    key = key.replace("&", " & ")
    return SECTION_SYNONYMS.get(key, key)


def decode_report_bytes(data: bytes | bytearray | memoryview, source: str = "report") -> str:
    """UTF-8 bytes -> str; any other encoding is refused with the byte offset and how to re-encode."""
    raw = bytes(data)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # the offset, never the surrounding text: a report is patient data, and error messages end up in logs
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
        raise DataError(
            f"{source} is not valid UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line}, byte "
            f"{column} of the line; {err.reason}). Re-encode the text as UTF-8, e.g. "
            "`iconv -f WINDOWS-1252 -t UTF-8 in.txt > out.txt` (Windows-1252 / Latin-1 are the usual sources), or "
            "decode it yourself and pass a str"
        ) from None


def _is_header(text: str, match: re.Match[str]) -> bool:
    line_start = text.rfind("\n", 0, match.start()) + 1
    before = text[line_start : match.start()]
    if not before.strip():
        if match.group("colon"):
            return True
        line_end = text.find("\n", match.end())
        return not text[match.end() : None if line_end < 0 else line_end].strip()
    if not match.group("colon"):
        return False
    name = match.group("name")
    if name.isupper():
        return True
    return name[0].isupper() and before.rstrip()[-1:] in _TERMINAL


def extract_sections(text: str) -> dict[str, str]:
    """Raw report text -> {canonical header: raw section text}, in reading order (see the module docstring)."""
    text = _SEPARATOR_LINE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    parts: dict[str, list[str]] = {}
    key, position = PREAMBLE, 0
    for match in _HEADER.finditer(text):
        if not _is_header(text, match):
            continue
        chunk = text[position : match.start()].strip()
        if key != PREAMBLE or chunk:
            parts.setdefault(key, []).append(chunk)
        key, position = canonical_section(match.group("name")), match.end()
    chunk = text[position:].strip()
    if key != PREAMBLE or chunk:
        parts.setdefault(key, []).append(chunk)
    # a blank line between repeated sections keeps them separate sentences after cleaning
    return {k: "\n\n".join(c for c in chunks if c) for k, chunks in parts.items()}


def _end_item(out: list[str]) -> list[str]:
    """Close the list item (or paragraph) written so far with a '.' unless it already ends a sentence."""
    text = "".join(out)
    stripped = text.rstrip()
    if stripped and stripped[-1] not in _TERMINAL:
        text = stripped + "." + text[len(stripped) :]
    return [text]


def remove_list_markers(text: str) -> str:
    """Remove list numbering and line-start bullets, ending the previous item with '.' where it has no stop."""
    candidates = list(_MARKER.finditer(text))
    numbers = [int(m.group("paren") or m.group("num")) for m in candidates]
    accepted = []
    for m in candidates:
        line_start = text.rfind("\n", 0, m.start()) + 1
        previous = text[: m.start()].rstrip()
        accepted.append(not text[line_start : m.start()].strip() or previous[-1:] in _TERMINAL)
    # runs 1, 2, 3... in the middle of a line: "1. Cardiomegaly 2. Ectatic aorta"
    i = 0
    while i < len(candidates):
        j = i
        while j + 1 < len(candidates) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        if j > i and numbers[i] == 1:
            for k in range(i, j + 1):
                accepted[k] = accepted[k] or bool(_CAPITAL_NEXT.match(text, candidates[k].end()))
        i = j + 1
    spans = [m.span() for m, ok in zip(candidates, accepted, strict=True) if ok]
    spans += [m.span() for m in _BULLET.finditer(text)]
    out: list[str] = []
    position = 0
    for start, end in sorted(spans):
        if start < position:
            continue
        out.append(text[position:start])
        out = _end_item(out)
        position = end
    out.append(text[position:])
    return "".join(out)


def _mark_boundaries(text: str) -> str:
    """List markers and blank lines end sentences; this needs the line structure, so it runs before collapsing."""
    return _PARAGRAPH_END.sub(".", remove_list_markers(text))


def _clean_once(text: str, placeholder: str) -> str:
    text = html.unescape(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _BR.sub("\n", text)
    text = _IU_EDIT_MARKS.sub("", text)
    text = _SEPARATOR_LINE.sub("", text)
    text = _DEID.sub(placeholder, text)
    if placeholder:
        escaped = re.escape(placeholder)
        text = re.sub(rf"{escaped}(?:[^\S\n]+{escaped})+", lambda _: placeholder, text)
    text = _mark_boundaries(text)
    text = " ".join(text.split())
    text = _DETACHED_PUNCT.sub(r"\1", text)
    text = _REPEATED_PERIODS.sub(".", text)
    text = _LEADING_JUNK.sub("", text)
    return _TRAILING_JUNK.sub("", text)


def clean_text(text: str, placeholder: str = PLACEHOLDER) -> str:
    """Normalise placeholders, remove list markers, collapse whitespace; the meaning is unchanged."""
    # Repeat to a fixed point: a step can expose a marker to another ("1 . A" -> "1. A"), and the splitter must
    # find nothing left to remove in cleaned text, or sentences would lose characters the section still has.
    for _ in range(10):
        cleaned = _clean_once(text, placeholder)
        if cleaned == text:
            break
        text = cleaned
    return text


def _token_before(text: str, end: int) -> str:
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].strip(_BRACKETS)


def _is_sentence_end(text: str, match: re.Match[str]) -> bool:
    start, end = match.span()
    if start == 0 or text[start - 1].isspace():
        return False  # a detached mark: "pt with ? h/o COPD"
    token = _token_before(text, start)
    word = token.lower()
    after = text[end:]
    if not after or not after[0].isspace():
        # no space after: only "effusion.Heart" (a lower-case word, then a capitalised word)
        return (
            match.group() == "."
            and len(word) > 1
            and word not in _NEVER_END
            and word not in _AMBIGUOUS_END
            and bool(_NO_SPACE_WORD.fullmatch(token))
            and re.match(r"[A-Z][a-z]", after) is not None
        )
    following = after.lstrip()
    if not following or "!" in match.group() or "?" in match.group():
        return True
    if word in _NEVER_END or (len(word) == 1 and word.isalpha()):
        return False
    if word in _AMBIGUOUS_END or "." in word:
        return following[0].isupper()
    return True


def _split(text: str) -> list[str]:
    """Cut ``text`` at sentence ends; the pieces joined equal ``text`` up to whitespace."""
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(text) if _is_sentence_end(text, m)), len(text)]
    pieces = [" ".join(text[a:b].split()) for a, b in itertools.pairwise(cuts)]
    sentences: list[str] = []
    pending: list[str] = []  # word-less fragments before the first real sentence
    for piece in pieces:
        if not piece:
            continue
        if _WORD_CHAR.search(piece):
            sentences.append(" ".join([*pending, piece]))
            pending = []
        elif sentences:
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            pending.append(piece)
    if pending:
        sentences.append(" ".join(pending))
    return sentences


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitting (see the module docstring). List numbering is removed first, and list items
    and blank lines end sentences; on :func:`clean_text` output it only cuts, so no character is lost."""
    return _split(_mark_boundaries(text))


def kept_share(report: Report) -> float:
    """The share of a report's words (all its sections) that its sentences keep: what training reads of it."""
    total = sum(len(text.split()) for text in report.sections.values())
    return sum(len(s.split()) for s in report.sentences) / total if total else 1.0


_HEADER_LIKE = re.compile(r"^[ \t]*([A-Z][A-Z /&-]{1,38}[A-Z])[ \t]*:", re.MULTILINE)


def unknown_headers(raw: str) -> list[str]:
    """Capitalised ``NAME:`` at line starts that are not in ``SECTION_SYNONYMS``: candidates for a header the
    sectioning does not know (``data check`` lists the common ones)."""
    return [m.group(1) for m in _HEADER_LIKE.finditer(raw) if " ".join(m.group(1).split()) not in SECTION_SYNONYMS]


def parse_report(
    raw: str | bytes,
    sections: Iterable[str] = ("FINDINGS", "IMPRESSION"),
    *,
    placeholder: str = PLACEHOLDER,
) -> Report:
    """Raw report text (or UTF-8 bytes) -> Report with cleaned sections and the chosen sections' sentences."""
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = decode_report_bytes(raw)
    if not isinstance(raw, str):
        raise DataError(f"a report must be text (str or UTF-8 bytes), got {type(raw).__name__}: {raw!r:.80}")
    cleaned = {key: clean_text(text, placeholder) for key, text in extract_sections(raw).items()}
    cleaned = {key: text for key, text in cleaned.items() if text}
    chosen = {canonical_section(name) for name in sections}
    keys = [key for key in cleaned if key in chosen]
    if not keys and PREAMBLE in cleaned:
        keys = [PREAMBLE]
    report = Report(raw=raw, sections=cleaned)
    for key in keys:
        for sentence in _split(cleaned[key]):
            report.sentences.append(sentence)
            report.sentence_sections.append(key)
    return report
