"""The config schema: the shipped base (models, prompt sets, generation, …) plus one block per
experiment, built from the registry (each experiment's parameter schema holds the only copy of
its defaults).

``resources/config.schema.json`` is the full schema as built here, written for editors and
readers by ``python -m layerscope.jobs.schema --write``; a test checks that it is current.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

SCHEMA_FILE = "resources/config.schema.json"
COMMON_KEYS = ("enabled", "models", "prompt_sets")


def experiment_block(key: str, rules: list) -> dict:
    """The schema of ``config.experiments.<key>`` for the experiment rules that read it."""
    first = rules[0]
    properties: dict = {
        "enabled": {"description": "Run this experiment (default true).", "type": "boolean", "default": True},
        "models": {"$ref": "#/$defs/slug_list",
                   "description": "Models to run on (default: every configured model of a supported kind)."},
    }
    if any(not rule.per_model for rule in rules):
        properties["prompt_sets"] = {"$ref": "#/$defs/slug_list",
                                     "description": "Prompt sets to run on (default: every configured one)."}
    for rule in rules:
        for name, spec in rule.params.items():
            if name in COMMON_KEYS or name == "seed":
                raise ValueError(f"{rule.name}: parameter {name!r} is reserved")
            if name in properties and properties[name] != spec:
                raise ValueError(f"{key}: parameter {name!r} declared differently by two of its rules")
            properties[name] = copy.deepcopy(dict(spec))
    return {
        "description": first.description_long or first.description,
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def build_schema(base_path: str | Path) -> dict:
    """The base schema with every registered experiment's block put in (registry order)."""
    from layerscope.experiments.registry import config_keys

    schema = json.loads(Path(base_path).read_text())
    experiments = schema["properties"]["experiments"]
    legacy = experiments.get("properties", {})
    blocks = {key: experiment_block(key, rules) for key, rules in config_keys().items()}
    # blocks of experiments not (yet) in the registry stay as the file has them
    blocks.update({key: block for key, block in legacy.items() if key not in blocks})
    experiments["properties"] = blocks
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_FILE} in place")
    parser.add_argument("--path", default=SCHEMA_FILE)
    args = parser.parse_args(argv)
    text = json.dumps(build_schema(args.path), indent=2, ensure_ascii=False) + "\n"
    if args.write:
        Path(args.path).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
