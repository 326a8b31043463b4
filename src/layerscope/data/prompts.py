"""Prompt sets: loading, validation and identity.

A prompt set is a JSON file::

    {"name": "core", "description": "...",
     "prompts": [{"id": "factual-01", "category": "factual", "text": "..."}, ...]}

Each prompt needs a unique ``id`` (letters, digits, ``._-``), a ``category`` and a
non-empty ``text``. Optional per-prompt fields: ``answer`` (a reference answer),
``subject`` (the entity a factual-recall prompt is about: a substring of ``text``, which
causal tracing corrupts), ``lang`` (a language code) and ``pair`` (the id shared by the two
halves of a paired problem). Anything else is rejected, so a typo such as ``"txt"`` cannot
pass silently.

Pairs are checked on load: the prompts that share a ``pair`` id are exactly two, both give
their ``lang`` (two different languages), the same ``category`` and the same ``answer``.
:func:`zh_en_pairs` returns the pairs of a set in which every prompt is one half of a
Chinese/English pair (what the z_subspace experiments read).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from layerscope import LayerscopeError
from layerscope.jobs.io import sha256_json

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # ids in prompt and input files
REQUIRED_FIELDS = ("id", "category", "text")
OPTIONAL_FIELDS = ("answer", "subject", "lang", "pair")
TOP_LEVEL_FIELDS = ("name", "description", "prompts", "categories")


class PromptSetError(LayerscopeError):
    """A malformed prompt file."""


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    answer: str | float | int | None = None
    subject: str | None = None
    lang: str | None = None
    pair: str | None = None

    def to_dict(self) -> dict:
        out = {"id": self.id, "category": self.category, "text": self.text}
        for key in OPTIONAL_FIELDS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]
    description: str = ""
    source: str = ""
    categories: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """Identity of the prompts actually used (ids, categories, texts, extras), not of the file's layout."""
        return sha256_json([p.to_dict() for p in self.prompts])

    def by_id(self) -> dict[str, Prompt]:
        return {p.id: p for p in self.prompts}


@dataclass(frozen=True)
class PromptPair:
    """One problem in two languages: its Chinese and English prompts and their shared answer."""

    pair: str
    category: str
    answer: str | float | int
    zh: Prompt
    en: Prompt


def _answer_key(answer) -> tuple:
    """Answers compare as numbers when both parse as numbers ("12" == 12 == 12.0), else as text."""
    try:
        return ("number", float(str(answer).strip().replace(",", "")))
    except ValueError:
        return ("text", str(answer).strip())


def _check_pairs(prompts: list[Prompt], where: str) -> None:
    groups: dict[str, list[Prompt]] = {}
    for p in prompts:
        if p.pair is not None:
            groups.setdefault(p.pair, []).append(p)
    for pair, members in groups.items():
        label = f"prompt set {where}, pair {pair!r}"
        ids = [p.id for p in members]
        if len(members) != 2:
            raise PromptSetError(f"{label}: a pair has exactly two prompts, found {len(members)} ({ids})")
        a, b = members
        missing = [p.id for p in members if not p.lang]
        if missing:
            raise PromptSetError(f"{label}: prompt(s) {missing} have no 'lang'; each half of a pair names its language")
        if a.lang == b.lang:
            raise PromptSetError(f"{label}: both prompts ({ids}) are in language {a.lang!r}; a pair has one prompt per language")
        if a.category != b.category:
            raise PromptSetError(f"{label}: the two prompts have different categories ({a.category!r}, {b.category!r})")
        if a.answer is None or b.answer is None:
            raise PromptSetError(f"{label}: both prompts need an 'answer' (the shared answer of the problem)")
        if _answer_key(a.answer) != _answer_key(b.answer):
            raise PromptSetError(f"{label}: the answers differ ({a.id}: {a.answer!r}, {b.id}: {b.answer!r})")


