"""Shuffle recovery: put a randomly permuted stack of blocks back in order.

The blocks are shuffled with seeded permutations, one per seed of ``permutation_seeds``: slot
s of a shuffled model holds original block π[s]. Every recovery method runs on every
permutation and sees only a :class:`ShuffledModel` — weights, a block runner and a
completion-loss oracle addressed by slot, never π — and returns an order of slots. The
recovered model runs original blocks π[order[0]], π[order[1]], …; it is scored by
exact-position accuracy (fraction of positions t holding block t), Kendall τ between position
and true depth (``scipy.stats.kendalltau``), its completion loss as a ratio to the original
model's, and the method's wall time and number of loss evaluations.

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
* ``profile_chain`` — residual profiles: every block reads and writes the same residual
  basis, so a vector over the d_model residual dimensions is comparable between blocks: the
  scale γ of each norm, the norm of each input column of the read projections (q k v gate
  up: how strongly the block reads dimension d) and of each output row of the write
  projections (o down: how strongly it writes d). Per kind of profile, the cosine distance
  between blocks; the kind whose shortest open path is most chain-like (mean pairwise
  distance / mean step along the path: a one-dimensional drift with depth scores high, noise
  scores near 1) gives the order. Blocks whose nearest-neighbour distance in that kind is an
  outlier (robust z-score, median and MAD over blocks, above ``outlier_z``: typically the
  first and last blocks, which act on embeddings and on the read-out) are left out of the
  path and inserted afterwards where they add least to the path length in the weight
  statistics' distances.

Orientation of the undirected orders (all but ``activation_flow``): the block-output
("write") projections o and down grow with depth in the decoders we checked, as the
residual stream does, so the order is reversed when log‖W_o‖ + log‖W_down‖ falls along it
(Kendall τ < 0). This is a heuristic, stated as such.

Data-driven refiners, on the mean completion-token loss through the
:class:`~layerscope.engines.surgery.LossEvaluator` (never starting from the activation cache, whose
prefixes are in the true order; the refiners share prefixes among their candidates and keep
the states of their current order in a :class:`~layerscope.engines.surgery.PrefixMemo`, so
a candidate that first differs from the current order at position m costs the n − m blocks
after it):

* ``reinsert`` — remove one block and re-insert it at the best position within
  ``reinsert_window`` of its current one (all positions if null); accept improvements; repeat
  over every block until a pass changes nothing or the evaluation budget is spent;
* ``bubble`` — swap adjacent blocks where that lowers the loss, pass after pass;
* ``anneal`` — simulated annealing over adjacent swaps and windowed re-insertions, Metropolis
  acceptance on the relative loss change with a geometric temperature schedule, seeded;
  returns the best order seen.

Refiners alone start from the shuffled order as given (``refine_max_evals`` each).
``pipeline``: the loss of every weights-only order (deduplicated), the lowest one's reverse
too (the orientation heuristic can fail), then a weight-guided descent from the best of
them: the orders one move away — a block re-inserted anywhere, a stretch of at least three
blocks reversed, a stretch of two or three blocks moved elsewhere (kept or reversed) — are
ranked by how much the move shortens the path through the weight distances (the sum of the
profile distance and the weight-statistics distance, each in units of its median
nearest-neighbour distance; ties: the cheaper candidate, the one that changes the order
later, first) and evaluated in that order; the first that lowers the loss is taken and the
ranking is rebuilt around it. The search ends when ``pipeline_patience`` candidates in a row
do not lower the loss (a pass over the most plausible moves finds nothing) or after
``pipeline_max_evals`` evaluations. The pipeline chooses by the loss only, never by the
hidden truth; its wall time includes the weights-only methods it ran.

Uncertainty: the loss is evaluated on a seeded, category-stratified sample of prompts; the
loss of the original, the shuffled and every recovered order, and each one's ratio to the
original's, get bootstrap intervals over those prompts (per-prompt loss sums, no extra
forward pass), per permutation and pooled over the permutations. Accuracy, Kendall τ, the
counts of exact recoveries and the best method are properties of one search per method per
permutation: no interval is invented for them (the summary says so). The weights-only methods
and the pipeline see the blocks, not the order they are presented in, so over permutations
they differ only through tie-breaking: the permutations test that invariance, not how
reliable a method is on another model. A recovered order is chosen by the loss on the same
prompts it is scored on.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
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

WEIGHT_METHODS = ("weight_stats", "activation_flow", "tsp_2opt", "spectral", "profile_chain")
REFINERS = ("reinsert", "bubble", "anneal")
METHODS = WEIGHT_METHODS + REFINERS + ("pipeline",)
FAMILY = {**{m: "weights" for m in WEIGHT_METHODS}, **{m: "loss" for m in REFINERS}, "pipeline": "combined",
          "none": "reference"}
WRITES = ("o", "down")  # projections whose output rows live in the residual basis; the others read from it
MAX_SEGMENT = 3  # longest stretch the pipeline moves as one piece
KEEP_TOKENS = 512  # per-token losses of recently evaluated orders the shuffled model keeps for the scoring


@dataclass
class ShuffleParams:
    methods: Sequence[str] = METHODS
    refine_max_evals: int = 200
    reinsert_window: int | None = 3
    anneal_steps: int = 200
    anneal_t_start: float = 0.05
    anneal_t_end: float = 0.0005
    pipeline_max_evals: int = 300
    pipeline_patience: int = 20
    outlier_z: float = 5.0
    probe_sequences: int = 4
    probe_length: int = 32
    memo_states: int = 64
    seed: int = 0


class ShuffledModel:
    """The shuffled model as recovery methods see it: blocks addressed by slot, π hidden.

    ``evaluations`` counts the orders the loss oracle has evaluated. The per-token losses of
    recently evaluated orders are kept (by block sequence, out of the methods' reach) so that
    scoring a recovered order does not run it again.
    """

    def __init__(self, evaluator: LossEvaluator, permutation: Sequence[int], memo_states: int = 64):
        permutation = [int(x) for x in permutation]
        if sorted(permutation) != list(range(evaluator.n_layers)):
            raise LayerscopeError(f"not a permutation of the {evaluator.n_layers} blocks: {permutation}")
        self._perm = permutation
        self._evaluator = evaluator
        self._adapter = evaluator.adapter
        self._tokens: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
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
        sequences = [[self._perm[s] for s in order] for order in orders]
        per_token = self._evaluator.losses(sequences, per_token=True, use_cache=False, memo=memo)
        for seq, values in zip(sequences, per_token):
            key = tuple(seq)
            self._tokens[key] = values
            self._tokens.move_to_end(key)
            while len(self._tokens) > KEEP_TOKENS:
                self._tokens.popitem(last=False)
        return [float(values.mean()) for values in per_token]

    def known_per_token(self, blocks: Sequence[int]) -> np.ndarray | None:
        """Per-token losses of an already evaluated block sequence (for the scoring, not the methods)."""
        return self._tokens.get(tuple(int(b) for b in blocks))


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
    """Open TSP path: nearest-neighbour chains from every start, the shortest improved by 2-opt.

    2-opt reverses a stretch path[i..j] when that shortens the path; in an open path only the
    edges at the two ends of the stretch change (one at either end of the path), so each
    candidate is scored by that change alone.
    """
    distance = (np.asarray(distance, dtype=float) + np.asarray(distance, dtype=float).T) / 2  # a path has no direction
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
    path = best[1]
    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                change = 0.0
                if i > 0:
                    change += distance[path[i - 1], path[j]] - distance[path[i - 1], path[i]]
                if j < n - 1:
                    change += distance[path[i], path[j + 1]] - distance[path[j], path[j + 1]]
                if change < -1e-12:
                    path = path[:i] + path[i : j + 1][::-1] + path[j + 1 :]
                    improved = True
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


def residual_profiles(model: ShuffledModel) -> dict[str, np.ndarray]:
    """Per kind of profile, an [n, d_model] table: what each slot's block does along each residual dimension.

    ``gamma_{role}``: the scale γ of each norm; ``read_{t}``: the norm of each input column of a
    projection that reads the residual stream (‖W[:, d]‖); ``write_{t}``: the norm of each
    output row of a projection that writes it (o, down: ‖W[d, :]‖).
    """
    tables: dict[str, list[np.ndarray]] = {}
    for slot in range(model.n):
        for role, g in sorted(model.norm_scales(slot).items()):
            tables.setdefault(f"gamma_{role}", []).append(g.double().reshape(-1).cpu().numpy())
        for t, w in sorted(model.projections(slot).items()):
            w = w.double()
            if t in WRITES:
                tables.setdefault(f"write_{t}", []).append(w.norm(dim=1).cpu().numpy())
            else:
                tables.setdefault(f"read_{t}", []).append(w.norm(dim=0).cpu().numpy())
    return {k: np.stack(v) for k, v in tables.items() if len(v) == model.n and len({x.shape for x in v}) == 1}


def cosine_distances(table: np.ndarray) -> np.ndarray:
    """1 − cosine similarity between the rows of ``table`` (rows of zeros: distance 1 to everything)."""
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    unit = np.divide(table, norms, out=np.zeros_like(table, dtype=float), where=norms > 0)
    distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def chain_score(distance: np.ndarray, path: Sequence[int]) -> float:
    """Mean pairwise distance over the mean step along ``path``: high when the blocks lie on a line."""
    n = len(distance)
    if n < 3:
        return 0.0
    step = _path_length(path, distance) / (n - 1)
    spread = float(distance[np.triu_indices(n, 1)].mean())
    return spread / step if step > 1e-12 else 0.0


def outlier_scores(distance: np.ndarray) -> np.ndarray:
    """Robust z-score of each block's nearest-neighbour distance (median and MAD over blocks); zeros when
    fewer than 5 blocks or no spread."""
    n = len(distance)
    if n < 5:
        return np.zeros(n)
    nearest = np.sort(distance + np.diag(np.full(n, np.inf)), axis=1)[:, 0]
    centre = float(np.median(nearest))
    mad = 1.4826 * float(np.median(np.abs(nearest - centre)))
    if mad <= 1e-12 * max(1.0, abs(centre)):
        return np.zeros(n)
    return (nearest - centre) / mad


def median_step(distance: np.ndarray) -> float:
    """Median nearest-neighbour distance (the unit of a distance matrix; 1 when it is degenerate)."""
    n = len(distance)
    if n < 2:
        return 1.0
    nearest = np.sort(distance + np.diag(np.full(n, np.inf)), axis=1)[:, 0]
    value = float(np.median(nearest))
    return value if value > 1e-12 else 1.0


def insert_cheapest(path: list[int], block: int, distance: np.ndarray) -> list[int]:
    """``path`` with ``block`` inserted where it adds least to the path length (ends included)."""
    if not path:
        return [block]
    costs = [distance[block, path[0]]]
    costs += [distance[a, block] + distance[block, b] - distance[a, b] for a, b in zip(path, path[1:])]
    costs.append(distance[path[-1], block])
    q = int(np.argmin(costs))
    return path[:q] + [block] + path[q:]


@dataclass
class WeightGeometry:
    """What the distance-based methods and the pipeline's move ranking read from the weights."""

    stats: np.ndarray  # standardised weight statistics [n, features]
    stats_distance: np.ndarray
    profile: str  # the most chain-like kind of residual profile ('' if none is informative)
    profile_distance: np.ndarray
    chain_scores: dict[str, float]
    outliers: list[int]  # slots left out of the profile path and inserted afterwards

    def prior(self) -> np.ndarray:
        """The move-ranking distance: profile and statistics distances, each in units of its median step;
        an outlier's profile distances are replaced by its statistics distances (as in the path)."""
        stats = self.stats_distance / median_step(self.stats_distance)
        profile = self.profile_distance / median_step(self.profile_distance)
        for slot in self.outliers:
            profile[slot, :] = stats[slot, :]
            profile[:, slot] = stats[:, slot]
        return profile + stats


def weight_geometry(model: ShuffledModel, outlier_z: float) -> WeightGeometry:
    stats = weight_statistics(model)[1]
    stats_distance = layer_distances(stats)
    scores, best = {}, ("", stats_distance)
    for kind, table in residual_profiles(model).items():
        distance = cosine_distances(table)
        scores[kind] = chain_score(distance, shortest_path(distance))
        if scores[kind] > scores.get(best[0], 0.0):
            best = (kind, distance)
    kind, distance = best
    z = outlier_scores(distance)
    outliers = [int(s) for s in np.argsort(-z, kind="stable") if z[s] > outlier_z]
    return WeightGeometry(stats, stats_distance, kind, distance, scores, outliers)


def order_profile_chain(model: ShuffledModel, geometry: WeightGeometry) -> list[int]:
    inliers = [s for s in range(model.n) if s not in geometry.outliers]
    sub = geometry.profile_distance[np.ix_(inliers, inliers)]
    path = [inliers[k] for k in shortest_path(sub)] if inliers else []
    for slot in geometry.outliers:  # most outlying first
        path = insert_cheapest(path, slot, geometry.stats_distance)
    return orient(model, path)


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


def neighbours(order: Sequence[int], max_segment: int = MAX_SEGMENT) -> list[tuple[int, ...]]:
    """The distinct orders one move from ``order`` (itself and its full reverse excluded): a block
    re-inserted at any other position, a stretch of at least three blocks reversed, a stretch of two
    to ``max_segment`` blocks moved elsewhere, kept or reversed."""
    order = [int(s) for s in order]
    n = len(order)
    out: dict[tuple[int, ...], None] = {}
    for p in range(n):
        for q in range(n):
            if q != p:
                out[tuple(move(order, p, q))] = None
    for i in range(n):
        for j in range(i + 2, n):
            out[tuple(order[:i] + order[i : j + 1][::-1] + order[j + 1 :])] = None
        for j in range(i + 1, min(n, i + max_segment)):
            piece, rest = order[i : j + 1], order[:i] + order[j + 1 :]
            for q in range(len(rest) + 1):
                for stretch in (piece, piece[::-1]):
                    out[tuple(rest[:q] + stretch + rest[q:])] = None
    out.pop(tuple(order), None)
    out.pop(tuple(order[::-1]), None)
    return list(out)


def rank_moves(order: Sequence[int], candidates: list[tuple[int, ...]], prior: np.ndarray) -> list[tuple[int, ...]]:
    """``candidates`` by the path length through ``prior`` (shortest first); ties: the later first change."""
    if not candidates:
        return []
    table = np.array(candidates)
    length = prior[table[:, :-1], table[:, 1:]].sum(axis=1)
    changed = table != np.asarray(order)[None, :]
    first = changed.argmax(axis=1)
    ranked = np.lexsort((-first, np.round(length, 12)))
    return [candidates[k] for k in ranked]


def refine_guided(search: _Search, order: list[int], value: float, prior: np.ndarray, *,
                  patience: int, seen: set[tuple[int, ...]] | None = None) -> tuple[list[int], float]:
    """Weight-guided descent: evaluate the neighbours of the current order from the most plausible (by
    ``prior``) on, take the first that lowers the loss, rebuild the ranking around it; stop after
    ``patience`` failures in a row or when the budget is spent. Orders in ``seen`` (already evaluated)
    are skipped."""
    seen = set(seen or ()) | {tuple(order)}
    failures = 0
    while search.left > 0 and failures < patience:
        improved = False
        for candidate in rank_moves(order, neighbours(order), prior):
            if candidate in seen:
                continue
            if search.left <= 0 or failures >= patience:
                break
            seen.add(candidate)
            new = search.losses([list(candidate)])[0]
            if _better(new, value):
                order, value, improved, failures = list(candidate), new, True, 0
                search.accept(order, value)
                break
            failures += 1
        if not improved:
            break
    return order, value


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
    cache: dict[str, object] = {}

    def timed(name: str, fn: Callable[[], list[int]], evals: Callable[[], int] = lambda: 0) -> MethodResult:
        started = time.perf_counter()
        order = [int(s) for s in fn()]
        results[name] = MethodResult(name, order, time.perf_counter() - started, evals())
        log.info("shuffle %s: %.1fs, %d evaluations", name, results[name].seconds, results[name].evaluations)
        return results[name]

    def stats() -> np.ndarray:
        if "stats" not in cache:
            cache["stats"] = weight_statistics(model)[1]
        return cache["stats"]

    def geometry() -> WeightGeometry:
        if "geometry" not in cache:
            cache["geometry"] = weight_geometry(model, params.outlier_z)
        return cache["geometry"]

    weight_fns = {
        "weight_stats": lambda: order_weight_stats(model, stats()),
        "activation_flow": lambda: order_activation_flow(model, params),
        "tsp_2opt": lambda: orient(model, shortest_path(layer_distances(stats()))),
        "spectral": lambda: orient(model, fiedler_order(layer_distances(stats()))),
        "profile_chain": lambda: order_profile_chain(model, geometry()),
    }
    wanted = list(params.methods)
    needed = set(wanted) | (set(WEIGHT_METHODS) if "pipeline" in wanted else set())
    for name in WEIGHT_METHODS:
        if name in needed:
            cache.clear()  # each method pays for the statistics it uses
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
            starts = list(dict.fromkeys(tuple(results[m].order) for m in WEIGHT_METHODS))
            best = None
            for candidate in starts:  # one at a time: the best so far stays pinned in the memo
                values = search.losses([list(candidate)])
                if values and (best is None or _better(values[0], best[1])):
                    best = (list(candidate), values[0])
                    search.accept(*best)
            if best is None:  # no budget at all
                return list(starts[0])
            flipped = best[0][::-1]
            values = search.losses([flipped])
            if values and _better(values[0], best[1]):
                best = (flipped, values[0])
                search.accept(*best)
            return refine_guided(search, *best, geometry().prior(), patience=params.pipeline_patience,
                                 seen={*starts, tuple(flipped)})[0]

        with progress("shuffle: pipeline", search.max_evals, unit="evaluations") as search.progress:
            result = timed("pipeline", pipeline, lambda: search.evals)
        result.seconds += sum(results[m].seconds for m in WEIGHT_METHODS)
    return [results[m] for m in wanted]


# ---------------------------------------------------------------------------- the experiment


@dataclass
class ShuffleResult:
    metrics: pd.DataFrame  # model, prompt_set, permutation_seed, method, family, metric, value
    orders: pd.DataFrame  # permutation_seed, method, position, slot, block
    table: pd.DataFrame  # one row per permutation and method (the shuffled reference 'none' first)
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


def default_seeds(seed: int, count: int = 3) -> list[int]:
    """The permutation seeds of a run whose ``permutation_seeds`` is null: its seed and the next ones."""
    return [int(seed) + k for k in range(count)]


def _per_token(evaluator: LossEvaluator, shuffled: ShuffledModel, sequences: list[list[int]],
               identity: np.ndarray) -> list[np.ndarray]:
    """Per-token losses of each sequence: the original order's from the baseline, orders a method already
    evaluated from the oracle's store, the rest computed now (one sweep)."""
    n = evaluator.n_layers
    out: list[np.ndarray | None] = []
    for seq in sequences:
        out.append(identity if seq == list(range(n)) else shuffled.known_per_token(seq))
    missing = [k for k, x in enumerate(out) if x is None]
    if missing:
        computed = evaluator.losses([sequences[k] for k in missing], per_token=True)
        for k, values in zip(missing, computed):
            out[k] = values
    return out


def shuffle_experiment(evaluator: LossEvaluator, *, model: str, prompt_set: str, params: ShuffleParams,
                       permutations: Sequence[Sequence[int]] | None = None,
                       permutation_seeds: Sequence[int] | None = None, n_boot: int = N_BOOT) -> ShuffleResult:
    """Every method on every permutation (given, or drawn from ``permutation_seeds``; default: three
    seeds from ``params.seed``), scored against the truth; see the module docstring."""
    n = evaluator.n_layers
    if n < 2:
        raise LayerscopeError("shuffle needs a model with at least 2 blocks")
    if permutations is not None:
        perms = [[int(x) for x in p] for p in permutations]
        seeds = list(permutation_seeds) if permutation_seeds is not None else list(range(len(perms)))
    else:
        seeds = list(permutation_seeds) if permutation_seeds is not None else default_seeds(params.seed)
        perms = [random_permutation(n, s) for s in seeds]
    if not perms or len(seeds) != len(perms) or len(set(seeds)) != len(seeds):
        raise LayerscopeError(f"shuffle needs distinct seeds, one per permutation (got {seeds} for {len(perms)})")
    started = time.perf_counter()
    base_tokens = evaluator.losses([list(range(n))], per_token=True)[0]
    baseline = float(base_tokens.mean())
    base_sums, counts = prompt_sums(evaluator, [base_tokens])
    b = base_sums[:, 0]
    boot = Bootstrap(len(counts), unit="prompt", n_boot=n_boot, seed=params.seed)

    rows, order_rows, sums_by, runs = [], [], {}, []
    for seed, perm in zip(seeds, perms):
        shuffled = ShuffledModel(evaluator, perm, params.memo_states)
        seed_started = time.perf_counter()
        results = recover(shuffled, params)
        search_seconds = time.perf_counter() - seed_started
        oracle = shuffled.evaluations
        reference = MethodResult("none", list(range(n)), 0.0, 0)
        methods = [reference, *results]
        sequences = [[perm[s] for s in r.order] for r in methods]
        per_token = _per_token(evaluator, shuffled, sequences, base_tokens)
        values = [float(x.mean()) for x in per_token]
        sums, _ = prompt_sums(evaluator, per_token)  # [P, methods]
        loss_ci = interval(boot, values, sums, counts, statistic=lambda s, c: s.sum(1) / c.sum(1)[:, None])
        ratio_ci = interval(boot, np.array(values) / baseline, sums, b,
                            statistic=lambda s, b: s.sum(1) / b.sum(1)[:, None])
        for k, (r, seq, value, lci, rci) in enumerate(zip(methods, sequences, values, loss_ci, ratio_ci)):
            accuracy, tau = score(seq)
            rows.append({"permutation_seed": int(seed), "method": r.method, "family": FAMILY[r.method],
                         "accuracy": accuracy, "kendall_tau": tau, "exact": bool(accuracy == 1.0),
                         "loss": float(value), "loss_lo": lci[0], "loss_hi": lci[1],
                         "loss_ratio": float(value / baseline), "loss_ratio_lo": rci[0], "loss_ratio_hi": rci[1],
                         "seconds": float(r.seconds), "evaluations": int(r.evaluations)})
            sums_by.setdefault(r.method, []).append(sums[:, k])
            order_rows += [(int(seed), r.method, t, s, perm[s]) for t, s in enumerate(r.order)]
        runs.append({"seed": int(seed), "permutation": [int(x) for x in perm], "oracle_evaluations": int(oracle),
                     "seconds": float(search_seconds), "shuffled_tau": score(perm)[1]})
        log.info("shuffle permutation seed %d: %d oracle evaluations, %.1fs of search", seed, oracle, search_seconds)
    table = pd.DataFrame(rows)
    orders = pd.DataFrame(order_rows, columns=["permutation_seed", "method", "position", "slot", "block"])
    metrics = table.drop(columns=["exact"]).melt(id_vars=["permutation_seed", "method", "family"],
                                                 var_name="metric", value_name="value")
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)

    # per method over the permutations
    recovered = table[table["method"] != "none"]
    names = list(dict.fromkeys(recovered["method"]))
    agg = recovered.groupby("method", sort=False).agg(
        exact=("exact", "sum"), accuracy=("accuracy", "mean"), kendall_tau=("kendall_tau", "mean"),
        loss=("loss", "mean"), seconds=("seconds", "mean"), evaluations=("evaluations", "mean")).loc[names]
    # ties: fewer loss evaluations, then the order of the methods (not wall time: it varies from run to run)
    ranked = agg.reset_index().sort_values(["exact", "accuracy", "kendall_tau", "loss", "evaluations"],
                                           ascending=[False, False, False, True, True], kind="stable")
    best = ranked.iloc[0]

    def pooled(method: str):
        """Loss and loss ratio of a method pooled over the permutations (mean of the per-permutation losses),
        with intervals over the prompts (per-prompt sums averaged over the permutations, same resamples)."""
        s = np.mean(sums_by[method], axis=0)
        loss = float(s.sum() / counts.sum())
        loss_ci = interval(boot, loss, s, counts, statistic=lambda s, c: s.sum(1) / c.sum(1))
        ratio = float(s.sum() / b.sum())
        ratio_ci = interval(boot, ratio, s, b, statistic=lambda s, b: s.sum(1) / b.sum(1))
        return loss, loss_ci, ratio, ratio_ci

    for seed in seeds:
        sub = recovered[recovered["permutation_seed"] == seed]
        top = sub.sort_values(["accuracy", "kendall_tau", "loss"], ascending=[False, False, True],
                              kind="stable").iloc[0]
        if top["accuracy"] < 1 and top["loss_ratio_lo"] <= 1:
            boot.flag(f"permutation seed {seed}: the loss on {len(counts)} prompts cannot tell the best recovered "
                      f"order ({top['method']}, accuracy {top['accuracy']:.2f}) from the original (loss ratio "
                      f"interval [{top['loss_ratio_lo']:.3f}, {top['loss_ratio_hi']:.3f}] reaches 1)")
    shuffled_loss, shuffled_loss_ci, shuffled_ratio, shuffled_ratio_ci = pooled("none")
    best_loss, best_loss_ci, best_ratio, best_ratio_ci = pooled(str(best["method"]))
    by_seed = {m: recovered[recovered["method"] == m] for m in names}
    n_perm = len(seeds)
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        **sample_fragment(evaluator),
        "permutation_seeds": [int(s) for s in seeds],
        "n_permutations": n_perm,
        "permutations": runs,
        "baseline_loss": baseline,
        "baseline_loss_ci": interval(boot, baseline, b, counts, statistic=lambda b, c: b.sum(1) / c.sum(1)),
        "shuffled_loss": shuffled_loss,
        "shuffled_loss_ci": shuffled_loss_ci,
        "shuffled_loss_ratio": shuffled_ratio,
        "shuffled_loss_ratio_ci": shuffled_ratio_ci,
        "shuffled_tau": float(np.mean([r["shuffled_tau"] for r in runs])),
        "best_method": str(best["method"]),
        "best_exact": int(best["exact"]),
        "best_tau": float(best["kendall_tau"]),
        "best_accuracy": float(best["accuracy"]),
        "best_seconds": float(best["seconds"]),
        "best_evaluations": float(best["evaluations"]),
        "best_loss": best_loss,
        "best_loss_ci": best_loss_ci,
        "best_loss_ratio": best_ratio,
        "best_loss_ratio_ci": best_ratio_ci,
        "all_exact": bool(best["exact"] == n_perm),
        **{f"exact_{m}": int(agg.loc[m, "exact"]) for m in names},
        **{f"mean_tau_{m}": float(agg.loc[m, "kendall_tau"]) for m in names},
        "per_method": {m: {
            "exact": int(agg.loc[m, "exact"]), "mean_accuracy": float(agg.loc[m, "accuracy"]),
            "mean_tau": float(agg.loc[m, "kendall_tau"]), "mean_evaluations": float(agg.loc[m, "evaluations"]),
            "mean_seconds": float(agg.loc[m, "seconds"]),
            **{key: [float(x) for x in by_seed[m][column]] for key, column in (
                ("accuracy", "accuracy"), ("kendall_tau", "kendall_tau"), ("loss_ratio", "loss_ratio"),
                ("seconds", "seconds"))},
            "evaluations": [int(x) for x in by_seed[m]["evaluations"]],
        } for m in names},
        "seconds": float(time.perf_counter() - started),
        "order_scores_uncertainty": (
            f"none: accuracy, Kendall τ, the exact-recovery counts and best_method come from one search per method "
            f"on each of {n_perm} permutations (seeds {[int(s) for s in seeds]}); they carry no interval "
            f"(resampling prompts would need new searches). The weights-only methods and the pipeline see the "
            f"blocks, not the order they are presented in, so their results differ between permutations only "
            f"through tie-breaking: the permutations check that invariance, not the methods' reliability on "
            f"other models; the refiners alone start from the shuffled order and depend on it"),
        "methods": table.to_dict(orient="records"),
        **boot.summary(),
    }
    return ShuffleResult(metrics, orders, table, summary)


