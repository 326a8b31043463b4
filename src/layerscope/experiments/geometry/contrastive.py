"""Contrastive completion trajectories: where meaning and surface form separate.

A group is an anchor prompt, an anchor completion, and completions related to the anchor
completion by a relation — ``synonym`` (same meaning, other words), ``antonym`` (opposite
meaning, parallel wording), ``style`` (same meaning, another register) and ``unrelated``.
Every completion is force-decoded after the prompt, rendered exactly as
``generate_completions`` renders prompts (chat template and system message through
:func:`layerscope.model.generate.encode_prompts`). The prompt is run once per group and its KV
cache shared by the group's completions, which run as one right-padded batch (the tokens
every prompt starts with — system message, template — run once for all groups); block
inputs are recorded by hooks, so ``resid.i`` means what it means in the activation cache.

Per layer l = 0 … L and related completion c:

* ``cosine``: cos(T_anchor(l) − μ(l), T_c(l) − μ(l)) with T(l) the mean of resid.l over the
  completion's tokens (its trajectory) and μ(l) the mean of all the set's trajectories at
  layer l (every group's anchor and related completions). Raw trajectories share the mean
  and massive directions of the residual stream, which put every raw cosine near 1 (0.97 for
  synonyms and antonyms alike on SmolLM2); the raw cosine is kept as ``cosine_raw``;
* ``kl``: KL(P_anchor(l) ‖ P_c(l)) in nats between logit-lens distributions (the model's
  final norm and unembedding, as in :mod:`layerscope.experiments.lens.logit_lens`) read at the completion's last
  token (``lens_tokens: last``: what the model expects next), or averaged over all its
  tokens (``lens_tokens: all``; costs one read-out per token and layer).

The *crossover* compares synonym and antonym on centred cosines: d(l) = mean over groups of
cos(anchor, synonym) − cos(anchor, antonym). The early order is the sign of d at the first
layer where it is non-zero; ``first_flip_layer`` is the first layer where the order is
reversed, ``crossover_layer`` the first layer from which it stays reversed through the last
layer (None when it never flips for good).

Uncertainty: the unit is the group (groups are independent items; a group's completions
share its prompt). Means over groups get percentile bootstrap intervals;
``crossover_layer_stability`` is the fraction of resamples of groups whose mean difference
curve has the same crossover layer; at the crossover layer an exact two-sided sign test
(binomial, p = 1/2) asks whether more groups than chance have the reversed order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.model.generate import encode_prompts, uses_chat_template
from layerscope.jobs.io import sha256_json
from layerscope.engines.readout import Readout
from layerscope.experiments.lens.logit_lens import first_true, stays_true_from
from layerscope.data.prompts import ID_PATTERN, Prompt
from layerscope.engines.sampling import sample_summary, stratified_sample
from layerscope.engines.statistics import Bootstrap
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.progress import track

log = logging.getLogger(__name__)

RELATIONS = ("synonym", "antonym", "style", "unrelated")
GROUP_KEYS = ("id", "prompt", "anchor", "completions")
TOP_KEYS = ("name", "description", "relations", "groups")


class ContrastiveGroupsError(LayerscopeError):
    """A malformed contrastive-groups file."""


@dataclass(frozen=True)
class ContrastiveGroup:
    id: str
    prompt: str
    anchor: str
    completions: tuple[tuple[str, str], ...]  # (relation, text) in the file's relation order

    def texts(self) -> list[str]:
        """The anchor completion first, then the related ones."""
        return [self.anchor] + [text for _, text in self.completions]


@dataclass(frozen=True)
class ContrastiveSet:
    name: str
    relations: tuple[str, ...]
    groups: tuple[ContrastiveGroup, ...]
    description: str = ""

    @property
    def sha256(self) -> str:
        return sha256_json([[g.id, g.prompt, g.anchor, list(g.completions)] for g in self.groups])


def load_groups(path: str | Path, *, limit: int | None = None) -> ContrastiveSet:
    """Load and validate a contrastive-groups file; ``limit`` keeps the first N groups."""
    path = Path(path)
    where = f"contrastive groups {path}"
    if not path.is_file():
        raise ContrastiveGroupsError(f"{where}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ContrastiveGroupsError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ContrastiveGroupsError(f"{where}: expected a JSON object with a 'groups' list")
    extra = sorted(set(data) - set(TOP_KEYS))
    if extra:
        raise ContrastiveGroupsError(f"{where}: unknown key(s) {extra}; allowed: {list(TOP_KEYS)}")
    relations = data.get("relations", list(RELATIONS))
    if (not isinstance(relations, list) or not relations or len(set(relations)) != len(relations)
            or not all(isinstance(r, str) and ID_PATTERN.match(r) for r in relations)):
        raise ContrastiveGroupsError(f"{where}: 'relations' must be a non-empty list of distinct names, got {relations!r}")
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ContrastiveGroupsError(f"{where}: 'groups' must be a non-empty list")
    seen: set[str] = set()
    out = []
    for index, group in enumerate(groups):
        label = f"{where}: group {index}"
        if not isinstance(group, dict):
            raise ContrastiveGroupsError(f"{label}: expected an object with keys {list(GROUP_KEYS)}")
        if isinstance(group.get("id"), str):
            label += f" ({group['id']})"
        missing = [k for k in GROUP_KEYS if k not in group]
        unknown = sorted(set(group) - set(GROUP_KEYS))
        if missing or unknown:
            raise ContrastiveGroupsError(f"{label}: missing key(s) {missing}, unknown key(s) {unknown}")
        gid = group["id"]
        if not isinstance(gid, str) or not ID_PATTERN.match(gid):
            raise ContrastiveGroupsError(f"{label}: id must be a slug (letters, digits, '._-'), got {gid!r}")
        if gid in seen:
            raise ContrastiveGroupsError(f"{label}: duplicate id {gid!r}")
        seen.add(gid)
        for key in ("prompt", "anchor"):
            if not isinstance(group[key], str) or not group[key].strip():
                raise ContrastiveGroupsError(f"{label}: '{key}' must be a non-empty string")
        completions = group["completions"]
        if not isinstance(completions, dict):
            raise ContrastiveGroupsError(f"{label}: 'completions' must be an object {{relation: text}}")
        if set(completions) != set(relations):
            raise ContrastiveGroupsError(
                f"{label}: completions must have exactly the relations {relations}; "
                f"missing {sorted(set(relations) - set(completions))}, unknown {sorted(set(completions) - set(relations))}"
            )
        for relation in relations:
            text = completions[relation]
            if not isinstance(text, str) or not text.strip():
                raise ContrastiveGroupsError(f"{label}: the {relation} completion must be a non-empty string")
            if text.strip() == group["anchor"].strip():
                raise ContrastiveGroupsError(f"{label}: the {relation} completion is identical to the anchor")
        out.append(ContrastiveGroup(gid, group["prompt"], group["anchor"],
                                    tuple((r, completions[r]) for r in relations)))
    if limit is not None:
        out = out[: int(limit)]
    return ContrastiveSet(str(data.get("name", path.stem)), tuple(relations), tuple(out),
                          str(data.get("description", "")))


# ---------------------------------------------------------------------------- force decoding


@dataclass
class EncodedGroup:
    group: ContrastiveGroup
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # anchor first, then the relations in order


def encode_groups(tokenizer, groups: ContrastiveSet, *, system_prompt: str | None,
                  chat_template: str | bool) -> list[EncodedGroup]:
    """Token ids of every group's rendered prompt and of its completions (never re-tokenised together)."""
    prompts = [Prompt(g.id, "contrastive", g.prompt) for g in groups.groups]
    rendered = encode_prompts(tokenizer, prompts, system_prompt=system_prompt, chat_template=chat_template)
    chat = uses_chat_template(tokenizer, chat_template)
    out = []
    for group, enc in zip(groups.groups, rendered):
        # after a chat template's assistant header the answer starts the turn; in plain text it follows a space
        texts = [t if chat else " " + t.strip() for t in group.texts()]
        ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        if any(len(i) == 0 for i in ids):
            raise ContrastiveGroupsError(f"group {group.id}: a completion encodes to no tokens")
        out.append(EncodedGroup(group, list(enc.ids), ids))
    return out


