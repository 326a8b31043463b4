"""Shuffle recovery: put a randomly permuted stack of blocks back in order.

The blocks are shuffled with a seeded permutation π: slot s of the shuffled model holds
original block π[s]. Every recovery method sees only a :class:`ShuffledModel` — weights,
a block runner and a completion-loss oracle addressed by slot, never π — and returns an
order of slots. The recovered model runs original blocks π[order[0]], π[order[1]], …; it is
scored by exact-position accuracy (fraction of positions t holding block t), Kendall τ
between position and true depth (``scipy.stats.kendalltau``), its completion loss as a
ratio to the original model's, and the method's wall time and number of loss evaluations.

Weights-only methods (no prompts):

* ``weight_stats`` — per block a table of weight statistics (log Frobenius norm of each
  projection q k v o gate up down, mean and standard deviation of each norm's scale γ),
  standardised over blocks; blocks sorted by their first principal-component score.
* ``activation_flow`` — random token ids through the embedding, then greedily: of the
  remaining blocks, apply the one whose update is smallest relative to the current state
  (‖f(h) − h‖ / ‖h‖, over all tokens), and carry its output forward.
* ``tsp_2opt`` — the layer distance matrix (Euclidean distance between the standardised
  weight statistics); the shortest open path by nearest-neighbour chains from every start,
  improved by 2-opt moves until none shortens it.
* ``spectral`` — the same distances as a Gaussian affinity (σ = median distance); blocks
  sorted by the Fiedler vector of its unnormalised graph Laplacian.

Orientation of the undirected orders (all but ``activation_flow``): the block-output
("write") projections o and down grow with depth in the decoders we checked, as the
residual stream does, so the order is reversed when log‖W_o‖ + log‖W_down‖ falls along it
(Kendall τ < 0). This is a heuristic, stated as such.

Data-driven refiners, on the mean completion-token loss through the
:class:`~layerscope.engines.surgery.LossEvaluator` (never starting from the activation cache, whose
prefixes are in the true order; the refiners share prefixes among their candidates and keep
the states of their current order in a :class:`~layerscope.engines.surgery.PrefixMemo`):

* ``reinsert`` — remove one block and re-insert it at the best position within
  ``reinsert_window`` of its current one (all positions if null); accept improvements; repeat
  over every block until a pass changes nothing or the evaluation budget is spent;
* ``bubble`` — swap adjacent blocks where that lowers the loss, pass after pass;
* ``anneal`` — simulated annealing over adjacent swaps and windowed re-insertions, Metropolis
  acceptance on the relative loss change with a geometric temperature schedule, seeded;
  returns the best order seen.

Refiners alone start from the shuffled order as given. ``pipeline`` takes the weights-only
order with the lowest loss (chosen by loss, not by the hidden truth), then ``reinsert``
and ``bubble``; its wall time includes the weights-only methods it ran.

Uncertainty: the loss is evaluated on a seeded, category-stratified sample of prompts; the
loss of the original, the shuffled and every recovered order, and each one's ratio to the
original's, get bootstrap intervals over those prompts (per-prompt loss sums, no extra
forward pass). Accuracy, Kendall τ and the best method are properties of one search per
method on one permutation: no interval is invented for them (the summary says so). A
recovered order is chosen by the loss on the same prompts it is scored on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.model.adapter import BlockInputs
from layerscope.engines.statistics import N_BOOT, Bootstrap
from layerscope.engines.surgery import SURGERY_PARAMS, LossEvaluator, PrefixMemo, move, surgery_evaluator
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.experiments.surgery.common import MAX_PROMPTS_PARAM, interval, prompt_sums, sample_fragment
from layerscope.progress import Progress, progress

log = logging.getLogger(__name__)

WEIGHT_METHODS = ("weight_stats", "activation_flow", "tsp_2opt", "spectral")
REFINERS = ("reinsert", "bubble", "anneal")
METHODS = WEIGHT_METHODS + REFINERS + ("pipeline",)
FAMILY = {**{m: "weights" for m in WEIGHT_METHODS}, **{m: "loss" for m in REFINERS}, "pipeline": "combined",
          "none": "reference"}


@dataclass
class ShuffleParams:
    methods: Sequence[str] = METHODS
    refine_max_evals: int = 200
    reinsert_window: int | None = 3
    anneal_steps: int = 200
    anneal_t_start: float = 0.05
    anneal_t_end: float = 0.0005
    pipeline_max_evals: int = 300
    probe_sequences: int = 4
    probe_length: int = 32
    memo_states: int = 64
    seed: int = 0


class ShuffledModel:
    """The shuffled model as recovery methods see it: blocks addressed by slot, π hidden."""

    def __init__(self, evaluator: LossEvaluator, permutation: Sequence[int], memo_states: int = 64):
        permutation = [int(x) for x in permutation]
        if sorted(permutation) != list(range(evaluator.n_layers)):
            raise LayerscopeError(f"not a permutation of the {evaluator.n_layers} blocks: {permutation}")
        self._perm = permutation
        self._evaluator = evaluator
        self._adapter = evaluator.adapter
        self.n = len(permutation)
        self.memo_states = memo_states
        self.evaluations = 0

    # weights
    def projections(self, slot: int) -> dict[str, torch.Tensor]:
        return self._adapter.projections(self._perm[slot])

    def norm_scales(self, slot: int) -> dict[str, torch.Tensor]:
        return {role: self._adapter.norm_scale(m) for role, m in self._adapter.block_norms(self._perm[slot]).items()}

    # activations from weights only
    def random_inputs(self, n_sequences: int, length: int, seed: int) -> BlockInputs:
        generator = torch.Generator().manual_seed(int(seed))
        ids = torch.randint(0, self._adapter.facts.vocab_size, (n_sequences, length), generator=generator)
        device = self._evaluator.device
        return self._adapter.capture_block_inputs(ids.to(device), torch.ones_like(ids).to(device))

    def run_block(self, slot: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        return self._adapter.run_block(self._perm[slot], hidden, inputs)

    # the loss oracle
    def new_memo(self) -> PrefixMemo:
        return PrefixMemo(self.memo_states)

    def losses(self, orders: Sequence[Sequence[int]], memo: PrefixMemo | None = None) -> list[float]:
        self.evaluations += len(orders)
        return self._evaluator.losses([[self._perm[s] for s in order] for order in orders], use_cache=False, memo=memo)


# ---------------------------------------------------------------------------- weights-only methods


def weight_statistics(model: ShuffledModel) -> tuple[list[str], np.ndarray]:
    """Per slot: log Frobenius norm of each projection, mean and std of each norm scale; standardised."""
    names, rows = None, []
    for slot in range(model.n):
        feats = {}
        for t, w in sorted(model.projections(slot).items()):
            feats[f"log_norm_{t}"] = float(torch.log(w.double().norm()))
        for role, g in sorted(model.norm_scales(slot).items()):
            feats[f"gamma_mean_{role}"] = float(g.double().mean())
            feats[f"gamma_std_{role}"] = float(g.double().std()) if g.numel() > 1 else 0.0
        names = names or list(feats)
        rows.append([feats[k] for k in names])
    table = np.array(rows)
    std = table.std(axis=0)
    keep = std > 1e-12
    if not keep.any():
        return names, np.zeros((model.n, 1))
    return [n for n, k in zip(names, keep) if k], (table[:, keep] - table[:, keep].mean(axis=0)) / std[keep]


def write_scale(model: ShuffledModel) -> np.ndarray:
    """log‖W_o‖ + log‖W_down‖ per slot (the orientation signal)."""
    out = []
    for slot in range(model.n):
        p = model.projections(slot)
        out.append(sum(float(torch.log(p[t].double().norm())) for t in ("o", "down") if t in p))
    return np.array(out)


def orient(model: ShuffledModel, order: Sequence[int]) -> list[int]:
    """Reverse ``order`` if the write scale falls along it (see module docstring)."""
    from scipy.stats import kendalltau

    order = [int(s) for s in order]
    if len(order) < 2:
        return order
    tau = kendalltau(np.arange(len(order)), write_scale(model)[order]).statistic
    return order[::-1] if np.isfinite(tau) and tau < 0 else order


def order_weight_stats(model: ShuffledModel, stats: np.ndarray) -> list[int]:
    u, _, _ = np.linalg.svd(stats, full_matrices=False)
    return orient(model, np.argsort(u[:, 0], kind="stable"))


def order_activation_flow(model: ShuffledModel, params: ShuffleParams) -> list[int]:
    inputs = model.random_inputs(params.probe_sequences, params.probe_length, params.seed)
    hidden = inputs.resid0
    remaining, order = list(range(model.n)), []
    with torch.no_grad():
        while remaining:
            best = None
            for slot in remaining:
                out = model.run_block(slot, hidden, inputs)
                change = float((out - hidden).double().norm() / hidden.double().norm())
                if best is None or change < best[0]:
                    best = (change, slot, out)
            order.append(best[1])
            remaining.remove(best[1])
            hidden = best[2]
    return order


def layer_distances(stats: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import pdist, squareform

    return squareform(pdist(stats, metric="euclidean"))


def _path_length(path: Sequence[int], distance: np.ndarray) -> float:
    return float(sum(distance[a, b] for a, b in zip(path, path[1:])))


def shortest_path(distance: np.ndarray) -> list[int]:
    """Open TSP path: nearest-neighbour chains from every start, the shortest improved by 2-opt."""
    n = len(distance)
    best = None
    for start in range(n):
        path, left = [start], set(range(n)) - {start}
        while left:
            nxt = min(left, key=lambda j: (distance[path[-1], j], j))
            path.append(nxt)
            left.remove(nxt)
        length = _path_length(path, distance)
        if best is None or length < best[0] - 1e-12:
            best = (length, path)
    length, path = best
    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                candidate = path[:i] + path[i : j + 1][::-1] + path[j + 1 :]
                new = _path_length(candidate, distance)
                if new < length - 1e-12:
                    path, length, improved = candidate, new, True
    return path


def fiedler_order(distance: np.ndarray) -> list[int]:
    from scipy.sparse.csgraph import laplacian

    n = len(distance)
    if n < 3:
        return list(range(n))
    sigma = float(np.median(distance[np.triu_indices(n, 1)])) or 1.0
    affinity = np.exp(-((distance / sigma) ** 2))
    np.fill_diagonal(affinity, 0.0)
    _, vectors = np.linalg.eigh(laplacian(affinity, normed=False))
    return np.argsort(vectors[:, 1], kind="stable").tolist()


# ---------------------------------------------------------------------------- data-driven refiners


@dataclass
class _Search:
    """A loss-driven search over orders with a budget of evaluations."""

    model: ShuffledModel
    max_evals: int
    memo: PrefixMemo = None
    evals: int = 0
    trace: list[float] = field(default_factory=list)
    progress: Progress | None = None  # counts evaluations against max_evals

    def __post_init__(self):
        self.memo = self.model.new_memo()

    @property
    def left(self) -> int:
        return self.max_evals - self.evals

    def losses(self, orders: list[list[int]]) -> list[float]:
        orders = orders[: max(0, self.left)]
        if not orders:
            return []
        self.evals += len(orders)
        values = self.model.losses(orders, memo=self.memo)
        if self.progress:
            self.progress.update(len(orders))
        return values

    def accept(self, order: list[int], value: float) -> None:
        self.memo.pin(order)
        self.trace.append(value)


def _better(new: float, old: float) -> bool:
    return new < old - 1e-9 * max(1.0, abs(old))


def refine_reinsert(search: _Search, order: list[int], value: float, window: int | None) -> tuple[list[int], float]:
    n = len(order)
    improved = True
    while improved and search.left > 0:
        improved = False
        for block in list(order):
            p = order.index(block)
            lo, hi = (0, n - 1) if window is None else (max(0, p - window), min(n - 1, p + window))
            candidates = [move(order, p, q) for q in range(lo, hi + 1) if q != p]
            values = search.losses(candidates)
            if not values:
                break
            k = int(np.argmin(values))
            if _better(values[k], value):
                order, value, improved = candidates[k], values[k], True
                search.accept(order, value)
    return order, value


def refine_bubble(search: _Search, order: list[int], value: float) -> tuple[list[int], float]:
    n = len(order)
    improved = True
    while improved and search.left > 0:
        improved = False
        for p in range(n - 1):
            candidate = move(order, p, p + 1)
            values = search.losses([candidate])
            if not values:
                break
            if _better(values[0], value):
                order, value, improved = candidate, values[0], True
                search.accept(order, value)
    return order, value


def refine_anneal(search: _Search, order: list[int], value: float, *, steps: int, t_start: float, t_end: float,
                  window: int | None, seed: int) -> tuple[list[int], float]:
    rng = np.random.default_rng(seed)
    n = len(order)
    best = (value, order)
    steps = min(steps, search.left)
    w = n - 1 if window is None else max(1, window)
    for step in range(steps):
        temperature = t_start * (t_end / t_start) ** (step / max(1, steps - 1))
        p = int(rng.integers(n))
        if rng.random() < 0.5:  # adjacent swap
            q = p + 1 if p < n - 1 else p - 1
        else:  # windowed re-insertion
            q = int(np.clip(p + rng.integers(-w, w + 1), 0, n - 1))
            if q == p:
                q = p + 1 if p < n - 1 else p - 1
        candidate = move(order, p, q)
        values = search.losses([candidate])
        if not values:
            break
        change = (values[0] - value) / max(abs(value), 1e-12)
        if change < 0 or rng.random() < math.exp(-change / temperature):
            order, value = candidate, values[0]
            search.accept(order, value)
            if _better(value, best[0]):
                best = (value, order)
    return best[1], best[0]


# ---------------------------------------------------------------------------- running the methods


@dataclass
class MethodResult:
    method: str
    order: list[int]  # slots
    seconds: float
    evaluations: int


def recover(model: ShuffledModel, params: ShuffleParams) -> list[MethodResult]:
    """Run the requested methods on the shuffled model (wall time and evaluations each)."""
    unknown = [m for m in params.methods if m not in METHODS]
    if unknown:
        raise LayerscopeError(f"unknown shuffle method(s) {unknown}; choose from {list(METHODS)}")
    results: dict[str, MethodResult] = {}
    stats_cache: dict[str, tuple[np.ndarray, float]] = {}

    def timed(name: str, fn: Callable[[], list[int]], evals: Callable[[], int] = lambda: 0) -> MethodResult:
        started = time.perf_counter()
        order = [int(s) for s in fn()]
        results[name] = MethodResult(name, order, time.perf_counter() - started, evals())
        log.info("shuffle %s: %.1fs, %d evaluations", name, results[name].seconds, results[name].evaluations)
        return results[name]

    def stats() -> np.ndarray:
        if "stats" not in stats_cache:
            started = time.perf_counter()
            table = weight_statistics(model)[1]
            stats_cache["stats"] = (table, time.perf_counter() - started)
        return stats_cache["stats"][0]

    weight_fns = {
        "weight_stats": lambda: order_weight_stats(model, stats()),
        "activation_flow": lambda: order_activation_flow(model, params),
        "tsp_2opt": lambda: orient(model, shortest_path(layer_distances(stats()))),
        "spectral": lambda: orient(model, fiedler_order(layer_distances(stats()))),
    }
    wanted = list(params.methods)
    needed = set(wanted) | (set(WEIGHT_METHODS) if "pipeline" in wanted else set())
    for name in WEIGHT_METHODS:
        if name in needed:
            stats_cache.pop("stats", None)  # each method pays for the statistics it uses
            timed(name, weight_fns[name])

    start = list(range(model.n))
    for name in REFINERS:
        if name not in wanted:
            continue
        search = _Search(model, params.refine_max_evals)

        def run(name=name, search=search):
            value = search.losses([start])[0]
            search.accept(start, value)
            if name == "reinsert":
                return refine_reinsert(search, start, value, params.reinsert_window)[0]
            if name == "bubble":
                return refine_bubble(search, start, value)[0]
            return refine_anneal(search, start, value, steps=params.anneal_steps, t_start=params.anneal_t_start,
                                 t_end=params.anneal_t_end, window=params.reinsert_window, seed=params.seed)[0]

        with progress(f"shuffle: {name}", search.max_evals, unit="evaluations") as search.progress:
            timed(name, run, lambda search=search: search.evals)

    if "pipeline" in wanted:
        search = _Search(model, params.pipeline_max_evals)

        def pipeline():
            starts = [results[m].order for m in WEIGHT_METHODS]
            values = search.losses(starts)
            k = int(np.argmin(values))
            order, value = starts[k], values[k]
            search.accept(order, value)
            order, value = refine_reinsert(search, order, value, params.reinsert_window)
            order, value = refine_bubble(search, order, value)
            return order

        with progress("shuffle: pipeline", search.max_evals, unit="evaluations") as search.progress:
            result = timed("pipeline", pipeline, lambda: search.evals)
        result.seconds += sum(results[m].seconds for m in WEIGHT_METHODS)
    return [results[m] for m in wanted]


# ---------------------------------------------------------------------------- the experiment


@dataclass
class ShuffleResult:
    metrics: pd.DataFrame  # model, prompt_set, method, family, metric, value
    orders: pd.DataFrame  # method, position, slot, block
    table: pd.DataFrame  # one row per method
    summary: dict


def score(true_sequence: Sequence[int]) -> tuple[float, float]:
    """(exact-position accuracy, Kendall τ) of a recovered sequence of original block indices."""
    from scipy.stats import kendalltau

    seq = np.asarray(true_sequence)
    n = len(seq)
    accuracy = float((seq == np.arange(n)).mean())
    tau = float(kendalltau(np.arange(n), seq).statistic) if n > 1 else 1.0
    return accuracy, tau


def random_permutation(n: int, seed: int) -> list[int]:
    """A seeded random permutation that is not the identity (for n ≥ 2)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).tolist()
    while n > 1 and perm == list(range(n)):
        perm = rng.permutation(n).tolist()
    return perm