# ---------------------------------------------------------------------------- outputs


def _grouped(ax, table: pd.DataFrame, column: str, seeds: list[int], methods: list[str], *, errors: bool = False):
    from layerscope.report.plotting import PALETTE

    width = 0.8 / len(seeds)
    for k, seed in enumerate(seeds):
        sub = table[table["permutation_seed"] == seed].set_index("method").loc[methods]
        values = sub[column].to_numpy(dtype=float)
        yerr = None
        if errors:
            yerr = np.vstack([np.maximum(values - sub[f"{column}_lo"].to_numpy(dtype=float), 0.0),
                              np.maximum(sub[f"{column}_hi"].to_numpy(dtype=float) - values, 0.0)])
        x = np.arange(len(methods)) - 0.4 + width * (k + 0.5)
        ax.bar(x, values, width=width, color=PALETTE[k % len(PALETTE)], yerr=yerr, ecolor="0.2", capsize=1.5,
               label=f"seed {seed}")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=35, ha="right")


def plot_methods(result: ShuffleResult, path: str | Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from layerscope.report.plotting import figure, save

    table = result.table
    s = result.summary
    seeds = s["permutation_seeds"]
    methods = list(dict.fromkeys(table["method"]))
    recovered = [m for m in methods if m != "none"]
    with figure(3, 2, width=10.0, height=9.5) as (fig, axes):
        _grouped(axes[0, 0], table, "accuracy", seeds, methods)
        axes[0, 0].set_ylabel("exact-position accuracy")
        axes[0, 0].set_ylim(0, 1.05)
        axes[0, 0].legend(fontsize=7, ncol=len(seeds))
        _grouped(axes[0, 1], table, "kendall_tau", seeds, methods)
        axes[0, 1].set_ylabel("Kendall τ")
        axes[0, 1].axhline(0.0, color="0.3", linewidth=0.8)
        axes[0, 1].set_ylim(min(-0.1, float(table["kendall_tau"].min()) - 0.05), 1.05)
        _grouped(axes[1, 0], table, "loss_ratio", seeds, methods, errors=True)
        axes[1, 0].set_ylabel("loss ratio (recovered / original)")
        axes[1, 0].set_yscale("log")
        exact = [s[f"exact_{m}"] for m in recovered]
        axes[1, 1].bar(np.arange(len(recovered)), exact, color="0.45")
        axes[1, 1].set_xticks(np.arange(len(recovered)), recovered, rotation=35, ha="right")
        axes[1, 1].set_ylim(0, len(seeds) + 0.3)
        axes[1, 1].yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1, 1].set_ylabel(f"exact recoveries (of {len(seeds)})")
        timed = table[table["method"] != "none"].assign(seconds=lambda d: np.maximum(d["seconds"], 1e-3))
        _grouped(axes[2, 0], timed, "seconds", seeds, recovered)
        axes[2, 0].set_ylabel("wall time (s)")
        axes[2, 0].set_yscale("log")
        _grouped(axes[2, 1], table[table["method"] != "none"], "evaluations", seeds, recovered)
        axes[2, 1].set_ylabel("loss evaluations")
        fig.suptitle(f"shuffle recovery — {s['model']}, {s['n_layers']} blocks, {len(seeds)} permutations "
                     f"(seeds {', '.join(map(str, seeds))}), loss on {s['n_tokens']} completion tokens of "
                     f"{s['n_prompts']} prompts\n'none': the shuffled model as given; loss ratio: 95% interval over "
                     "prompts; accuracy, τ, time, evaluations: one search per method and permutation (no interval)",
                     fontsize=9)
        save(fig, path)


