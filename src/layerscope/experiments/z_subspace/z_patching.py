"""Z patching: replace the Z (or Z⊥) content of an English problem's residual with its Chinese version's.

The z_subspace suite's causal test. For each pair, the English prompt is generated greedily (≤ 100
new tokens) under five conditions at a Z-mask layer ℓ (the residual ``resid.ℓ`` entering
block ℓ, changed by a forward pre-hook on that block):

* ``none`` — unpatched;
* ``z`` — h ← h + P_Z (s − h) = P_Z⊥ h + P_Z s   (Chinese Z content, English Z⊥);
* ``z_perp`` — h ← h + P_Z⊥ (s − h) = P_Z h + P_Z⊥ s;
* ``full`` — h ← s;
* ``random`` — like ``z`` with a Haar-random subspace of the same size, drawn afresh for every
  pair (seeded by the run's seed, the layer, k and the pair id), so that the random
  condition's rate averages over subspaces as well as over pairs.

Written as h + P(s − h), a source equal to the state itself changes nothing, bit for bit.

Sources s (from the activation cache — nothing is recomputed): the Chinese problem-text
states at ``resid.ℓ``, either ``mean`` (their mean, broadcast to every patched position)
or ``ot`` (optimal-transport aligned: the exact EMD plan π between the Chinese and English
problem-text token clouds — uniform marginals, squared Euclidean cost, POT ``ot.emd`` —
gives English token t the barycentre s_t = Σ_s π_st / b_t · h_zh[s]).

Patched positions: the English **problem-text tokens** (role ``prompt``) — by default
(``positions: prompt``) only those: the system message and chat-template tokens keep
their own states, and generated tokens are computed normally but attend to the patched
prompt (the patch holds at every generation step through the key/value cache, exactly as
if the whole sequence were re-run with the patch). With ``positions: all``, every later
position as well (the closing template tokens and each generated token, at every step) is
patched with the mean source (for ``ot`` too: the mean is the OT source averaged over the
English tokens).

All conditions of a pair share one prompt, so they are generated together as one batch
(no padding). Per output: the raw text, the extracted answer (the last number in the text,
after Unicode NFKC normalisation and removal of thousands separators), the language by the
fraction of CJK characters among letters (``en`` ≤ lang_threshold, ``zh`` ≥ 1 − lang_threshold,
else ``mixed``; ``none`` without letters) and correctness against the pair's answer.

Derived rates per (layer, k, source), over pairs, relative to the unpatched output:
answer change (the extracted answer differs) for every condition; language preservation
after ``z`` (the language class is unchanged) and language disruption after ``z_perp`` (it
changed); full-patch resemblance = mean token-sequence similarity (difflib ratio) of the
``full`` output with the ``z`` and with the ``z_perp`` output. Every rate k/n comes with its
exact (Clopper–Pearson) 95 % interval; mean similarities with a bootstrap interval over pairs.
Verdict, from the intervals (a pair is the unit; with few pairs most verdicts are
``insufficient data``):

* ``insufficient data``: the intervals of the Z and Z⊥ answer-change rates overlap — the
  sample cannot separate the two conditions;
* ``double_dissociation``: Z changes answers more often than Z⊥ (separated intervals, by at
  least ``margin``), and the intervals put Z's answer change and language preservation and
  Z⊥'s language disruption at or above ``threshold`` and Z⊥'s answer change below it;
* ``partial``: Z changes answers more often than Z⊥ (separated, by at least ``margin``),
  without the rest;
* ``null``: the intervals are separated but Z does not change answers more often than Z⊥ by
  ``margin``.

``verdict_point`` applies the same thresholds to the point rates alone (the definition
before intervals: it is not a finding). ``z_specific`` says whether Z's answer-change
interval lies above the random subspace's, by at least ``margin``; the exact McNemar
p-value compares the answer changes of z and z_perp pair by pair.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import unicodedata
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.engines import statistics as st
from layerscope.model.adapter import ModelAdapter
from layerscope.jobs.io import write_text
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.progress import track
from layerscope.data.paired_states import PairedStates
from layerscope.experiments.z_subspace.z_mask import ZMask

log = logging.getLogger(__name__)

CONDITIONS = ("none", "z", "z_perp", "full", "random")
SUBSPACE_CONDITIONS = ("z", "z_perp", "random")
SOURCES = ("mean", "ot")
CONDITION_LABELS = {"none": "original", "z": "Z-patched", "z_perp": "Z⊥-patched", "full": "full-patched",
                    "random": "random-patched"}


# ---------------------------------------------------------------------------- sources


def ot_plan(source: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Exact EMD plan [n, m] between uniform measures on the rows of source and target (squared Euclidean cost)."""
    import ot

    a = np.full(source.shape[0], 1.0 / source.shape[0])
    b = np.full(target.shape[0], 1.0 / target.shape[0])
    xs = source.detach().cpu().to(torch.float64).numpy()
    xt = target.detach().cpu().to(torch.float64).numpy()
    cost = ot.dist(xs, xt, metric="sqeuclidean")
    return ot.emd(a, b, cost)