def zh_en_pairs(prompt_set: PromptSet, ids: list[str] | None = None) -> list[PromptPair]:
    """The Chinese/English pairs of a prompt set, in file order.

    Every prompt (or every prompt in ``ids``, e.g. those present in an activation cache)
    must be one half of a pair with one ``zh`` and one ``en`` prompt, and both halves must
    be present; anything else raises :class:`PromptSetError` naming the prompt or pair.
    """
    where = prompt_set.source or prompt_set.name
    by_id = prompt_set.by_id()
    chosen = list(dict.fromkeys(ids)) if ids is not None else [p.id for p in prompt_set.prompts]
    unknown = [i for i in chosen if i not in by_id]
    if unknown:
        raise PromptSetError(f"prompt set {where}: prompt id(s) {unknown[:5]} are not in the prompt set")
    groups: dict[str, dict[str, Prompt]] = {}
    for pid in chosen:
        p = by_id[pid]
        if p.pair is None:
            raise PromptSetError(f"prompt set {where}: prompt {p.id!r} has no 'pair'; every prompt must be one half of a zh/en pair")
        if p.lang not in ("zh", "en"):
            raise PromptSetError(f"prompt set {where}: prompt {p.id!r} has lang {p.lang!r}; zh/en pairs need 'zh' or 'en'")
        groups.setdefault(p.pair, {})[p.lang] = p
    pairs = []
    for pair, halves in groups.items():
        if set(halves) != {"zh", "en"}:
            (lang, p), = halves.items()
            raise PromptSetError(
                f"prompt set {where}: pair {pair!r} has only its {lang!r} prompt ({p.id}); the other half is missing"
                " (a prompt-set `limit` must keep whole pairs)"
            )
        zh, en = halves["zh"], halves["en"]
        pairs.append(PromptPair(pair, en.category, en.answer, zh, en))
    if not pairs:
        raise PromptSetError(f"prompt set {where}: no zh/en pairs")
    return pairs


def load_prompt_set(path: str | Path, *, limit: int | None = None) -> PromptSet:
    """Load and validate a prompt file; ``limit`` keeps the first N prompts."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise PromptSetError(f"prompt set {where}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"prompt set {where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"prompt set {where}: not UTF-8 text ({exc})") from None
    if not isinstance(data, dict):
        raise PromptSetError(f"prompt set {where}: the top level must be an object with a 'prompts' list")
    unknown = sorted(set(data) - set(TOP_LEVEL_FIELDS))
    if unknown:
        raise PromptSetError(f"prompt set {where}: unknown top-level key(s) {unknown}; allowed: {list(TOP_LEVEL_FIELDS)}")
    raw = data.get("prompts")
    if not isinstance(raw, list) or not raw:
        raise PromptSetError(f"prompt set {where}: 'prompts' must be a non-empty list")

    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        label = f"prompt set {where}, prompt #{index}"
        if not isinstance(item, dict):
            raise PromptSetError(f"{label}: must be an object with {list(REQUIRED_FIELDS)}")
        if isinstance(item.get("id"), str):
            label += f" (id {item['id']!r})"
        missing = [k for k in REQUIRED_FIELDS if k not in item]
        if missing:
            raise PromptSetError(f"{label}: missing field(s) {missing}")
        unknown = sorted(set(item) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise PromptSetError(
                f"{label}: unknown field(s) {unknown}; allowed: {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
            )
        for key in REQUIRED_FIELDS:
            if not isinstance(item[key], str) or not item[key].strip():
                raise PromptSetError(f"{label}: '{key}' must be a non-empty string")
        if not ID_PATTERN.match(item["id"]):
            raise PromptSetError(f"{label}: id must use only letters, digits, '.', '_' and '-'")
        if item["id"] in seen:
            raise PromptSetError(f"{label}: duplicate id {item['id']!r}")
        seen.add(item["id"])
        answer = item.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise PromptSetError(f"{label}: 'answer' must be a string or a number")
        for key in ("lang", "pair"):
            if key in item and not isinstance(item[key], str):
                raise PromptSetError(f"{label}: '{key}' must be a string")
        subject = item.get("subject")
        if subject is not None:
            if not isinstance(subject, str) or not subject.strip():
                raise PromptSetError(f"{label}: 'subject' must be a non-empty string")
            if subject not in item["text"]:
                raise PromptSetError(f"{label}: subject {subject!r} does not occur in its text {item['text']!r} "
                                     "(it must be an exact substring)")
        prompts.append(
            Prompt(
                id=item["id"],
                category=item["category"].strip(),
                text=item["text"],
                answer=answer,
                subject=subject,
                lang=item.get("lang"),
                pair=item.get("pair"),
            )
        )

    _check_pairs(prompts, where)
    declared = data.get("categories")
    if declared is not None:
        if not isinstance(declared, list) or not all(isinstance(c, str) for c in declared):
            raise PromptSetError(f"prompt set {where}: 'categories' must be a list of strings")
        stray = sorted({p.category for p in prompts} - set(declared))
        if stray:
            raise PromptSetError(f"prompt set {where}: categories {stray} are used but not declared in 'categories'")
    if limit is not None:
        prompts = prompts[:limit]
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        raise PromptSetError(f"prompt set {where}: 'name' must be a string")
    return PromptSet(
        name=name,
        prompts=tuple(prompts),
        description=str(data.get("description", "")),
        source=where,
        categories=tuple(declared) if declared else tuple(dict.fromkeys(p.category for p in prompts)),
    )