def plot_orders(result: ShuffleResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    methods = list(dict.fromkeys(result.orders["method"]))
    seeds = result.summary["permutation_seeds"]
    cols = min(5, len(methods))
    rows = math.ceil(len(methods) / cols)
    n = result.summary["n_layers"]
    table = result.table.set_index(["method", "permutation_seed"])
    markers = "os^Dv<>"
    with figure(rows, cols, width=2.4 * cols, height=2.4 * rows) as (fig, axes):
        flat = np.array(axes, dtype=object).ravel()
        for ax, method in zip(flat, methods):
            ax.plot([0, n - 1], [0, n - 1], color="0.8", linewidth=0.8)
            for k, seed in enumerate(seeds):
                sub = result.orders[(result.orders["method"] == method) & (result.orders["permutation_seed"] == seed)]
                ax.scatter(sub["position"], sub["block"], s=7, marker=markers[k % len(markers)],
                           color=PALETTE[k % len(PALETTE)], alpha=0.7, label=f"seed {seed}")
            taus = [table.loc[(method, seed), "kendall_tau"] for seed in seeds]
            exact = sum(bool(table.loc[(method, seed), "exact"]) for seed in seeds)
            span = f"{min(taus):.2f}" if np.isclose(min(taus), max(taus)) else f"[{min(taus):.2f}, {max(taus):.2f}]"
            ax.set_title(f"{method}: exact {exact}/{len(seeds)}, τ {span}", fontsize=7)
            ax.set_xlabel("position", fontsize=7)
            ax.set_ylabel("true block", fontsize=7)
        flat[0].legend(fontsize=6)
        for ax in flat[len(methods):]:
            ax.set_axis_off()
        save(fig, path)


def run(job: Job) -> Result:
    """Shuffle the blocks of one model with several permutations and recover their order (runs model blocks)."""
    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    seed = params["seed"]
    options = ShuffleParams(
        methods=tuple(params["methods"]), refine_max_evals=params["refine_max_evals"],
        reinsert_window=params["reinsert_window"], anneal_steps=params["anneal_steps"],
        anneal_t_start=params["anneal_t_start"], anneal_t_end=params["anneal_t_end"],
        pipeline_max_evals=params["pipeline_max_evals"], pipeline_patience=params["pipeline_patience"],
        outlier_z=params["outlier_z"], probe_sequences=params["probe_sequences"],
        probe_length=params["probe_length"], memo_states=params["memo_states"], seed=seed,
    )
    seeds = params["permutation_seeds"]
    result = shuffle_experiment(evaluator, model=job.model, prompt_set=job.prompt_set, params=options,
                                permutation_seeds=default_seeds(seed) if seeds is None else seeds)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "orders": result.orders},
        figures={"methods": partial(plot_methods, result), "orders": partial(plot_orders, result)},
    )


