"""The experiment registry: every experiment declares itself once, in its own module.

An experiment module defines ``EXPERIMENT = Experiment(...)``: its name, what it needs (a
decoder or any model; prompts, paired prompts, weights, its own inputs, or a pair of
models), whether it runs the model (a GPU job), threads and runtime, the inputs it reads
(from the closed vocabulary :data:`INPUTS`), its outputs (tables, figures with captions,
other files), its parameter schema with the only copy of its defaults, and one run function
``run(job) -> Result``.

Everything else derives from these declarations: the Snakemake rules (``rules/experiments.smk``
loops over :func:`experiments`), the targets of ``rule all``, the ``experiments`` part of the
config schema (:func:`layerscope.jobs.schema.build_schema`), the report sections and the
README's experiment list (both checked against the registry by a test). One writer,
:func:`write_result`, writes every result: tables, figures, other files, then summary.json
last, each atomically, with provenance.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from layerscope import LayerscopeError
from layerscope.jobs import paths

# what an experiment reads, by name (its rule's input keys). A "pairs" experiment reads
# model_a/model_b (prepared folders) or resid_a/tokens_a/resid_b/tokens_b (activation caches).
INPUTS = {
    "model": "the prepared model folder (config.json, safetensors, tokenizer)",
    "resid": "the activation cache: residual stream at every block boundary",
    "tokens": "the activation cache's token table",
    "prompts": "the prompt set's file",
    "mask": "the model's Z-mask (z_mask.safetensors, from the z_mask experiment)",
    "model_a": "the first model of a pair (prepared folder)",
    "model_b": "the second model of a pair (prepared folder)",
    "resid_a": "the first model's activation cache",
    "tokens_a": "the first model's token table",
    "resid_b": "the second model's activation cache",
    "tokens_b": "the second model's token table",
}
# an input may also be ``param:<key>`` (a file named by one of the experiment's parameters, so
# editing the file re-runs it) or ``summary:<experiment>`` (another experiment's summary.json
# for the same model and prompt set).

NEEDS = ("decoder", "any")
# prompts: per (model, prompt set); pairs: paired zh/en prompt sets only (per model, prompt set);
# weights: per model, from its weights; inputs: per model, from files the experiment names itself;
# model_pairs: per pair of models (and prompt set when it reads activation caches).
DATA = ("prompts", "paired", "weights", "inputs", "model_pairs")


@dataclass(frozen=True)
class Figure:
    """One figure: ``{name}.{png|svg}``; its caption is ``resources/report/{experiment}_{name}.rst``."""

    name: str
    label: str  # what the figure shows, for the report's labels


@dataclass(frozen=True)
class Experiment:
    name: str  # rule name, results folder, summary's "experiment"
    family: str  # experiments/<family>/: lens, surgery, geometry, weights, nonlinearity, z_subspace, cross_model
    description: str  # one line, used in the README list and the report
    needs: str  # "decoder" or "any"
    data: str  # one of DATA
    gpu: bool  # runs model forwards: resources gpu=1, a leased device
    inputs: tuple[str, ...]
    run: Callable[["Job"], "Result"]
    tables: tuple[str, ...] = ("metrics",)  # {name}.parquet
    figures: tuple[Figure, ...] = ()
    files: tuple[str, ...] = ()  # other outputs, full file names (e.g. z_mask.safetensors)
    params: Mapping[str, dict] = field(default_factory=dict)  # JSON-Schema properties, with defaults
    description_long: str = ""  # the schema's description of the config block
    threads: int = 2
    runtime: int = 60  # minutes
    config_key: str = ""  # the config.experiments block it reads ("" = its name)
    folder: str = ""  # results folder below its base ("" = its name)
    requires: tuple[str, ...] = ()  # experiments whose results it reads: runs only where they run
    section: str = ""  # report section ("" = its config key)
    render: bool = False  # receives the model's rendering parameters (chat template, system prompt)
    uses_prompt_sets: bool = True  # for model_pairs: whether runs are per prompt set too
    headlines: tuple[str, ...] = ()  # summary keys reported with an interval K_ci (the writer checks them)
    kinds: tuple[str, ...] = ()  # model kinds it runs on ("" = decoders, or decoders and encoders for needs="any")
    dashboard: tuple[str, ...] = ()  # summary keys the report leads with (index and model pages; default: headlines)

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"{self.name}: needs must be one of {NEEDS}")
        if self.data not in DATA:
            raise ValueError(f"{self.name}: data must be one of {DATA}")
        for name in self.inputs:
            if name not in INPUTS and not name.startswith(("param:", "summary:")):
                raise ValueError(f"{self.name}: unknown input {name!r}; known: {sorted(INPUTS)}, param:<key>, "
                                 "summary:<experiment>")

    # ------------------------------------------------------------------ derived facts

    @property
    def key(self) -> str:
        """Its block under ``experiments:`` in the config."""
        return self.config_key or self.name

    @property
    def model_kinds(self) -> tuple[str, ...]:
        """The model kinds it runs on: declared, else decoders (needs="decoder") or decoders and encoders."""
        if self.kinds:
            return self.kinds
        return ("decoder",) if self.needs == "decoder" else ("decoder", "encoder")

    def accepts(self, kind: str) -> bool:
        return kind in self.model_kinds

    @property
    def report_section(self) -> str:
        return self.section or self.key

    @property
    def per_model(self) -> bool:
        """Runs per model only (results/{model}/{experiment}/), without a prompt set."""
        return self.data in ("weights", "inputs")

    @property
    def pairwise(self) -> bool:
        return self.data == "model_pairs"

    @property
    def paired(self) -> bool:
        return self.data == "paired"

    @property
    def wildcards(self) -> tuple[str, ...]:
        if self.pairwise:
            return ("model_a", "model_b", "pset") if self.uses_prompt_sets else ("model_a", "model_b")
        return ("model",) if self.per_model else ("model", "pset")

    def output_file(self, name: str) -> str:
        """Path pattern of one of its output files."""
        folder = self.folder or self.name
        if self.pairwise:
            base = paths.CROSS_MODEL_DIR.replace("{experiment}", folder)
            if self.uses_prompt_sets:
                base += "/{pset}"
            return base + "/{model_a}/{model_b}/" + name
        base = paths.WEIGHTS_EXPERIMENT_DIR if self.per_model else paths.EXPERIMENT_DIR
        return base.replace("{experiment}", folder) + "/" + name

    def outputs(self, figure_format: str) -> dict[str, str]:
        """Rule output key -> path pattern: summary, table_*, figure_*, file_*."""
        out = {"summary": self.output_file(paths.SUMMARY)}
        out.update({f"table_{t}": self.output_file(f"{t}.parquet") for t in self.tables})
        out.update({f"figure_{f.name}": self.output_file(f"{f.name}.{figure_format}") for f in self.figures})
        out.update({f"file_{_stem(f)}": self.output_file(f) for f in self.files})
        return out

    def caption(self, figure: Figure) -> str:
        """Caption file of a figure, relative to the repository."""
        return f"resources/report/{self.name}_{figure.name}.rst"

    def log(self) -> str:
        return paths.log(self.name, *(f"{{{w}}}" for w in self.wildcards))

    def benchmark(self) -> str:
        return paths.benchmark(self.name, *(f"{{{w}}}" for w in self.wildcards))

    @property
    def function(self) -> str:
        return f"{self.run.__module__}.{self.run.__qualname__}"


def _stem(filename: str) -> str:
    return filename.split(".", 1)[0]


@dataclass
class Job:
    """What a run function gets: its input paths, parameters, wildcards and device."""

    experiment: Experiment
    inputs: dict[str, str]
    params: dict[str, Any]
    wildcards: dict[str, str]
    device: Any = "cpu"
    render: dict[str, Any] | None = None

    @property
    def model(self) -> str:
        return self.wildcards.get("model", "")

    @property
    def prompt_set(self) -> str:
        return self.wildcards.get("pset", "")

    def input(self, name: str) -> str:
        try:
            return self.inputs[name]
        except KeyError:
            raise LayerscopeError(f"{self.experiment.name}: no input {name!r} (declared: "
                                  f"{list(self.experiment.inputs)})") from None


@dataclass
class Result:
    """What a run function returns. Figures and files are callables that write to a given path."""

    summary: dict[str, Any]
    tables: dict[str, Any] = field(default_factory=dict)  # name -> pandas DataFrame
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- discovery

_REGISTRY: dict[str, Experiment] | None = None
EXTRA_MODULES_ENV = "LAYERSCOPE_EXPERIMENT_MODULES"


def _modules() -> list[str]:
    import os

    import layerscope.experiments as pkg

    names = []
    for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
        if not info.ispkg and not info.name.endswith(".registry"):
            names.append(info.name)
    # extra experiment modules (importable names, comma-separated): a user's own experiments
    names += [m.strip() for m in os.environ.get(EXTRA_MODULES_ENV, "").split(",") if m.strip()]
    return names


def experiments() -> dict[str, Experiment]:
    """Every registered experiment, by name (modules under layerscope.experiments that define EXPERIMENT)."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, Experiment] = {}
        for module_name in _modules():
            module = importlib.import_module(module_name)
            declared = getattr(module, "EXPERIMENT", None)
            for exp in declared if isinstance(declared, (list, tuple)) else [declared]:
                if exp is None:
                    continue
                if exp.name in found:
                    raise ValueError(f"experiment {exp.name!r} declared twice ({module_name})")
                found[exp.name] = exp
        _REGISTRY = dict(sorted(found.items(), key=lambda kv: _ORDER.get(kv[1].family, 99)))
    return _REGISTRY


_ORDER = {f: i for i, f in enumerate(["lens", "nonlinearity", "geometry", "weights", "cross_model", "surgery",
                                      "z_subspace"])}


def get(name: str) -> Experiment:
    try:
        return experiments()[name]
    except KeyError:
        raise LayerscopeError(f"unknown experiment {name!r}; registered: {sorted(experiments())}") from None


def config_keys() -> dict[str, list[Experiment]]:
    """Config block -> the experiments (rules) that read it, in registry order."""
    out: dict[str, list[Experiment]] = {}
    for exp in experiments().values():
        out.setdefault(exp.key, []).append(exp)
    return out


def reset() -> None:
    """Forget the discovered registry (tests that register a temporary module)."""
    global _REGISTRY
    _REGISTRY = None
