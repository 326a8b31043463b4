"""wordnet_alignment and the WordNet reader: against nltk, a plain BFS, scipy, brute-force resampling and a
planted embedding; the fixture is a hand-written WordNet-format folder (tests/data/wordnet)."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from tests.helpers import REPO
from layerscope.data.wordnet import LEXNAMES, WordNet, WordNetError
from layerscope.engines.geometry import permuted_between_within, resample_counts
from layerscope.engines.statistics import Bootstrap
from layerscope.experiments.geometry.embedding_geometry import category_statistics, single_token
from layerscope.experiments.geometry.wordnet_alignment import (
    EXPERIMENT, category_pair_statistics, open_wordnet, pair_statistics, permuted_separation, wordnet_alignment,
)
from layerscope.jobs.writer import check_summary, run_experiment

FIXTURE = REPO / "tests" / "data" / "wordnet"
SYSTEM = Path("/usr/share/wordnet")


@pytest.fixture(scope="module")
def fixture_wn():
    return WordNet.open(FIXTURE)


def nltk_reader(tmp_path, folder: Path):
    """nltk's reader on a copy of ``folder`` with a lexnames file (Debian's folder has none)."""
    nltk = pytest.importorskip("nltk")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # no OMW mapping: it needs nltk's downloaded corpus
            return None

    copy = tmp_path / "wordnet"  # a copy, not links: nltk refuses a link out of its root
    shutil.copytree(folder, copy)
    (copy / "lexnames").write_text("".join(f"{i:02d}\t{name}\t1\n" for i, name in enumerate(LEXNAMES)))
    nltk.data.path.append(str(copy))  # nltk's path security: a reader may open files below nltk.data.path only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Reader(str(copy), None)


# ---------------------------------------------------------------------------- the reader


def test_fixture_offsets_are_byte_offsets():
    raw = (FIXTURE / "data.noun").read_bytes()
    for line in raw.decode().splitlines(keepends=True):
        if not line.startswith("  "):
            offset = int(line[:8])
            assert raw[offset : offset + 8].decode() == line[:8]


def test_reader_agrees_with_nltk_on_the_fixture(tmp_path, fixture_wn):
    wn = nltk_reader(tmp_path, FIXTURE)
    synsets = list(wn.all_synsets("n"))
    assert len(synsets) == len(fixture_wn.synsets) == 22
    for a in synsets:
        mine = fixture_wn.synsets[a.offset()]
        assert mine.lexname == a.lexname()
        assert mine.words == tuple(lemma.name() for lemma in a.lemmas())
        assert set(mine.hypernyms) == {h.offset() for h in a.hypernyms() + a.instance_hypernyms()}
        for b in synsets:
            assert fixture_wn.path_similarity(a.offset(), b.offset()) == a.path_similarity(b)
    assert fixture_wn.senses("dog") == tuple(s.offset() for s in wn.synsets("dog", "n"))


def plain_distance(wn: WordNet, a: int, b: int) -> int | None:
    """Shortest path through a common ancestor, by two separate upward BFS over the parsed pointers."""
    def up(start):
        seen, queue = {start: 0}, deque([start])
        while queue:
            node = queue.popleft()
            for parent in wn.synsets[node].hypernyms:
                if parent not in seen:
                    seen[parent] = seen[node] + 1
                    queue.append(parent)
        return seen
    ua, ub = up(a), up(b)
    common = set(ua) & set(ub)
    return min(ua[c] + ub[c] for c in common) if common else None


def test_path_similarity_equals_a_plain_bfs(fixture_wn):
    offsets = list(fixture_wn.synsets)
    for a, b in itertools.product(offsets, offsets):
        d = plain_distance(fixture_wn, a, b)
        assert fixture_wn.path_distance(a, b) == d
        assert fixture_wn.path_similarity(a, b) == 1 / (1 + d)
    dog, wolf, cat, lassie = (fixture_wn.senses(w)[0] for w in ("dog", "wolf", "cat", "lassie"))
    assert fixture_wn.path_distance(dog, wolf) == 2  # dog → canine ← wolf
    assert fixture_wn.path_distance(dog, cat) == 3  # dog → domestic_animal → animal ← cat
    assert fixture_wn.path_distance(lassie, wolf) == 3  # through the instance hypernym


def test_a_missing_folder_names_the_setting_and_the_package(tmp_path):
    with pytest.raises(WordNetError, match=r"experiments\.wordnet_alignment\.wordnet.*wordnet-base"):
        open_wordnet(tmp_path / "nowhere")
    (tmp_path / "data.noun").write_text("")
    with pytest.raises(WordNetError, match="missing index.noun"):
        open_wordnet(tmp_path)


@pytest.mark.skipif(not (SYSTEM / "data.noun").is_file(),
                    reason="no WordNet at /usr/share/wordnet (apt-get install wordnet-base; envs/wordnet.sh install)")
def test_the_real_wordnet_agrees_with_nltk(tmp_path):
    mine = WordNet.open(SYSTEM)
    assert len(mine.synsets) == 82115  # WordNet 3.0's noun synsets
    wn = nltk_reader(tmp_path, SYSTEM)
    rng = np.random.default_rng(0)
    lemmas = sorted(mine.index)
    for lemma in rng.choice(lemmas, size=40, replace=False):
        # nltk's index map (wn.synsets() adds the senses of morphy's base forms)
        assert mine.senses(lemma) == tuple(wn._lemma_pos_offset_map[lemma]["n"])
    offsets = rng.choice(sorted(mine.synsets), size=60, replace=False)
    for a, b in zip(offsets[:30], offsets[30:]):
        sa, sb = wn.synset_from_pos_and_offset("n", int(a)), wn.synset_from_pos_and_offset("n", int(b))
        assert mine.path_similarity(int(a), int(b)) == sa.path_similarity(sb)
        assert mine.synsets[int(a)].lexname == sa.lexname()
    assert mine.path_similarity(mine.senses("dog")[0], mine.senses("cat")[0]) == 0.2


# ---------------------------------------------------------------------------- statistics


def test_pair_statistics_equal_scipy_and_a_brute_force_resampling():
    rng = np.random.default_rng(3)
    n = 12
    first, second = np.triu_indices(n, k=1)
    distance = rng.integers(0, 6, size=len(first))
    similarity = 1.0 / (1 + distance)
    cosine = np.round(rng.normal(size=len(first)), 1)  # ties in both variables
    band = np.searchsorted([0, 2, 4], distance, side="right") - 1
    index = rng.integers(0, n, size=(6, n))
    counts = np.vstack([np.ones(n), resample_counts(index, n)])
    got = pair_statistics(cosine, similarity, first, second, band, 3, counts)
    assert got["spearman"][0] == pytest.approx(stats.spearmanr(similarity, cosine).statistic, rel=1e-12)
    assert got["pearson"][0] == pytest.approx(stats.pearsonr(similarity, cosine).statistic, rel=1e-12)
    for b, draw in enumerate(index, start=1):  # the expanded sample: every pair of distinct drawn words
        xs, ys, bands = [], [], []
        lookup = {(i, j): p for p, (i, j) in enumerate(zip(first, second))}
        for x, y in itertools.combinations(range(n), 2):
            i, j = sorted((draw[x], draw[y]))
            if i != j:
                p = lookup[(i, j)]
                xs.append(similarity[p]), ys.append(cosine[p]), bands.append(band[p])
        xs, ys, bands = map(np.array, (xs, ys, bands))
        assert got["spearman"][b] == pytest.approx(stats.spearmanr(xs, ys).statistic, rel=1e-9)
        assert got["cosine_mean"][b] == pytest.approx(ys.mean(), rel=1e-12)
        for k in range(3):
            if (bands == k).any():
                assert got["band_mean"][b, k] == pytest.approx(ys[bands == k].mean(), rel=1e-12)


def test_category_statistics_equal_the_embedding_geometry_definitions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosines = unit @ unit.T
    labels = np.array(list("abc") * 10)
    counts = np.vstack([np.ones(30), resample_counts(rng.integers(0, 30, size=(5, 30)), 30)])
    mine = category_pair_statistics(cosines, labels, list("abc"), counts)
    reference = category_statistics(cosines, labels, list("abc"), counts, 0.0)
    for key in ("intra_a", "intra_b", "intra_c", "intra_mean", "separation"):
        np.testing.assert_allclose(mine[key], reference[key], rtol=1e-12)
    perms = np.array([rng.permutation(labels) for _ in range(7)])
    codes = np.searchsorted(list("abc"), perms)
    np.testing.assert_allclose(permuted_separation(cosines, codes),
                               permuted_between_within(1.0 - cosines, list(perms))[:, 0], rtol=1e-12)


# ---------------------------------------------------------------------------- the experiment, on the fixture


class WordTokenizer:
    """A whole-word tokenizer over a fixed vocabulary (what single_token needs of a Hugging Face tokenizer)."""

    unk_token_id = 0

    def __init__(self, words):
        self.vocab = ["<unk>", *words]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids.get(w, 0) for w in text.split()]}

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)

    def convert_tokens_to_ids(self, token):
        return self.ids.get(token, 0)


FIXTURE_WORDS = ["entity", "object", "abstraction", "organism", "artifact", "animal", "person", "plant", "canine",
                 "dog", "wolf", "cat", "frump", "tree", "car", "idea", "beast", "flora", "being", "time", "day", "friend", "mom"]


def planted_embedding(wn, tokenizer, fn, d=64, seed=0):
    """Rows whose pairwise cosine is fn(path similarity) exactly: the Cholesky factor of that Gram matrix."""
    words = [w for w in FIXTURE_WORDS if w in tokenizer.ids]
    offsets = [wn.senses(w)[0] for w in words]
    gram = np.array([[fn(wn.path_similarity(a, b)) for b in offsets] for a in offsets])
    np.fill_diagonal(gram, 1.0)
    factor = np.linalg.cholesky(gram + 1e-9 * np.eye(len(words)))
    rows = np.random.default_rng(seed).normal(size=(len(tokenizer.vocab), d))
    rows[:, : len(words)] *= 0.0
    for k, w in enumerate(words):
        rows[tokenizer.ids[w]] = np.concatenate([factor[k], np.zeros(d - len(words))])
    return torch.tensor(rows, dtype=torch.float64)


def test_cosine_a_monotone_function_of_path_similarity_gives_spearman_one(fixture_wn):
    tok = WordTokenizer(FIXTURE_WORDS)
    emb = planted_embedding(fixture_wn, tok, lambda s: 0.9 * s)  # positive definite: 0.9 s is a kernel here
    result = wordnet_alignment(emb, tok, fixture_wn, model="planted", n_words=50, min_category_words=2,
                               n_perm=200, n_boot=200, seed=0)
    s = result.summary
    assert s["spearman_cosine_path_similarity"] == pytest.approx(1.0)
    assert s["pearson_cosine_path_similarity"] == pytest.approx(1.0)
    pairs = result.pairs
    np.testing.assert_allclose(pairs["cosine"], 0.9 * pairs["path_similarity"], atol=1e-6)
    # the hypernym decay of cos = 0.9/(1 + steps) is negative, and every step mean is that value
    means = [m for m in s["depth_mean_cosine"] if m is not None]
    np.testing.assert_allclose(means, [0.9 / (1 + k) for k in s["depth_steps"][: len(means)]], atol=1e-6)
    assert s["depth_decay_slope"] < 0
    check_summary(EXPERIMENT, json.loads(json.dumps(s)))


def test_skipped_words_and_lookup(fixture_wn):
    tok = WordTokenizer(["dog", "cat", "wolf", "tree", "car", "idea", "person", "animal"])
    emb = torch.randn(len(tok.vocab), 16, generator=torch.Generator().manual_seed(0))
    result = wordnet_alignment(emb, tok, fixture_wn, model="few", n_words=50, min_category_words=2, n_perm=50,
                               n_boot=50)
    s = result.summary
    words = result.words
    candidates = {"entity", "object", "abstraction", "organism", "being", "artifact", "animal", "beast", "person",
                  "individual", "plant", "flora", "canine", "pet", "dog", "wolf", "cat", "frump", "tree", "car",
                  "auto", "idea", "thought", "time", "day", "friend", "mom",
                  "mother"}  # single lower-case lemmas of their first sense (not Lassie)
    assert set(words["word"]) == candidates
    assert s["n_words"] == 8 and s["n_skipped_words"] == len(candidates) - 8
    assert set(s["skipped_words"]) == candidates - set(tok.vocab)
    assert (words.loc[words["word"] == "dog", "offset"] == fixture_wn.senses("dog")[0]).all()
    assert s["n_pairs"] == 28 and len(result.pairs) == 28
    for row in result.pairs.itertuples():  # path distance of each pair, from the plain BFS
        a, b = fixture_wn.senses(row.word_a)[0], fixture_wn.senses(row.word_b)[0]
        assert row.path_distance == plain_distance(fixture_wn, a, b)
    check_summary(EXPERIMENT, json.loads(json.dumps(s)))


def test_stories_run_writes_every_output(stories_dir, tmp_path):
    outputs = {"summary": tmp_path / "summary.json",
               **{f"table_{t}": tmp_path / f"{t}.parquet" for t in EXPERIMENT.tables},
               **{f"figure_{f.name}": tmp_path / f"{f.name}.png" for f in EXPERIMENT.figures}}
    params = {name: spec["default"] for name, spec in EXPERIMENT.params.items()}
    params.update(wordnet=str(FIXTURE), n_words=40, min_category_words=2, n_perm=100, n_boot=100, seed=0)
    run_experiment("wordnet_alignment", {"model": str(stories_dir)}, outputs, params=params,
                   wildcards={"model": "stories"})
    assert all(p.is_file() and p.stat().st_size > 0 for p in outputs.values())
    summary = json.loads(outputs["summary"].read_text())
    assert summary["uncertainty"]["unit"] == "word" and summary["n_words"] >= 3
    words = pd.read_parquet(outputs["table_words"])
    assert set(summary["skipped_words"]) >= {"wolf", "organism"}  # not single tokens of stories260K's 512
    assert set(words.loc[words["status"] == "used", "word"]) >= {"day", "time", "friend", "mom"}
    with pytest.raises(WordNetError, match=r"experiments\.wordnet_alignment\.wordnet"):
        run_experiment("wordnet_alignment", {"model": str(stories_dir)}, outputs,
                       params={**params, "wordnet": str(tmp_path / "missing")}, wildcards={"model": "stories"})
