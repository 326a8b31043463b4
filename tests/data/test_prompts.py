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