def shuffle_experiment(evaluator: LossEvaluator, *, model: str, prompt_set: str, params: ShuffleParams,
                       permutation: Sequence[int] | None = None, permutation_seed: int | None = None,
                       n_boot: int = N_BOOT) -> ShuffleResult:
    n = evaluator.n_layers
    if n < 2:
        raise LayerscopeError("shuffle needs a model with at least 2 blocks")
    seed = params.seed if permutation_seed is None else int(permutation_seed)
    perm = list(permutation) if permutation is not None else random_permutation(n, seed)
    shuffled = ShuffledModel(evaluator, perm, params.memo_states)
    results = recover(shuffled, params)

    # scoring (outside the timed methods): per-token losses of the original and of every order, once each
    base_tokens = evaluator.losses([list(range(n))], per_token=True)[0]
    baseline = float(base_tokens.mean())
    reference = MethodResult("none", list(range(n)), 0.0, 0)
    sequences = [[perm[s] for s in r.order] for r in [reference, *results]]
    per_token = evaluator.losses(sequences, per_token=True)
    values = [float(x.mean()) for x in per_token]
    base_sums, counts = prompt_sums(evaluator, [base_tokens])
    b = base_sums[:, 0]
    sums, _ = prompt_sums(evaluator, per_token)  # [P, methods]
    boot = Bootstrap(len(counts), unit="prompt", n_boot=n_boot, seed=params.seed)
    loss_ci = interval(boot, values, sums, counts, statistic=lambda s, c: s.sum(1) / c.sum(1)[:, None])
    ratio_ci = interval(boot, np.array(values) / baseline, sums, b,
                        statistic=lambda s, b: s.sum(1) / b.sum(1)[:, None])
    rows = []
    for r, seq, value, lci, rci in zip([reference, *results], sequences, values, loss_ci, ratio_ci):
        accuracy, tau = score(seq)
        rows.append({"method": r.method, "family": FAMILY[r.method], "accuracy": accuracy, "kendall_tau": tau,
                     "loss": float(value), "loss_lo": lci[0], "loss_hi": lci[1], "loss_ratio": float(value / baseline),
                     "loss_ratio_lo": rci[0], "loss_ratio_hi": rci[1], "seconds": float(r.seconds),
                     "evaluations": int(r.evaluations)})
    table = pd.DataFrame(rows)
    orders = pd.DataFrame([(r.method, t, s, perm[s]) for r in [reference, *results] for t, s in enumerate(r.order)],
                          columns=["method", "position", "slot", "block"])
    metrics = table.melt(id_vars=["method", "family"], var_name="metric", value_name="value")
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    recovered = table[table["method"] != "none"]
    best = recovered.sort_values(["accuracy", "kendall_tau", "loss"], ascending=[False, False, True]).iloc[0]
    by = recovered.set_index("method")
    if best["accuracy"] < 1 and best["loss_ratio_lo"] <= 1:
        boot.flag(f"the loss on {len(counts)} prompts cannot tell the best recovered order ({best['method']}, "
                  f"accuracy {best['accuracy']:.2f}) from the original (loss ratio interval "
                  f"[{best['loss_ratio_lo']:.3f}, {best['loss_ratio_hi']:.3f}] reaches 1)")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        **sample_fragment(evaluator),
        "permutation_seed": seed,
        "permutation": [int(x) for x in perm],
        "baseline_loss": baseline,
        "baseline_loss_ci": interval(boot, baseline, b, counts, statistic=lambda b, c: b.sum(1) / c.sum(1)),
        "shuffled_loss": float(table.iloc[0]["loss"]),
        "shuffled_loss_ci": [table.iloc[0]["loss_lo"], table.iloc[0]["loss_hi"]],
        "shuffled_loss_ratio": float(table.iloc[0]["loss_ratio"]),
        "shuffled_loss_ratio_ci": [table.iloc[0]["loss_ratio_lo"], table.iloc[0]["loss_ratio_hi"]],
        "shuffled_tau": float(table.iloc[0]["kendall_tau"]),
        "best_method": str(best["method"]),
        "best_tau": float(best["kendall_tau"]),
        "best_accuracy": float(best["accuracy"]),
        "best_loss": float(best["loss"]),
        "best_loss_ci": [float(best["loss_lo"]), float(best["loss_hi"])],
        "best_loss_ratio": float(best["loss_ratio"]),
        "best_loss_ratio_ci": [float(best["loss_ratio_lo"]), float(best["loss_ratio_hi"])],
        "best_seconds": float(best["seconds"]),
        **{f"tau_{m}": float(by.loc[m, "kendall_tau"]) for m in by.index},
        **{f"accuracy_{m}": float(by.loc[m, "accuracy"]) for m in by.index},
        "order_scores_uncertainty": (
            f"none: accuracy, Kendall τ and best_method are properties of one search per method on one permutation "
            f"(seed {seed}); they carry no interval (resampling prompts would need new searches), and comparing "
            f"methods needs several permutations"),
        "methods": table.to_dict(orient="records"),
        **boot.summary(),
    }
    return ShuffleResult(metrics, orders, table, summary)