EXPERIMENT = Experiment(
    name="shuffle",
    dashboard=("best_method", "all_exact", "exact_pipeline", "best_evaluations", "best_loss"),
    headlines=("baseline_loss", "best_loss"),
    family="surgery",
    description="recovering the order of shuffled blocks",
    description_long="Shuffle all blocks with several seeded permutations, recover the order with weights-only "
                     "methods, loss-driven refiners and a combined pipeline.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "orders"),
    figures=(Figure("methods", "recovery methods compared over permutations"),
             Figure("orders", "recovered orders")),
    params={
        "max_prompts": MAX_PROMPTS_PARAM,
        **SURGERY_PARAMS,
        "permutation_seeds": {
            "description": "Seeds of the shuffling permutations; every method runs on each (null: the run's seed "
                           "and the two after it).",
            "type": ["array", "null"],
            "items": {"type": "integer"},
            "minItems": 1,
            "uniqueItems": True,
            "default": None
        },
        "methods": {
            "description": "Recovery methods to run and score.",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"enum": list(METHODS)},
            "default": list(METHODS)
        },
        "refine_max_evals": {
            "description": "Loss evaluations each refiner (reinsert, bubble, anneal) may spend from the shuffled "
                           "start.",
            "type": "integer",
            "minimum": 1,
            "default": 60
        },
        "reinsert_window": {
            "description": "Re-insertion moves of the reinsert and anneal refiners move a block at most this many "
                           "positions (null: anywhere).",
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
            "description": "Loss evaluations of the pipeline: every weights-only order, the best one's reverse, "
                           "then the weight-guided descent.",
            "type": "integer",
            "minimum": 1,
            "default": 120
        },
        "pipeline_patience": {
            "description": "The pipeline's descent stops after this many candidate moves in a row (the most "
                           "plausible by the weights) fail to lower the loss.",
            "type": "integer",
            "minimum": 1,
            "default": 20
        },
        "outlier_z": {
            "description": "profile_chain leaves a block out of its path (and inserts it afterwards) when the "
                           "robust z-score of its nearest-neighbour profile distance exceeds this.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 5.0
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