def transported_sources(source: torch.Tensor, plan: np.ndarray) -> torch.Tensor:
    """s_t = Σ_s π_st / b_t · source[s] for every target token t (b_t = column sums of π)."""
    p = torch.from_numpy(plan).to(source.dtype)
    return (p / p.sum(dim=0, keepdim=True)).T @ source


# ---------------------------------------------------------------------------- the patch


@dataclass
class Patch:
    """What one batch row changes: the residual entering block ``layer`` at some positions."""

    layer: int
    kind: str  # z | z_perp | full | random  (random and z use their own basis identically)
    basis: torch.Tensor | None  # [k, d] orthonormal rows (None for full)
    positions: np.ndarray  # absolute positions patched with per-position sources
    sources: torch.Tensor  # [len(positions), d]
    tail_from: int | None = None  # also patch every later position (not in positions) …
    tail_source: torch.Tensor | None = None  # … with this source [d]

    def __post_init__(self):
        if self.kind not in ("z", "z_perp", "full", "random"):
            raise ValueError(f"unknown patch kind {self.kind!r}")
        if self.kind != "full" and self.basis is None:
            raise ValueError(f"a {self.kind} patch needs a basis")
        if len(self.positions) != self.sources.shape[0]:
            raise ValueError("one source row per patched position")


def patch_states(h: torch.Tensor, s: torch.Tensor, kind: str, basis: torch.Tensor | None) -> torch.Tensor:
    """h + P(s − h) for the patch kind (see module docstring); rows of h and s are positions."""
    if kind == "full":
        return s.to(h.dtype).expand_as(h).clone()
    work = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    hh = h.to(work)
    diff = s.to(device=h.device, dtype=work) - hh
    v = basis.to(device=h.device, dtype=work)
    inside = (diff @ v.T) @ v
    step = inside if kind in ("z", "random") else diff - inside
    return (hh + step).to(h.dtype)