# ---------------------------------------------------------------------------- outputs


def plot_methods(result: ShuffleResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    table = result.table
    colors = {"reference": "0.6", "weights": PALETTE[0], "loss": PALETTE[1], "combined": PALETTE[2]}
    panels = [("accuracy", "exact-position accuracy", False), ("kendall_tau", "Kendall τ", False),
              ("loss_ratio", "loss ratio (recovered / original)", True), ("seconds", "wall time (s)", True)]
    with figure(2, 2, width=9.0, height=6.0) as (fig, axes):
        x = np.arange(len(table))
        for ax, (column, label, log_scale) in zip(axes.flat, panels):
            values = table[column].to_numpy(dtype=float)
            if column == "seconds":
                values = np.maximum(values, 1e-3)
            error = None
            if column == "loss_ratio":  # 95% interval over prompts (τ and accuracy: one search, no interval)
                error = np.vstack([np.maximum(values - table["loss_ratio_lo"].to_numpy(dtype=float), 0.0),
                                   np.maximum(table["loss_ratio_hi"].to_numpy(dtype=float) - values, 0.0)])
            ax.bar(x, values, color=[colors[f] for f in table["family"]], yerr=error, ecolor="0.2", capsize=2)
            ax.set_xticks(x, table["method"], rotation=35, ha="right")
            ax.set_ylabel(label)
            if log_scale:
                ax.set_yscale("log")
        axes[0, 1].axhline(0.0, color="0.3", linewidth=0.8)
        s = result.summary
        fig.suptitle(f"shuffle recovery — {s['model']}, {s['n_layers']} blocks, permutation seed "
                     f"{s['permutation_seed']}, loss on {s['n_tokens']} completion tokens\n"
                     "grey: shuffled input; blue: weights only; orange: loss refiners from the shuffled start; "
                     "green: pipeline\nloss ratio: 95% interval over prompts; accuracy, τ: one search on one "
                     "permutation (no interval)", fontsize=9)
        save(fig, path)


def plot_orders(result: ShuffleResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    methods = list(dict.fromkeys(result.orders["method"]))
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    n = result.summary["n_layers"]
    with figure(rows, cols, width=2.4 * cols, height=2.3 * rows) as (fig, axes):
        flat = np.array(axes, dtype=object).ravel()
        for ax, method in zip(flat, methods):
            sub = result.orders[result.orders["method"] == method]
            ax.plot([0, n - 1], [0, n - 1], color="0.8", linewidth=0.8)
            ax.scatter(sub["position"], sub["block"], s=8)
            row = result.table.set_index("method").loc[method]
            ax.set_title(f"{method}: τ={row['kendall_tau']:.2f}, acc={row['accuracy']:.2f}", fontsize=8)
            ax.set_xlabel("position")
            ax.set_ylabel("true block")
        for ax in flat[len(methods):]:
            ax.set_axis_off()
        save(fig, path)


def run(job: Job) -> Result:
    """Shuffle the blocks of one model and recover their order (runs model blocks)."""
    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    seed = params["seed"]
    options = ShuffleParams(
        methods=tuple(params["methods"]), refine_max_evals=params["refine_max_evals"],
        reinsert_window=params["reinsert_window"], anneal_steps=params["anneal_steps"],
        anneal_t_start=params["anneal_t_start"], anneal_t_end=params["anneal_t_end"],
        pipeline_max_evals=params["pipeline_max_evals"], probe_sequences=params["probe_sequences"],
        probe_length=params["probe_length"], memo_states=params["memo_states"], seed=seed,
    )
    permutation_seed = params["permutation_seed"]
    result = shuffle_experiment(evaluator, model=job.model, prompt_set=job.prompt_set, params=options,
                                permutation_seed=seed if permutation_seed is None else permutation_seed)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "orders": result.orders},
        figures={"methods": partial(plot_methods, result), "orders": partial(plot_orders, result)},
    )


