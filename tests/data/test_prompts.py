"""Prompt sets: the shipped set is well formed; malformed files fail with a clear message."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO
from layerscope.data.prompts import PromptSetError, load_prompt_set

CORE_CATEGORIES = {"factual", "reasoning", "linguistic", "code", "world_knowledge", "technical", "rare"}


def test_core_prompt_set():
    ps = load_prompt_set(REPO / "resources/prompt_sets/core.json")
    assert len(ps) == 50
    assert {p.category for p in ps.prompts} == CORE_CATEGORIES
    assert len({p.text for p in ps.prompts}) == 50
    assert len(load_prompt_set(REPO / "resources/prompt_sets/core.json", limit=5)) == 5


def test_hash_follows_content_not_layout(tmp_path):
    data = {"prompts": [{"id": "a", "category": "c", "text": "Hello?"}]}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(data))
    two.write_text(json.dumps(data, indent=4))
    assert load_prompt_set(one).sha256 == load_prompt_set(two).sha256
    data["prompts"][0]["text"] = "Hello!"
    two.write_text(json.dumps(data))
    assert load_prompt_set(one).sha256 != load_prompt_set(two).sha256


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be an object"),
        ('{"prompts": []}', "'prompts' must be a non-empty list"),
        ('{"prompts": [{"id": "a", "text": "x"}]}', "missing field(s) ['category']"),
        ('{"prompts": [{"id": "a", "category": "c", "txt": "x", "text": "y"}]}', "unknown field(s) ['txt']"),
        ('{"prompts": [{"id": "a", "category": "c", "text": "  "}]}', "'text' must be a non-empty string"),
        ('{"prompts": [{"id": "a/b", "category": "c", "text": "x"}]}', "id must use only"),
        ('{"prompts": [{"id": "a", "category": "c", "text": "x"}, {"id": "a", "category": "c", "text": "y"}]}',
         "duplicate id 'a'"),
        ('{"categories": ["x"], "prompts": [{"id": "a", "category": "c", "text": "x"}]}', "not declared"),
        ('{"prompt": []}', "unknown top-level key(s) ['prompt']"),
    ],
)
def test_malformed_prompt_files(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PromptSetError) as info:
        load_prompt_set(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptSetError, match="file not found"):
        load_prompt_set(tmp_path / "nope.json")


def test_facts_prompt_set_has_a_subject_and_an_answer_in_every_prompt():
    ps = load_prompt_set(REPO / "resources/prompt_sets/facts.json")
    assert len(ps) >= 40
    counts = {c: sum(p.category == c for p in ps.prompts) for c in ps.categories}
    assert len(counts) >= 4 and max(counts.values()) - min(counts.values()) <= 1, counts
    for p in ps.prompts:
        assert p.subject and p.subject in p.text and isinstance(p.answer, str) and p.answer.strip(), p.id
        assert not p.text.endswith((" ", "\n")), p.id  # completion-style: the answer follows after one space
    assert len({p.text for p in ps.prompts}) == len(ps)


def test_subject_is_kept_and_hashed(tmp_path):
    data = {"prompts": [{"id": "a", "category": "c", "text": "The capital of France is", "subject": "France",
                         "answer": "Paris"}]}
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(data))
    ps = load_prompt_set(path)
    assert ps.prompts[0].subject == "France" and ps.prompts[0].answer == "Paris"
    assert ps.prompts[0].to_dict()["subject"] == "France"
    before = ps.sha256
    data["prompts"][0]["subject"] = "capital"
    path.write_text(json.dumps(data))
    assert load_prompt_set(path).sha256 != before


@pytest.mark.parametrize(
    "subject, expected",
    [
        ("Germany", r"prompt #0 \(id 'fact-1'\): subject 'Germany' does not occur in its text"),
        ("france", r"prompt #0 \(id 'fact-1'\): subject 'france' does not occur"),  # exact, case-sensitive
        ("  ", "'subject' must be a non-empty string"),
        (3, "'subject' must be a non-empty string"),
    ],
)
def test_subject_must_occur_in_the_text(tmp_path, subject, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"prompts": [{"id": "fact-1", "category": "c", "text": "The capital of France is",
                                             "subject": subject, "answer": "Paris"}]}))
    with pytest.raises(PromptSetError, match=expected):
        load_prompt_set(path)
