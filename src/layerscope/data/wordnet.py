"""A reader of the noun part of a WordNet 3.x database folder (``data.noun``, ``index.noun``).

Debian's ``wordnet-base`` package installs such a folder at ``/usr/share/wordnet``; it has no
``lexnames`` file, so the lexicographer file names are the fixed list of lexnames(5WN), embedded
here (a ``lexnames`` file in the folder, when there is one, is read instead).

File formats (wndb(5WN)); lines that begin with two spaces are the licence header:

* ``data.noun``: ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id …] p_cnt
  [pointer_symbol offset pos source/target …] | gloss`` — ``w_cnt`` and ``lex_id`` hexadecimal,
  ``p_cnt`` decimal. The hypernym pointers are ``@`` (hypernym) and ``@i`` (instance hypernym).
* ``index.noun``: ``lemma pos synset_cnt p_cnt [pointer_symbol …] sense_cnt tagsense_cnt
  offset [offset …]`` — the offsets in WordNet's sense order (most frequent first).

Path similarity is WordNet's (and nltk's ``Synset.path_similarity`` for nouns): 1 / (1 + d),
d the fewest hypernym / instance-hypernym edges from one synset up to a common ancestor and
down to the other; for nouns every synset reaches ``entity``, so d always exists in WordNet
itself (a folder with two roots can leave it undefined: None).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from layerscope import LayerscopeError

# lexnames(5WN): lexicographer file number -> name
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
HYPERNYM_POINTERS = ("@", "@i")
FILES = ("data.noun", "index.noun")


class WordNetError(LayerscopeError):
    """A missing or malformed WordNet database folder."""


@dataclass(frozen=True)
class Synset:
    offset: int
    lexname: str
    words: tuple[str, ...]  # as written in the database (underscores for spaces, case kept)
    hypernyms: tuple[int, ...]  # offsets of its hypernyms and instance hypernyms


def _header(line: str) -> bool:
    return line.startswith("  ")


def _read_lexnames(folder: Path) -> tuple[str, ...]:
    path = folder / "lexnames"
    if not path.is_file():
        return LEXNAMES
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            number, name, *_ = line.split()
            names[int(number)] = name
    return tuple(names.get(i, f"lex{i:02d}") for i in range(max(names) + 1))


class WordNet:
    """The nouns of a WordNet database folder: synsets by offset, lemma -> senses, hypernym ancestry."""

    def __init__(self, synsets: dict[int, Synset], index: dict[str, tuple[int, ...]], folder: Path | None = None):
        self.synsets = synsets
        self.index = index
        self.folder = folder
        self._ancestors: dict[int, dict[int, int]] = {}

    @classmethod
    def open(cls, folder: str | Path, *, setting: str = "the WordNet folder") -> "WordNet":
        """Read ``folder``; a missing folder or file raises :class:`WordNetError` naming ``setting``."""
        folder = Path(folder)
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise WordNetError(
                f"{setting} = {str(folder)!r}: no WordNet 3.x database there (missing {', '.join(missing)}). "
                "Install Debian's wordnet-base package (apt-get install wordnet-base, which installs "
                f"/usr/share/wordnet), or set {setting} to a folder holding data.noun and index.noun")
        lexnames = _read_lexnames(folder)
        synsets: dict[int, Synset] = {}
        with open(folder / "data.noun", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if _header(line) or not line.strip():
                    continue
                try:
                    synset = _parse_data_line(line, lexnames)
                except (ValueError, IndexError) as exc:
                    raise WordNetError(f"{folder / 'data.noun'}:{number}: not a WordNet data line ({exc})") from None
                synsets[synset.offset] = synset
        index: dict[str, tuple[int, ...]] = {}
        with open(folder / "index.noun", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if _header(line) or not line.strip():
                    continue
                try:
                    lemma, offsets = _parse_index_line(line)
                except (ValueError, IndexError) as exc:
                    raise WordNetError(f"{folder / 'index.noun'}:{number}: not a WordNet index line ({exc})") from None
                index[lemma] = offsets
        if not synsets:
            raise WordNetError(f"{folder / 'data.noun'}: no synsets")
        return cls(synsets, index, folder)

    # ------------------------------------------------------------------ relations

    def senses(self, lemma: str) -> tuple[int, ...]:
        """Noun synset offsets of a lemma (lower case, underscores for spaces), most frequent sense first."""
        return self.index.get(lemma.lower(), ())

    def ancestors(self, offset: int) -> dict[int, int]:
        """Every synset reachable upwards (hypernyms and instance hypernyms), with its fewest steps (self: 0)."""
        cached = self._ancestors.get(offset)
        if cached is not None:
            return cached
        steps = {offset: 0}
        queue = deque([offset])
        while queue:
            current = queue.popleft()
            for parent in self.synsets[current].hypernyms:
                if parent not in steps:
                    steps[parent] = steps[current] + 1
                    queue.append(parent)
        self._ancestors[offset] = steps
        return steps

    def path_distance(self, a: int, b: int) -> int | None:
        """Fewest edges from a up to a common ancestor and down to b (None without a common ancestor)."""
        up_a, up_b = self.ancestors(a), self.ancestors(b)
        if len(up_a) > len(up_b):
            up_a, up_b = up_b, up_a
        common = [steps + up_b[s] for s, steps in up_a.items() if s in up_b]
        return min(common) if common else None

    def path_similarity(self, a: int, b: int) -> float | None:
        d = self.path_distance(a, b)
        return None if d is None else 1.0 / (1.0 + d)


def _parse_data_line(line: str, lexnames: tuple[str, ...]) -> Synset:
    fields = line.split(" | ", 1)[0].split()
    offset, lex_filenum, ss_type = int(fields[0]), int(fields[1]), fields[2]
    if ss_type != "n":
        raise ValueError(f"synset type {ss_type!r} in the noun file")
    w_cnt = int(fields[3], 16)
    words = tuple(fields[4 + 2 * k] for k in range(w_cnt))
    at = 4 + 2 * w_cnt
    p_cnt = int(fields[at])
    hypernyms = []
    for k in range(p_cnt):
        symbol, target, pos = fields[at + 1 + 4 * k : at + 4 + 4 * k]
        if symbol in HYPERNYM_POINTERS and pos == "n":
            hypernyms.append(int(target))
    lexname = lexnames[lex_filenum] if lex_filenum < len(lexnames) else f"lex{lex_filenum:02d}"
    return Synset(offset, lexname, words, tuple(hypernyms))


def _parse_index_line(line: str) -> tuple[str, tuple[int, ...]]:
    fields = line.split()
    lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
    offsets = fields[4 + p_cnt + 2 :]
    if len(offsets) != synset_cnt:
        raise ValueError(f"{synset_cnt} senses announced, {len(offsets)} offsets")
    return lemma, tuple(int(o) for o in offsets)