class _ResidualRecorder(contextlib.AbstractContextManager):
    """Records every block's input (resid.i) and the last block's output (resid.L) during a forward."""

    def __init__(self, adapter):
        self.n = adapter.n_layers
        self.states: list[torch.Tensor | None] = [None] * (self.n + 1)
        self.handles = [block.register_forward_pre_hook(self._pre(i), with_kwargs=True)
                        for i, block in enumerate(adapter.blocks)]
        self.handles.append(adapter.blocks[-1].register_forward_hook(self._post))

    def _pre(self, index):
        def hook(module, args, kwargs):
            self.states[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def _post(self, module, args, output):
        self.states[self.n] = (output[0] if isinstance(output, tuple) else output).detach()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of all sequences, leaving at least one token of each."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    k = 0
    while k < limit and all(s[k] == sequences[0][k] for s in sequences):
        k += 1
    return k


@dataclass
class SharedPrefix:
    """The KV cache of the tokens every prompt begins with (system message, template), computed once."""

    length: int
    past: object


@torch.no_grad()
def shared_prefix(adapter, prompts: list[list[int]]) -> SharedPrefix | None:
    k = common_prefix_length(prompts)
    if k == 0:
        return None
    ids = torch.tensor([prompts[0][:k]], dtype=torch.long, device=adapter.device)
    return SharedPrefix(k, adapter.base(input_ids=ids, use_cache=True).past_key_values)


@torch.no_grad()
def force_decode(adapter, prompt_ids: list[int], completions: list[list[int]], readout=None, *,
                 lens_tokens: str = "last", prefix: SharedPrefix | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
    """Trajectories [n_completions, L+1, d] (float64: mean of resid.l over each completion's tokens)
    and, with a ``readout``, log-probabilities [n_completions, L+1, vocab] of the lens at each layer.

    The prompt runs once (continuing a copy of ``prefix``'s cache when given, which must be a
    prefix of ``prompt_ids``); its cache is repeated for the completions, run as one batch.
    """
    device = adapter.device
    n = len(completions)
    if prefix is not None:
        past = copy.deepcopy(prefix.past)
        rest = torch.tensor([prompt_ids[prefix.length :]], dtype=torch.long, device=device)
        past = adapter.base(input_ids=rest, past_key_values=past, use_cache=True).past_key_values
    else:
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        past = adapter.base(input_ids=prompt, use_cache=True).past_key_values
    past.batch_repeat_interleave(n)
    lengths = torch.tensor([len(c) for c in completions])
    width = int(lengths.max())
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, c in enumerate(completions):  # right padding: real tokens never attend to the pads
        ids[row, : len(c)] = torch.tensor(c)
        mask[row, : len(c)] = 1
    full_mask = torch.cat([torch.ones((n, len(prompt_ids)), dtype=torch.long), mask], dim=1)
    with _ResidualRecorder(adapter) as recorder:
        adapter.base(input_ids=ids.to(device), attention_mask=full_mask.to(device), past_key_values=past,
                     use_cache=True)
    states = torch.stack(recorder.states, dim=1)  # [n, L+1, width, d]
    weights = mask.to(device=device, dtype=torch.float64)[:, None, :, None]
    traj = (states.double() * weights).sum(dim=2) / lengths.to(device=device, dtype=torch.float64)[:, None, None]
    if readout is None:
        return traj.cpu().numpy(), None
    if lens_tokens == "last":
        last = states[torch.arange(n, device=device), :, (lengths - 1).to(device)]  # [n, L+1, d]
        logp = torch.log_softmax(readout(last.reshape(-1, last.shape[-1])).float(), dim=-1)
        logp = logp.reshape(n, states.shape[1], -1)
    elif lens_tokens == "all":
        rows = []
        for row in range(n):
            valid = states[row, :, : int(lengths[row])]  # [L+1, T, d]
            probs = torch.softmax(readout(valid.reshape(-1, valid.shape[-1])).float(), dim=-1)
            rows.append(probs.reshape(valid.shape[0], valid.shape[1], -1).mean(dim=1).clamp_min(1e-30).log())
        logp = torch.stack(rows)
    else:
        raise LayerscopeError(f"contrastive.lens_tokens must be 'last' or 'all', got {lens_tokens!r}")
    return traj.cpu().numpy(), logp.cpu()


def crossover(diff: np.ndarray) -> dict:
    """Where the synonym-vs-antonym order flips (see module docstring)."""
    signs = np.sign(diff)
    nonzero = np.nonzero(signs)[0]
    if len(nonzero) == 0:
        return {"early_order": None, "first_flip_layer": None, "crossover_layer": None}
    early = signs[nonzero[0]]
    flipped = (signs == -early)[:, None]
    first = int(first_true(flipped)[0])
    cross = int(stays_true_from(flipped)[0])
    n = len(diff)
    return {
        "early_order": "synonym>antonym" if early > 0 else "antonym>synonym",
        "first_flip_layer": first if first < n else None,
        "crossover_layer": cross if cross < n else None,
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def trajectory_cosines(trajectories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centred, raw) cosine of each related completion's trajectory to its anchor's, [n_groups, R, L+1].

    ``trajectories`` [n_groups, 1 + R, L+1, d]: the anchor first. Centred: every trajectory minus
    the mean of all the set's trajectories at that layer (anchors and related completions of every
    group), so that a direction every completion shares — the mean and the massive dimensions of
    the residual stream — does not make every pair look alike.
    """
    t = np.asarray(trajectories, dtype=np.float64)
    mean = t.mean(axis=(0, 1), keepdims=True)  # [1, 1, L+1, d]
    centred = t - mean
    return _cosine(centred[:, :1], centred[:, 1:]), _cosine(t[:, :1], t[:, 1:])


def sign_test(differences: np.ndarray, late_sign: float) -> dict:
    """Exact two-sided sign test of per-group differences: how many groups have the late order (zeros left out)."""
    from scipy.stats import binomtest

    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    k = int((np.sign(nonzero) == late_sign).sum())
    n = int(len(nonzero))
    return {"n_late_order": k, "n_groups": n, "p_value": float(binomtest(k, n, 0.5).pvalue) if n else None}


def sample_groups(groups: ContrastiveSet, n: int | None, seed: int) -> tuple[ContrastiveSet, dict]:
    """A seeded random sample of ``n`` groups (all with None), in file order, and its summary fragment."""
    ids = [g.id for g in groups.groups]
    chosen = set(stratified_sample(ids, ["contrastive"] * len(ids), n, seed=seed))
    kept = tuple(g for g in groups.groups if g.id in chosen)
    sample = ContrastiveSet(groups.name, groups.relations, kept, groups.description)
    return sample, sample_summary(ids, ["contrastive"] * len(ids), [g.id for g in kept])


@dataclass
class ContrastiveResult:
    metrics: pd.DataFrame  # tidy: model, relation, layer, metric, value
    per_group: pd.DataFrame  # group, relation, layer, cosine, cosine_raw, kl
    summary: dict
    cosine: dict  # relation -> [n_groups, L+1], centred
    kl: dict  # relation -> [n_groups, L+1]
    cosine_raw: dict  # relation -> [n_groups, L+1]
    bands: dict  # (metric, relation) -> [L+1] pairs: bootstrap interval of the mean over groups


def _sem(x: np.ndarray) -> np.ndarray:
    return x.std(axis=0, ddof=1) / np.sqrt(x.shape[0]) if x.shape[0] > 1 else np.zeros(x.shape[1])


def contrastive(adapter, tokenizer, groups: ContrastiveSet, *, model: str, system_prompt: str | None,
                chat_template: str | bool = "auto", lens_tokens: str = "last", seed: int = 0,
                n_boot: int | None = None) -> ContrastiveResult:
    if adapter.unembed is None:
        raise LayerscopeError("contrastive trajectories need a decoder (force-decoding and a logit lens)")
    if lens_tokens not in ("last", "all"):
        raise LayerscopeError(f"contrastive.lens_tokens must be 'last' or 'all', got {lens_tokens!r}")
    encoded = encode_groups(tokenizer, groups, system_prompt=system_prompt, chat_template=chat_template)
    readout = Readout(adapter)
    relations = groups.relations
    n_sites = adapter.n_layers + 1
    kl = {r: np.zeros((len(encoded), n_sites)) for r in relations}
    trajectories = np.zeros((len(encoded), 1 + len(relations), n_sites, adapter.facts.d_model))
    n_tokens = 0
    prefix = shared_prefix(adapter, [enc.prompt_ids for enc in encoded])
    for g, enc in enumerate(track(encoded, "contrastive", unit="groups")):
        traj, logp = force_decode(adapter, enc.prompt_ids, enc.completion_ids, readout, lens_tokens=lens_tokens,
                                  prefix=prefix)
        n_tokens += sum(len(c) for c in enc.completion_ids)
        trajectories[g] = traj
        p_anchor = logp[0].double().exp()
        for j, relation in enumerate(relations, start=1):
            kl[relation][g] = (p_anchor * (logp[0].double() - logp[j].double())).sum(-1).clamp_min(0).numpy()
    centred, raw = trajectory_cosines(trajectories)
    cosine = {r: centred[:, j] for j, r in enumerate(relations)}
    cosine_raw = {r: raw[:, j] for j, r in enumerate(relations)}
    rows = [(enc.group.id, relation, layer, float(cosine[relation][g, layer]), float(cosine_raw[relation][g, layer]),
             float(kl[relation][g, layer]), len(enc.completion_ids[0]), len(enc.completion_ids[j]))
            for g, enc in enumerate(encoded) for j, relation in enumerate(relations, start=1)
            for layer in range(n_sites)]
    per_group = pd.DataFrame(rows, columns=["group", "relation", "layer", "cosine", "cosine_raw", "kl",
                                            "n_anchor_tokens", "n_completion_tokens"])
    per_group.insert(0, "model", model)

    boot = Bootstrap(len(encoded), unit="group", seed=seed, **({"n_boot": n_boot} if n_boot else {}))
    bands: dict = {}
    records = []
    for relation in relations:
        for metric, values in (("cosine", cosine[relation]), ("cosine_raw", cosine_raw[relation]),
                               ("kl", kl[relation])):
            _, pairs = boot.interval(values)
            bands[(metric, relation)] = pairs
            for stat, curve in (("mean", values.mean(axis=0)), ("sem", _sem(values)),
                                ("ci_low", [p[0] for p in pairs]), ("ci_high", [p[1] for p in pairs])):
                records += [(relation, layer, f"{metric}_{stat}", float(v)) for layer, v in enumerate(curve)]
    summary_cross: dict = {"early_order": None, "first_flip_layer": None, "crossover_layer": None,
                           "crossover_layer_stability": None, "crossover_sign_test_p": None,
                           "crossover_n_late_order": None, "crossover_n_groups": None, "raw_crossover_layer": None}
    diff = above = diff_ci = None
    if "synonym" in relations and "antonym" in relations:
        paired = cosine["synonym"] - cosine["antonym"]
        diff, above = paired.mean(axis=0), (paired > 0).mean(axis=0)
        _, diff_ci = boot.interval(paired)
        bands[("difference", "synonym-antonym")] = diff_ci
        summary_cross.update(crossover(diff))
        layer = summary_cross["crossover_layer"]
        _, stability = boot.stability(paired, pick=lambda v: crossover(v)["crossover_layer"])
        summary_cross["crossover_layer_stability"] = stability
        boot.check_stability("crossover_layer", stability)
        if layer is not None:
            late = -1.0 if summary_cross["early_order"] == "synonym>antonym" else 1.0
            test = sign_test(paired[:, layer], late)
            summary_cross.update(crossover_sign_test_p=test["p_value"], crossover_n_late_order=test["n_late_order"],
                                 crossover_n_groups=test["n_groups"])
            if test["p_value"] is None or test["p_value"] > 0.05:
                boot.flag(f"the order at the crossover layer {layer} is not significant by a sign test over groups "
                          f"(p = {test['p_value']})")
        summary_cross["raw_crossover_layer"] = crossover((cosine_raw["synonym"] - cosine_raw["antonym"]).mean(0))[
            "crossover_layer"]
        records += [("synonym-antonym", layer, "cosine_difference_mean", float(v)) for layer, v in enumerate(diff)]
        records += [("synonym-antonym", layer, "cosine_difference_sem", float(v))
                    for layer, v in enumerate(_sem(paired))]
        records += [("synonym-antonym", layer, f"cosine_difference_ci_{side}", float(pair[i]))
                    for layer, pair in enumerate(diff_ci) for i, side in enumerate(("low", "high"))]
        records += [("synonym-antonym", layer, "synonym_closer_fraction", float(v)) for layer, v in enumerate(above)]
    metrics = pd.DataFrame(records, columns=["relation", "layer", "metric", "value"])
    metrics.insert(0, "model", model)

    def with_ci(name: str, values: np.ndarray) -> dict:
        point, interval = boot.interval(values)
        return {name: point, f"{name}_ci": interval}

    n_completions = len(encoded) * (len(relations) + 1)
    summary = {
        "model": model,
        "groups": groups.name,
        "groups_sha256": groups.sha256,
        "n_groups": len(encoded),
        "relations": list(relations),
        "n_layers": adapter.n_layers,
        "lens_tokens": lens_tokens,
        "n_completion_tokens": n_tokens,
        "mean_completion_tokens": n_tokens / n_completions,
        **summary_cross,
    }
    for r in relations:
        summary.update(with_ci(f"cosine_mean_{r}", cosine[r].mean(axis=1)))
        summary.update(with_ci(f"cosine_last_{r}", cosine[r][:, -1]))
        summary.update(with_ci(f"kl_mean_{r}", kl[r].mean(axis=1)))
        summary[f"cosine_raw_mean_{r}"] = float(cosine_raw[r].mean())
        summary[f"cosine_raw_last_{r}"] = float(cosine_raw[r][:, -1].mean())
    summary.update({
        "mean_cosine_by_layer": {r: cosine[r].mean(axis=0).tolist() for r in relations},
        "mean_raw_cosine_by_layer": {r: cosine_raw[r].mean(axis=0).tolist() for r in relations},
        "mean_kl_by_layer": {r: kl[r].mean(axis=0).tolist() for r in relations},
        "synonym_minus_antonym_by_layer": diff.tolist() if diff is not None else None,
        "synonym_minus_antonym_by_layer_ci": diff_ci,
        "synonym_closer_fraction_by_layer": above.tolist() if above is not None else None,
        **boot.summary(),
    })
    return ContrastiveResult(metrics, per_group, summary, cosine, kl, cosine_raw, bands)


# ---------------------------------------------------------------------------- outputs


def _mark_crossover(ax, summary) -> None:
    if summary.get("crossover_layer") is not None:
        ax.axvline(summary["crossover_layer"], color="0.3", linestyle="--", linewidth=0.9)


def plot_curves(result: ContrastiveResult, path: str | Path, which: str) -> None:
    from layerscope.report.plotting import PALETTE, figure, layer_axis, save

    s = result.summary
    data = result.cosine if which == "cosine" else result.kl
    x = np.arange(s["n_layers"] + 1)
    with figure(width=7.0, height=4.2) as (fig, ax):
        for k, (relation, values) in enumerate(data.items()):
            band = np.array(result.bands[(which, relation)], dtype=float)
            ax.plot(x, values.mean(axis=0), marker="o", markersize=2.5, color=PALETTE[k], label=relation)
            ax.fill_between(x, band[:, 0], band[:, 1], color=PALETTE[k], alpha=0.2)
        _mark_crossover(ax, s)
        layer_axis(ax, s["n_layers"])
        if which == "cosine":
            ax.set_ylabel("centred cos(anchor, completion) of mean trajectories")
            title = "trajectory cosine to the anchor completion (centred on the set's mean trajectory)"
        else:
            ax.set_yscale("log")
            ax.set_ylabel("KL(anchor ‖ completion) of lens distributions (nats)")
            tokens = "averaged over the completion's tokens" if s["lens_tokens"] == "all" else "at its last token"
            title = f"logit-lens divergence from the anchor completion, {tokens}"
        ax.legend(loc="best")
        ax.set_title(f"{title}\n{s['model']}, {s['n_groups']} groups (bands: 95 % bootstrap interval over groups; "
                     "dashed: crossover layer)")
        save(fig, path)


def plot_crossover(result: ContrastiveResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, save

    s = result.summary
    x = np.arange(s["n_layers"] + 1)
    with figure(width=7.0, height=4.0) as (fig, ax):
        if s["synonym_minus_antonym_by_layer"] is None:
            ax.text(0.5, 0.5, "the groups have no synonym and antonym relations", ha="center", transform=ax.transAxes)
        else:
            paired = result.cosine["synonym"] - result.cosine["antonym"]
            band = np.array(s["synonym_minus_antonym_by_layer_ci"], dtype=float)
            ax.plot(x, paired.mean(axis=0), marker="o", markersize=2.5, label="mean cos(syn) − cos(ant), centred")
            ax.fill_between(x, band[:, 0], band[:, 1], alpha=0.2, label="95 % interval (groups)")
            raw = result.cosine_raw["synonym"] - result.cosine_raw["antonym"]
            ax.plot(x, raw.mean(axis=0), color="0.5", linewidth=0.9, linestyle="--", label="same, raw cosine")
            ax.axhline(0, color="0.5", linewidth=0.8)
            ax.set_ylabel("synonym − antonym cosine")
            twin = ax.twinx()
            twin.plot(x, s["synonym_closer_fraction_by_layer"], color="C1", linestyle=":",
                      label="groups where synonym is closer")
            twin.set_ylim(0, 1)
            twin.set_ylabel("fraction of groups")
            twin.grid(False)
            _mark_crossover(ax, s)
            lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
        layer_axis(ax, s["n_layers"])
        stability = s.get("crossover_layer_stability")
        extra = "" if stability is None else f"\nreproduced by {stability:.0%} of resamples of groups"
        if s.get("crossover_sign_test_p") is not None:
            extra += f"; sign test at the crossover p = {s['crossover_sign_test_p']:.2g}"
        ax.set_title(f"meaning vs form — early order {s['early_order']}, crossover layer {s['crossover_layer']}{extra}")
        save(fig, path)


def plot_relations(result: ContrastiveResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, layer_axis, save

    s = result.summary
    relations = list(result.cosine)
    x = np.arange(s["n_layers"] + 1)
    ncols = min(4, len(relations))
    nrows = -(-len(relations) // ncols)
    with figure(nrows, ncols, width=3.2 * ncols, height=3.0 * nrows, sharey=True) as (fig, axes):
        axes = np.atleast_1d(axes).ravel()
        for k, relation in enumerate(relations):
            ax = axes[k]
            values = result.cosine[relation]
            for curve in values:
                ax.plot(x, curve, color=PALETTE[k], alpha=0.15, linewidth=0.7)
            ax.plot(x, values.mean(axis=0), color=PALETTE[k], linewidth=2)
            layer_axis(ax, s["n_layers"], label="layer")
            ax.set_title(f"{relation} ({values.shape[0]} groups)")
        axes[0].set_ylabel("centred cos(anchor, completion)")
        for ax in axes[len(relations):]:
            ax.set_axis_off()
        fig.suptitle(f"every group's trajectory cosine, by relation — {s['model']}")
        save(fig, path)


def run(job: Job) -> Result:
    """Force-decode the contrastive groups with one model (GPU) and compare their trajectories."""
    from layerscope.model.adapter import load_model, load_tokenizer

    params, render = job.params, job.render
    model_dir = job.input("model")
    groups, sample = sample_groups(load_groups(job.input("groups")), params["max_groups"], params["seed"])
    adapter = load_model(model_dir, dtype=render["dtype"], device=job.device, kind="decoder")
    tokenizer = load_tokenizer(model_dir)
    result = contrastive(adapter, tokenizer, groups, model=job.model, system_prompt=render["system_prompt"],
                         chat_template=render["chat_template"], lens_tokens=params["lens_tokens"], seed=params["seed"])
    return Result(
        summary={**result.summary, **sample},
        tables={"metrics": result.metrics, "per_group": result.per_group},
        figures={"cosine": partial(plot_curves, result, which="cosine"),
                 "kl": partial(plot_curves, result, which="kl"),
                 "crossover": partial(plot_crossover, result), "relations": partial(plot_relations, result)},
    )


EXPERIMENT = Experiment(
    name="contrastive",
    dashboard=('crossover_layer', 'crossover_layer_stability', 'crossover_sign_test_p', 'first_flip_layer'),
    family="geometry",
    description="trajectories of force-decoded synonym/antonym/style/unrelated completions",
    description_long="Force-decoded contrastive completions (synonym, antonym, style, unrelated); trajectory cosine "
                     "and lens KL per layer (decoders).",
    needs="decoder",
    data="inputs",
    gpu=True,
    inputs=("model", "param:groups"),
    run=run,
    tables=("metrics", "per_group"),
    figures=(Figure("cosine", "trajectory cosine"), Figure("kl", "lens KL"), Figure("crossover", "crossover"),
             Figure("relations", "per relation")),
    params={'groups': {'description': 'Contrastive-groups file (see resources/contrastive/groups.json).',
                       'type': 'string',
                       'minLength': 1,
                       'default': 'resources/contrastive/groups.json'},
            'max_groups': {'description': 'Use a seeded random sample of N groups (null: all).',
                           'type': ['integer', 'null'],
                           'minimum': 1,
                           'default': None},
            'lens_tokens': {'description': 'Where the lens KL is read: the last completion token (what the model '
                                           'expects next), or all tokens averaged (one read-out per token and layer: '
                                           'costly on a CPU).',
                            'enum': ['last', 'all'],
                            'default': 'last'}},
    threads=2,
    runtime=60,
    render=True,
)