class PatchHooks:
    """Forward pre-hooks that apply one patch per batch row (None = unpatched row) while active.

    Positions are counted from the first call after entering: a full-sequence forward, or a
    generation (the prefill, then one position per step through the key/value cache).
    """

    def __init__(self, adapter: ModelAdapter, patches: Sequence[Patch | None]):
        self.adapter = adapter
        self.patches = list(patches)
        self.by_layer: dict[int, list[tuple[int, Patch]]] = {}
        for row, patch in enumerate(self.patches):
            if patch is not None:
                if not 0 <= patch.layer < adapter.n_layers:
                    raise LayerscopeError(f"patch layer {patch.layer} outside 0…{adapter.n_layers - 1}")
                self.by_layer.setdefault(patch.layer, []).append((row, patch))
        self.seen: dict[int, int] = {}
        self.handles = []

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            if args:
                hidden = args[0]
            else:
                hidden = kwargs["hidden_states"]
            if hidden.shape[0] != len(self.patches):
                raise LayerscopeError(f"patch hooks expect a batch of {len(self.patches)} rows, got {hidden.shape[0]}")
            start = self.seen.get(layer, 0)
            n = hidden.shape[1]
            self.seen[layer] = start + n
            hidden = hidden.clone()
            for row, patch in self.by_layer[layer]:
                pos = patch.positions
                sel = np.nonzero((pos >= start) & (pos < start + n))[0]
                if len(sel):
                    local = torch.as_tensor(pos[sel] - start, device=hidden.device)
                    src = patch.sources[torch.as_tensor(sel)]
                    hidden[row, local] = patch_states(hidden[row, local], src, patch.kind, patch.basis)
                if patch.tail_from is not None:
                    taken = set(pos.tolist())
                    tail = [p - start for p in range(max(start, patch.tail_from), start + n) if p not in taken]
                    if tail:
                        local = torch.as_tensor(tail, device=hidden.device)
                        src = patch.tail_source.reshape(1, -1).expand(len(tail), -1)
                        hidden[row, local] = patch_states(hidden[row, local], src, patch.kind, patch.basis)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def __enter__(self) -> "PatchHooks":
        self.seen = {}
        for layer in self.by_layer:
            block = self.adapter.blocks[layer]
            self.handles.append(block.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@torch.no_grad()
def patched_logits(adapter: ModelAdapter, input_ids: torch.Tensor, patches: Sequence[Patch | None]) -> torch.Tensor:
    """Logits [B, T, V] of one forward of ``input_ids`` [B, T] with one patch per row."""
    with PatchHooks(adapter, patches):
        return adapter.model(input_ids=input_ids.to(adapter.device), use_cache=False).logits


@torch.no_grad()
def generate_patched(adapter: ModelAdapter, prompt_ids: Sequence[int], patches: Sequence[Patch | None], *,
                     max_new_tokens: int, stops: Sequence[int], pad_id: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy completions of one prompt, one per patch (None = unpatched), batched without padding."""
    from transformers import GenerationConfig

    from layerscope.model.generate import _cut

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=sorted(stops) or None)
    out: list[list[int]] = []
    for start in range(0, len(patches), batch_size):
        chunk = list(patches[start : start + batch_size])
        ids = torch.tensor([list(prompt_ids)] * len(chunk), dtype=torch.long, device=adapter.device)
        with PatchHooks(adapter, chunk):
            gen = adapter.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        for row in range(len(chunk)):
            out.append(_cut(gen[row, ids.shape[1] :].tolist(), set(stops), max_new_tokens)[0])
    return out


# ---------------------------------------------------------------------------- reading outputs

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")
_LATIN = re.compile("[A-Za-z]")


def extract_answer(text: str) -> float | None:
    """The last number in the text (NFKC-normalised, thousands separators removed), or None."""
    normal = unicodedata.normalize("NFKC", text)
    found = _NUMBER.findall(normal)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def cjk_fraction(text: str) -> float:
    """CJK ideographs / (CJK ideographs + Latin letters); NaN when the text has neither."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return cjk / (cjk + latin) if cjk + latin else float("nan")


def language(text: str, threshold: float = 0.2) -> str:
    frac = cjk_fraction(text)
    if math.isnan(frac):
        return "none"
    if frac <= threshold:
        return "en"
    if frac >= 1 - threshold:
        return "zh"
    return "mixed"


def same_answer(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """difflib ratio of two token-id sequences (1 = identical)."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).ratio()


# ---------------------------------------------------------------------------- rates and verdict


def mcnemar_p(changed_a: Sequence[bool], changed_b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value (binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    only_a = sum(bool(x) and not bool(y) for x, y in zip(changed_a, changed_b))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(changed_a, changed_b))
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0


_EPS = 1e-9  # rates are fractions of the pair count: 0.3 − 0.1 must count as 0.2
INSUFFICIENT = "insufficient data"
VERDICTS = ("double_dissociation", "partial", "null", INSUFFICIENT)


def verdict_point(rates: dict, *, threshold: float = 0.5, margin: float = 0.2) -> str:
    """double_dissociation / partial / null from the point rates alone (no interval)."""
    if (rates["z_answer_change"] >= threshold - _EPS and rates["z_language_preservation"] >= threshold - _EPS
            and rates["z_perp_language_disruption"] >= threshold - _EPS
            and rates["z_perp_answer_change"] < threshold - _EPS):
        return "double_dissociation"
    if rates["z_answer_change"] - rates["z_perp_answer_change"] >= margin - _EPS:
        return "partial"
    return "null"


def separated(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two intervals [lo, hi] do not overlap."""
    return a[0] > b[1] + _EPS or b[0] > a[1] + _EPS


def verdict(rates: dict, *, threshold: float = 0.5, margin: float = 0.2) -> str:
    """The verdict from the rates and their intervals ``…_ci`` (see module docstring)."""
    z, zp = rates["z_answer_change_ci"], rates["z_perp_answer_change_ci"]
    if not separated(z, zp):
        return INSUFFICIENT
    if not (z[0] > zp[1] and rates["z_answer_change"] - rates["z_perp_answer_change"] >= margin - _EPS):
        return "null"
    if (z[0] >= threshold - _EPS and zp[1] < threshold - _EPS
            and rates["z_language_preservation_ci"][0] >= threshold - _EPS
            and rates["z_perp_language_disruption_ci"][0] >= threshold - _EPS):
        return "double_dissociation"
    return "partial"


def derived_rates(table: pd.DataFrame, *, threshold: float = 0.5, margin: float = 0.2,
                  boot: st.Bootstrap | None = None) -> list[dict]:
    """Rates, their intervals and the verdict per (layer, k, source) from the per-output table."""
    base = table[table["condition"] == "none"].set_index("pair")
    pairs = list(base.index)
    boot = boot or st.Bootstrap(len(pairs), unit="pair")
    out = []
    subspace_rows = table[table["condition"].isin(SUBSPACE_CONDITIONS)]

    def rate(flags: Sequence[bool]) -> tuple[float, list[float]]:
        hits = int(sum(bool(f) for f in flags))
        return hits / len(flags), st.binomial_interval(hits, len(flags))

    for (layer, k, source), group in subspace_rows.groupby(["layer", "k", "source"], sort=False):
        full = table[(table["condition"] == "full") & (table["layer"] == layer) & (table["source"] == source)]
        by = {c: group[group["condition"] == c].set_index("pair") for c in SUBSPACE_CONDITIONS}
        by["full"] = full.set_index("pair")
        rates: dict = {"layer": int(layer), "k": int(k), "source": source, "n_pairs": len(pairs)}
        changed, lang_changed = {}, {}
        for cond, frame in by.items():
            changed[cond] = [not same_answer(_num(frame.at[p, "extracted"]), _num(base.at[p, "extracted"])) for p in pairs]
            lang_changed[cond] = [frame.at[p, "language"] != base.at[p, "language"] for p in pairs]
            for key, flags in (("answer_change", changed[cond]), ("language_change", lang_changed[cond]),
                               ("accuracy", list(frame.loc[pairs, "correct"]))):
                rates[f"{cond}_{key}"], rates[f"{cond}_{key}_ci"] = rate(flags)
        rates["z_language_preservation"], rates["z_language_preservation_ci"] = rate(
            [not c for c in lang_changed["z"]])
        rates["z_perp_language_disruption"], rates["z_perp_language_disruption_ci"] = rate(lang_changed["z_perp"])
        sims = {c: np.array([similarity(by["full"].at[p, "token_ids"], by[c].at[p, "token_ids"]) for p in pairs])
                for c in ("z", "z_perp")}
        for c in ("z", "z_perp"):
            rates[f"full_resemblance_{c}"], rates[f"full_resemblance_{c}_ci"] = boot.interval(sims[c])
        diff, diff_ci = boot.interval(sims["z"] - sims["z_perp"])
        rates["full_resemblance_z_minus_z_perp"], rates["full_resemblance_z_minus_z_perp_ci"] = diff, diff_ci
        if np.all(sims["z"] == sims["z_perp"]):
            rates["full_resembles"] = "tie"
        elif diff_ci[0] > 0:
            rates["full_resembles"] = "z"
        elif diff_ci[1] < 0:
            rates["full_resembles"] = "z_perp"
        else:
            rates["full_resembles"] = INSUFFICIENT
        rates["answer_change_p_value"] = mcnemar_p(changed["z"], changed["z_perp"])
        rates["verdict"] = verdict(rates, threshold=threshold, margin=margin)
        rates["verdict_point"] = verdict_point(rates, threshold=threshold, margin=margin)
        rates["z_specific"] = bool(rates["z_answer_change_ci"][0] > rates["random_answer_change_ci"][1] + _EPS
                                   and rates["z_answer_change"] - rates["random_answer_change"] >= margin - _EPS)
        out.append(rates)
    return out


def _num(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ---------------------------------------------------------------------------- the experiment


@dataclass
class PatchingResult:
    table: pd.DataFrame  # one row per (pair, condition, layer, k, source)
    metrics: pd.DataFrame
    summary: dict
    markdown: str


def pair_random_basis(d: int, k: int, *, seed: int, layer: int, pair: str) -> torch.Tensor:
    """The random condition's basis for one pair: a Haar-random k × d orthonormal basis seeded by (seed, layer, k, pair)."""
    key = np.random.SeedSequence([int(seed) % 2**32, int(layer), int(k), zlib.crc32(str(pair).encode())])
    q = st.random_subspaces(d, k, 1, seed=int(key.generate_state(1)[0]))[0]
    return torch.from_numpy(np.ascontiguousarray(q.T)).to(torch.float32)


def pair_patches(zh_states: torch.Tensor, en_states: torch.Tensor, en_positions: np.ndarray, mask: ZMask, layer: int,
                 sources: Sequence[str], *, positions: str = "prompt",
                 randoms: dict[int, torch.Tensor] | None = None) -> list[tuple[str, int, int | None, str, Patch]]:
    """(condition, layer, k, source, patch) of every patched condition of one pair at one layer.

    ``randoms`` maps k to the random condition's basis (default: the mask's own random basis).
    """
    mean = zh_states.mean(dim=0)
    per_source = {}
    for source in sources:
        if source == "mean":
            per_source[source] = mean.reshape(1, -1).expand(len(en_positions), -1).clone()
        elif source == "ot":
            per_source[source] = transported_sources(zh_states, ot_plan(zh_states, en_states))
        else:
            raise LayerscopeError(f"unknown patching source {source!r}; use {list(SOURCES)}")
    tail_from = int(en_positions.min()) if positions == "all" else None
    if positions not in ("prompt", "all"):
        raise LayerscopeError(f"z_patching.positions must be 'prompt' or 'all', got {positions!r}")
    tail = mean.to(torch.float32) if tail_from is not None else None
    out = []
    for source in sources:
        src = per_source[source].to(torch.float32)
        out.append(("full", layer, None, source, Patch(layer, "full", None, en_positions, src, tail_from, tail)))
    for k in mask.ks:
        z = mask.basis(layer, k)
        rand = randoms[k] if randoms is not None else mask.random(layer, k)
        for source in sources:
            src = per_source[source].to(torch.float32)
            out.append(("z", layer, k, source, Patch(layer, "z", z, en_positions, src, tail_from, tail)))
            out.append(("z_perp", layer, k, source, Patch(layer, "z_perp", z, en_positions, src, tail_from, tail)))
            out.append(("random", layer, k, source, Patch(layer, "random", rand, en_positions, src, tail_from, tail)))
    return out


def _cell(text: str, extracted, lang: str, width: int = 600) -> str:
    flat = " ".join(text.split())
    short = flat if len(flat) <= width else flat[: width - 1] + "…"
    ans = "–" if extracted is None or (isinstance(extracted, float) and math.isnan(extracted)) else f"{extracted:g}"
    return f"**{ans}** · {lang} · {short}".replace("|", "\\|")


def markdown_table(table: pd.DataFrame, rates: list[dict], summary: dict) -> str:
    lines = [f"# Z patching — {summary['model']} on {summary['prompt_set']}", "",
             f"{summary['n_pairs']} pairs; English prompt, patched at resid.layer with the Chinese version's states "
             f"({summary['positions_patched']}); greedy, ≤ {summary['max_new_tokens']} new tokens. "
             "Each cell: **extracted answer** · language (CJK fraction) · output.", ""]
    base = table[table["condition"] == "none"].set_index("pair")
    for r in rates:
        rate = lambda key: f"{r[key]:.2f} [{r[key + '_ci'][0]:.2f}, {r[key + '_ci'][1]:.2f}]"  # noqa: E731
        lines += [f"## layer {r['layer']}, k = {r['k']}, {r['source']} source — verdict: {r['verdict']}", "",
                  f"answer change (95 % exact interval over pairs): Z {rate('z_answer_change')}, Z⊥ "
                  f"{rate('z_perp_answer_change')}, random {rate('random_answer_change')}, full "
                  f"{rate('full_answer_change')}; Z language preservation {rate('z_language_preservation')}, Z⊥ "
                  f"language disruption {rate('z_perp_language_disruption')}; full resembles {r['full_resembles']} "
                  f"(on point values alone: {r['verdict_point']}).", ""]
        header = ["problem", "answer", "original (en)", "Z-patched (en←zh)", "Z⊥-patched (en←zh)", "full-patched",
                  "random-patched"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        sel = table[(table["layer"] == r["layer"]) & (table["source"] == r["source"])]
        for pair in base.index:
            cells = [pair, f"{base.at[pair, 'answer']}", _cell(base.at[pair, "text"], base.at[pair, "extracted"],
                                                              base.at[pair, "language"])]
            for cond in ("z", "z_perp", "full", "random"):
                rows = sel[(sel["condition"] == cond) & (sel["pair"] == pair)]
                if cond != "full":
                    rows = rows[rows["k"] == r["k"]]
                row = rows.iloc[0]
                cells.append(_cell(row["text"], row["extracted"], row["language"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def z_patching(adapter: ModelAdapter, tokenizer, states: PairedStates, mask: ZMask, *, model: str, prompt_set: str,
               sources: Sequence[str] = SOURCES, max_new_tokens: int = 100, positions: str = "prompt",
               batch_size: int = 32, lang_threshold: float = 0.2, threshold: float = 0.5,
               margin: float = 0.2, seed: int = 0) -> PatchingResult:
    from layerscope.model.generate import stop_token_ids

    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    mask.check_fits(adapter.n_layers, adapter.facts.d_model, "the model")
    if not sources:
        raise LayerscopeError("z_patching.sources is empty; use any of ['mean', 'ot']")
    stops = stop_token_ids(tokenizer, adapter.config, getattr(adapter.model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    layer_states = {layer: states.layer_states(layer) for layer in mask.layers}
    rows, baseline_matches = [], []
    for i, pair in enumerate(track(states.pairs, "z_patching", unit="pairs")):
        prompt_ids = states.prompt_ids(pair.en.id)
        en_positions = states.positions(pair.en.id)
        conditions: list[tuple[str, int | None, int | None, str | None, Patch | None]] = [("none", None, None, None, None)]
        for layer in mask.layers:
            zh_states = layer_states[layer][pair.zh.id]
            en_states = layer_states[layer][pair.en.id]
            randoms = {k: pair_random_basis(mask.d_model, k, seed=seed, layer=layer, pair=pair.pair) for k in mask.ks}
            conditions += pair_patches(zh_states, en_states, en_positions, mask, layer, sources, positions=positions,
                                       randoms=randoms)
        outputs = generate_patched(adapter, prompt_ids, [c[4] for c in conditions], max_new_tokens=max_new_tokens,
                                   stops=stops, pad_id=pad_id, batch_size=batch_size)
        cached = states.cached_completion(pair.en.id)
        common = min(len(cached), len(outputs[0]))
        baseline_matches.append(cached[:common] == outputs[0][:common])
        for (cond, layer, k, source, _), ids in zip(conditions, outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            extracted = extract_answer(text)
            rows.append({
                "pair": pair.pair, "category": pair.category, "answer": str(pair.answer), "prompt_id": pair.en.id,
                "condition": cond, "layer": layer, "k": k, "source": source, "text": text, "token_ids": ids,
                "n_tokens": len(ids), "extracted": extracted, "cjk_fraction": cjk_fraction(text),
                "language": language(text, lang_threshold),
                "correct": extracted is not None and same_answer(extracted, float(pair.answer)),
            })
        log.info("pair %d/%d (%s): %d conditions generated", i + 1, states.n_pairs, pair.pair, len(conditions))
    table = pd.DataFrame(rows).astype({"layer": "Int64", "k": "Int64"})
    boot = st.Bootstrap(states.n_pairs, unit="pair", seed=seed)
    rates = derived_rates(table, threshold=threshold, margin=margin, boot=boot)

    records = []
    for r in rates:
        for key, value in r.items():
            if key in ("layer", "k", "source", "verdict", "verdict_point", "full_resembles", "n_pairs") or \
                    key.endswith("_ci"):
                continue
            lo, hi = r.get(f"{key}_ci", (np.nan, np.nan))
            records.append((r["layer"], r["k"], r["source"], key, float(value), lo, hi))
    metrics = pd.DataFrame(records, columns=["layer", "k", "source", "metric", "value", "ci_lo", "ci_hi"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)

    base = table[table["condition"] == "none"]
    n = len(base)
    pick = lambda key: [r[key] for r in rates]  # noqa: E731
    verdicts = pick("verdict")
    labels = [f"L{r['layer']}/k{r['k']}/{r['source']}" for r in rates]
    unsure = [lab for lab, v in zip(labels, verdicts) if v == INSUFFICIENT]
    if unsure:
        boot.flag(f"verdict: the answer-change intervals of Z and Z⊥ overlap for {len(unsure)} of {len(labels)} "
                  f"combos ({n} pairs): insufficient data")
    baseline = {
        "baseline_accuracy": int(base["correct"].sum()),
        "baseline_english_rate": int((base["language"] == "en").sum()),
        "baseline_matches_cached_completion": int(sum(baseline_matches)),
    }
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        **states.sample,
        "max_new_tokens": max_new_tokens,
        "positions_patched": ("problem-text tokens of the English prompt" if positions == "prompt" else
                              "problem-text tokens, then every later position (mean source)"),
        "sources": list(sources),
        "layers": mask.layers,
        "k": mask.ks,
        **{key: hits / n for key, hits in baseline.items()},
        **{f"{key}_ci": st.binomial_interval(hits, n) for key, hits in baseline.items()},
        "n_double_dissociation": verdicts.count("double_dissociation"),
        "n_partial": verdicts.count("partial"),
        "n_null": verdicts.count("null"),
        "n_insufficient_data": verdicts.count(INSUFFICIENT),
        "combos": labels,
        "verdict": verdicts,
        "verdict_point": pick("verdict_point"),
    }
    for key in ("z_answer_change", "z_perp_answer_change", "random_answer_change", "full_answer_change",
                "z_language_preservation", "z_perp_language_disruption"):
        summary[key] = pick(key)
        summary[f"{key}_ci"] = pick(f"{key}_ci")
    summary.update({
        "answer_change_p_value": pick("answer_change_p_value"),
        "z_specific": pick("z_specific"),
        "full_resembles": pick("full_resembles"),
        "thresholds": {"verdict_threshold": threshold, "margin": margin, "lang_threshold": lang_threshold},
        **boot.summary(),
        "by_combo": rates,
    })
    summary["uncertainty"]["method"] = ("exact binomial (Clopper-Pearson) intervals of rates over pairs; percentile "
                                        "bootstrap over pairs for mean similarities")
    if summary["baseline_matches_cached_completion"] < 1:
        log.warning("the unpatched generation differs from the cached completion for %d of %d pairs (batched "
                    "arithmetic can flip near-ties)", len(baseline_matches) - sum(baseline_matches), len(baseline_matches))
    return PatchingResult(table, metrics, summary, markdown_table(table, rates, summary))


def plot_rates(result: PatchingResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    rates = s["by_combo"]
    labels = s["combos"]
    x = np.arange(len(rates))
    width = 0.2
    conds = ("z", "z_perp", "random", "full")
    with figure(2, 1, width=max(7.0, 0.9 * len(rates) + 3), height=6.0) as (fig, axes):
        for ax, kind, title in ((axes[0], "answer_change", "answer changed vs the unpatched output"),
                                (axes[1], "language_change", "output language changed vs the unpatched output")):
            for i, cond in enumerate(conds):
                values = np.array([r[f"{cond}_{kind}"] for r in rates])
                cis = np.array([r[f"{cond}_{kind}_ci"] for r in rates], dtype=float).reshape(-1, 2)
                err = np.vstack([values - cis[:, 0], cis[:, 1] - values]).clip(min=0)
                ax.bar(x + (i - 1.5) * width, values, width, color=PALETTE[i], label=CONDITION_LABELS[cond],
                       yerr=err, capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("fraction of pairs")
            ax.set_title(title)
            ax.set_xticks(x, [f"{lab}\n{r['verdict']}" for lab, r in zip(labels, rates)], fontsize=7)
        axes[0].legend(loc="upper right", ncol=4)
        fig.suptitle(f"Z patching en←zh — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs, error bars: exact "
                     f"95 % intervals; baseline accuracy {s['baseline_accuracy']:.2f})")
        save(fig, path)


def _write_markdown(result: PatchingResult, path: Path) -> None:
    write_text(path, result.markdown)


def run(job: Job) -> Result:
    """en←zh subspace patching of greedy generation at the Z-mask layers (GPU), in the model's configured dtype."""
    from layerscope.model.adapter import load_model, load_tokenizer

    params = job.params
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"), max_pairs=params["max_pairs"],
                               seed=params["seed"])
    adapter = load_model(job.input("model"), dtype=job.render["dtype"], device=job.device, kind="decoder")
    tokenizer = load_tokenizer(job.input("model"))
    result = z_patching(adapter, tokenizer, states, ZMask.load(job.input("mask")), model=job.model,
                        prompt_set=job.prompt_set, sources=params["sources"],
                        max_new_tokens=params["max_new_tokens"], positions=params["positions"],
                        batch_size=params["batch_size"], lang_threshold=params["lang_threshold"],
                        threshold=params["threshold"], margin=params["margin"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "outputs": result.table},
        figures={"rates": partial(plot_rates, result)},
        files={"table.md": partial(_write_markdown, result)},
    )


EXPERIMENT = Experiment(
    name="z_patching",
    dashboard=('z_answer_change', 'z_perp_answer_change', 'n_insufficient_data'),
    headlines=("z_answer_change", "z_perp_answer_change"),
    family="z_subspace",
    description="en←zh subspace patching during generation",
    description_long="z_subspace: generate from each pair's English prompt with its Z / Z-perp / full / random-"
                     "subspace content replaced by the Chinese version's (mean-broadcast and OT-aligned sources); "
                     "answer change, language preservation/disruption with exact intervals, verdict.",
    needs="decoder",
    data="paired",
    gpu=True,
    inputs=("model", "mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics", "outputs"),
    figures=(Figure("rates", "answer and language changes"),),
    files=("table.md",),
    params={
        "max_pairs": {
            "description": "Patch a seeded sample of N pairs, stratified by category (null: all pairs).",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": None,
        },
        "max_new_tokens": {
            "description": "Greedy tokens generated per condition.",
            "type": "integer",
            "minimum": 1,
            "maximum": 1024,
            "default": 100,
        },
        "sources": {
            "description": "mean: the Chinese problem's mean state broadcast to every patched position; ot: "
                           "per English token, the optimal-transport (exact EMD) barycentre of the Chinese "
                           "token states.",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {
                "enum": ["mean", "ot"],
            },
            "default": ["mean", "ot"],
        },
        "positions": {
            "description": "prompt: patch the English problem-text tokens; all: also every later position "
                           "(closing template and each generated token) with the mean source.",
            "enum": ["prompt", "all"],
            "default": "prompt",
        },
        "batch_size": {
            "description": "Conditions generated at once (memory, not results).",
            "type": "integer",
            "minimum": 1,
            "default": 32,
        },
        "lang_threshold": {
            "description": "Output language by CJK fraction f among letters: en if f <= t, zh if f >= 1 - t, "
                           "else mixed.",
            "type": "number",
            "minimum": 0,
            "maximum": 0.5,
            "default": 0.2,
        },
        "threshold": {
            "description": "Rate at which a patch counts as changing answers / preserving or disrupting "
                           "language (double dissociation; tested against the rates' intervals).",
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.5,
        },
        "margin": {
            "description": "How much more often Z must change answers than Z-perp for a partial verdict (and "
                           "than the random subspace for z_specific).",
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.2,
        },
    },
    threads=4,
    runtime=120,
    section="z_subspace",
    render=True,
)