EXPERIMENT = Experiment(
    name="shuffle",
    headlines=("baseline_loss", "best_loss"),
    family="surgery",
    description="recovering the order of shuffled blocks",
    description_long="Shuffle all blocks, recover the order with weights-only methods, loss-driven refiners and a "
                     "combined pipeline.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "orders"),
    figures=(Figure("methods", "recovery methods compared"), Figure("orders", "recovered orders")),
    params={
        "max_prompts": MAX_PROMPTS_PARAM,
        **SURGERY_PARAMS,
        "permutation_seed": {
            "description": "Seed of the shuffling permutation (null: the run's seed).",
            "type": ["integer", "null"],
            "default": None
        },
        "methods": {
            "description": "Recovery methods to run and score.",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"enum": ["weight_stats", "activation_flow", "tsp_2opt", "spectral", "reinsert", "bubble",
                               "anneal", "pipeline"]},
            "default": ["weight_stats", "activation_flow", "tsp_2opt", "spectral", "reinsert", "bubble", "anneal",
                        "pipeline"]
        },
        "refine_max_evals": {
            "description": "Loss evaluations each refiner (reinsert, bubble, anneal) may spend from the shuffled "
                           "start.",
            "type": "integer",
            "minimum": 1,
            "default": 60
        },
        "reinsert_window": {
            "description": "Re-insertion moves a block at most this many positions (null: anywhere).",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": 3
        },
        "anneal_steps": {
            "description": "Simulated-annealing steps (one loss evaluation each, within refine_max_evals).",
            "type": "integer",
            "minimum": 1,
            "default": 60
        },
        "anneal_t_start": {
            "description": "Initial annealing temperature, in relative loss change.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.05
        },
        "anneal_t_end": {
            "description": "Final annealing temperature (geometric schedule).",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.0005
        },
        "pipeline_max_evals": {
            "description": "Loss evaluations of the pipeline (best weights-only order, then reinsert and bubble).",
            "type": "integer",
            "minimum": 1,
            "default": 250
        },
        "probe_sequences": {
            "description": "Random token sequences the activation-flow method propagates.",
            "type": "integer",
            "minimum": 1,
            "default": 2
        },
        "probe_length": {
            "description": "Length of each random probe sequence.",
            "type": "integer",
            "minimum": 1,
            "default": 32
        },
        "memo_states": {
            "description": "Prefix states the refiners keep besides those of their current order (memory, not "
                           "results).",
            "type": "integer",
            "minimum": 0,
            "default": 64
        }
    },
    threads=2,
    runtime=180,
)
