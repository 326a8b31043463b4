"""Z-mask: the subspace that a layer's attention heads read keys from, from the weights alone.

The mask of the z_subspace suite. For block ℓ and every query head h, the QK circuit is the d×d
bilinear form ``M_h = W_Q^hᵀ W_K^g`` (``g`` the key/value head that ``h`` reads under
grouped-query attention: ``g = h // gqa_group``), so that the attention score between a
query residual x and a key residual y is ``xᵀ M_h y`` (rotary embeddings, biases and
query/key norms are left out: the circuit is the weights' own bilinear form). The top-k
right singular vectors of ``M_h`` (key-side directions, at most head_dim of them carry a
non-zero singular value) are stacked over heads, and the stack is decomposed again: its
top-k right singular vectors are ``V_Z`` (k × d, orthonormal rows), the directions most
heads read. When k exceeds the rank of the stack, V_Z is completed with orthonormal
directions of the stack's null space (so k = d gives a full basis and P_Z = I).

``P_Z = V_Zᵀ V_Z`` projects onto Z, ``P_Z⊥ = I − P_Z`` onto its complement. A random
orthonormal k × d basis (Haar-distributed, seeded by (seed, layer, k)) is the control.

Layers are given absolutely (integers; negative counts from the end) or as fractions of
depth (floats in [0, 1]: layer = floor(f · L + 0.5), capped at L − 1); ``resid.ℓ`` — the
input of block ℓ — is the residual the mask applies to. k values are capped at d_model.

Coordinates: every reader projects ``resid.ℓ``, the residual *before* the attention input
norm, so the circuit is taken in those coordinates. W_Q and W_K act on the normed residual
γ ⊙ x / rms(x) (RMSNorm) or γ ⊙ C x / σ(x) + β (LayerNorm, C = I − 11ᵀ/d the centring), so
the mask folds the norm into them: W ← W diag(γ) (and W ← W diag(γ) C for LayerNorm). The
per-token scalar 1/rms (1/σ) changes no direction, and the constant β acts like a bias and
is left out with the biases. (Earlier versions built Z from the raw W_Q, W_K — directions of
the *normed* residual — and applied it to the pre-norm residual unless ``fold_norm`` was set:
with a non-uniform γ that is a different subspace. A mask file written that way is refused.)

Every block: besides the configured (layer, k) combos, V_Z is built at *every* block for every
size in ``k`` and ``k_sweep`` (weights only; cheap). These bases serve the readers that need Z
at many layers (``ffn_avoidance``, the separation k sweep) and the adjacent-layer overlap:
for consecutive blocks ℓ, ℓ+1 the cosines cos θ_i of the principal angles between Z_ℓ and
Z_ℓ+1 (the singular values of V_ℓ V_ℓ+1ᵀ) give the overlap mean_i cos² θ_i = ‖V_ℓ V_ℓ+1ᵀ‖_F²/k
(1 for the same subspace, 0 for orthogonal ones, k/d expected for a random pair). Its null:
the overlap of Z_ℓ with ``n_random_subspaces`` Haar-random k-subspaces (its distribution does
not depend on Z_ℓ), drawn by :func:`layerscope.experiments.z_subspace.subspace_null.random_projections`.

Computation: for W_Q^hᵀ = Q_q R_q and W_K^gᵀ = Q_k R_k (thin QR), M_h = Q_q (R_q R_kᵀ) Q_kᵀ,
so the SVD of the small head_dim × head_dim core gives M_h's singular values and its right
singular vectors Q_k v exactly, without forming or decomposing a d × d matrix.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError, __version__
from layerscope.model.adapter import ModelAdapter
from layerscope.jobs.io import atomic_path
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.engines.spectra import entropy_effective_rank
from layerscope.engines.statistics import deterministic

log = logging.getLogger(__name__)

MASK_FILE = "z_mask.safetensors"
DEFINITION = (
    "V_Z: top-k right singular vectors of the stack of every query head's top-k right singular vectors of "
    "its QK circuit (W_Q diag(g))^T (W_K diag(g)), the attention input norm's scale g folded in (and its centring "
    "for LayerNorm), so that Z is in the coordinates of resid.layer, which it applies to (GQA heads mapped to their "
    "KV head); rows orthonormal"
)
COORDINATES = "residual"  # the mask file's metadata: the coordinates its bases live in


class ZMaskError(LayerscopeError):
    """A bad layer/k specification or a mask file that does not fit the data."""


# ---------------------------------------------------------------------------- layer and k specs


def resolve_layers(spec: Sequence[int | float], n_layers: int) -> list[int]:
    """Block indices from absolute layers (ints, negative from the end) or fractions of depth (floats)."""
    if not spec:
        raise ZMaskError("z_mask.layers is empty: give at least one layer (an integer or a fraction of depth)")
    out = []
    for value in spec:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ZMaskError(f"z_mask.layers: {value!r} is neither an integer layer nor a fraction of depth")
        if isinstance(value, int):
            layer = value + n_layers if value < 0 else value
            if not 0 <= layer < n_layers:
                raise ZMaskError(f"z_mask.layers: layer {value} is outside the model's blocks 0…{n_layers - 1}")
        else:
            if not 0.0 <= value <= 1.0:
                raise ZMaskError(f"z_mask.layers: a fraction of depth must lie in [0, 1], got {value}")
            layer = min(int(math.floor(value * n_layers + 0.5)), n_layers - 1)
        out.append(layer)
    resolved = list(dict.fromkeys(out))
    if len(resolved) < len(out):
        log.warning("z_mask.layers %s resolve to %s on a %d-layer model (duplicates dropped)", list(spec), out, n_layers)
    return resolved


def resolve_ks(ks: Sequence[int], d_model: int) -> list[int]:
    if not ks:
        raise ZMaskError("z_mask.k is empty: give at least one subspace size")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ZMaskError(f"z_mask.k: sizes must be positive integers, got {bad}")
    capped = [min(k, d_model) for k in ks]
    if any(k > d_model for k in ks):
        log.warning("z_mask.k %s capped at d_model = %d", list(ks), d_model)
    return list(dict.fromkeys(capped))


# ---------------------------------------------------------------------------- the mask


def qk_svd(w_q: torch.Tensor, w_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors (rows) of W_qᵀ W_k, both [head_dim, d] in.

    Returns (s [r], Vh [r, d]) with r = head_dim, computed in float64 through thin QRs.
    """
    q = w_q.detach().to(torch.float64)
    k = w_k.detach().to(torch.float64)
    qq, rq = torch.linalg.qr(q.T)  # q.T = qq @ rq, qq [d, hd]
    qk, rk = torch.linalg.qr(k.T)
    u, s, vh = torch.linalg.svd(rq @ rk.T)
    return s, (qk @ vh.T).T


def norm_fold(adapter: ModelAdapter, layer: int) -> torch.Tensor:
    """The d × d map F with W_Q · normed residual = (W_Q F) · residual up to a per-token scalar and a constant.

    RMSNorm: F = diag(γ); LayerNorm: F = diag(γ) C, C = I − 11ᵀ/d (its centring). γ = 1 for a norm
    without a scale. Raises for a block with no attention input norm (nothing says how the
    circuit's input relates to resid.ℓ).
    """
    facts = adapter.facts
    norm = adapter.block_norms(layer).get("attn")
    if norm is None:
        raise ZMaskError(f"block {layer} of this {facts.model_type} model has no attention input norm: the Z-mask is "
                         "defined for pre-norm decoders")
    d = facts.d_model
    gamma = (adapter.norm_scale(norm).to(torch.float64) if getattr(norm, "weight", None) is not None
             else torch.ones(d, dtype=torch.float64))
    fold = torch.diag(gamma)
    if facts.norm_type == "layernorm":
        fold = fold @ (torch.eye(d, dtype=torch.float64) - torch.full((d, d), 1.0 / d, dtype=torch.float64))
    return fold


def head_circuits(adapter: ModelAdapter, layer: int, *, fold_norm: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(singular values, right singular vectors) of every query head's QK circuit at block ``layer``.

    ``fold_norm=False``: the raw weights' circuit W_Qᵀ W_K, whose right singular vectors are
    directions of the *normed* residual. ``fold_norm=True``: (W_Q F)ᵀ (W_K F) with F =
    :func:`norm_fold`, directions of the residual ``resid.ℓ`` itself — what the mask uses.
    """
    facts = adapter.facts
    proj = adapter.projections(layer)
    w_q, w_k = proj["q"].to(torch.float64), proj["k"].to(torch.float64)
    if fold_norm:
        fold = norm_fold(adapter, layer)
        w_q, w_k = w_q @ fold, w_k @ fold
    hd = facts.head_dim
    expected_q, expected_k = facts.n_heads * hd, facts.n_kv_heads * hd
    if w_q.shape != (expected_q, facts.d_model) or w_k.shape != (expected_k, facts.d_model):
        raise ZMaskError(
            f"block {layer}: q {tuple(w_q.shape)} / k {tuple(w_k.shape)} do not match {facts.n_heads} query heads and "
            f"{facts.n_kv_heads} key/value heads of size {hd} on d={facts.d_model}"
        )
    out = []
    for h in range(facts.n_heads):
        g = h // facts.gqa_group
        out.append(qk_svd(w_q[h * hd : (h + 1) * hd], w_k[g * hd : (g + 1) * hd]))
    return out


@dataclass
class LayerMask:
    layer: int
    k: int
    basis: torch.Tensor  # [k, d] float64, orthonormal rows
    stack_singular: np.ndarray  # singular values of the stacked per-head bases
    stack_rank: int


def z_basis(circuits: list[tuple[torch.Tensor, torch.Tensor]], k: int, d: int, *, layer: int = -1) -> LayerMask:
    """V_Z from the heads' right singular vectors (see module docstring)."""
    if not 1 <= k <= d:
        raise ZMaskError(f"k = {k} must lie in 1…{d}")
    per_head = [vh[: min(k, vh.shape[0])] for _, vh in circuits]
    stack = torch.cat(per_head, dim=0)
    full = k > min(stack.shape)
    _, s, vh = torch.linalg.svd(stack, full_matrices=full)
    rank = int((s > s.max() * max(stack.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    basis = vh[:k]
    # re-orthonormalise (the SVD's rows are orthonormal to ~1e-15 already; this pins it) and fix signs
    q, r = torch.linalg.qr(basis.T)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    basis = (q * signs).T
    return LayerMask(layer, k, basis.contiguous(), s.cpu().numpy(), rank)


def random_basis(d: int, k: int, *, seed: int, layer: int) -> torch.Tensor:
    """A Haar-random orthonormal k × d basis, seeded by (seed, layer, k)."""
    rng = np.random.default_rng([int(seed), int(layer), int(k)])
    g = rng.standard_normal((d, k))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))
    return torch.from_numpy(q.T.copy())


def projector(basis: torch.Tensor) -> torch.Tensor:
    """P = Vᵀ V for a basis V with orthonormal rows."""
    return basis.T @ basis


def complement_projector(basis: torch.Tensor) -> torch.Tensor:
    """P⊥ = I − Vᵀ V."""
    d = basis.shape[1]
    return torch.eye(d, dtype=basis.dtype, device=basis.device) - projector(basis)


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosines of the principal angles between the row spaces of two orthonormal bases [k_a, d], [k_b, d]
    (descending; min(k_a, k_b) of them): the singular values of A Bᵀ."""
    return torch.linalg.svdvals(a.to(torch.float64) @ b.to(torch.float64).T).clamp(0.0, 1.0).cpu().numpy()


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles of two k-subspaces, ‖A Bᵀ‖_F²/k (1 same, 0 orthogonal)."""
    return float((a.to(torch.float64) @ b.to(torch.float64).T).pow(2).sum() / min(a.shape[0], b.shape[0]))


def overlap_null(d: int, k: int, n: int, *, seed: int) -> np.ndarray:
    """``n`` overlaps of a fixed k-subspace with Haar-random k-subspaces of R^d (the same for any fixed one)."""
    from layerscope.experiments.z_subspace.subspace_null import random_projections

    fixed = np.eye(d)[:k]  # any orthonormal rows: the overlap's distribution is rotation invariant
    parts = [(proj**2).sum(axis=(1, 2)) / k for proj in random_projections(fixed, d, k, n, seed=seed, key=(k, 0xAD))]
    return np.concatenate(parts)


def adjacent_overlaps(bases: dict[tuple[int, int], torch.Tensor], n_layers: int, ks: Sequence[int], d: int, *,
                      n_null: int, seed: int) -> list[dict]:
    """Per k: the overlap of Z_ℓ and Z_ℓ+1 for every adjacent pair, placed in the random-subspace null."""
    from layerscope.engines import statistics as st

    out = []
    for k in ks:
        values = [subspace_overlap(bases[(l, k)], bases[(l + 1, k)]) for l in range(n_layers - 1)]
        null = overlap_null(d, k, n_null, seed=seed)
        p = [st.empirical_p(v, null, greater=True) for v in values]
        holm = st.holm(p) if p else []
        order = np.argsort(values)[::-1] if values else []
        top = int(order[0]) if len(values) else None
        second = float(values[int(order[1])]) if len(values) > 1 else float("nan")
        lo, hi = np.quantile(null, [0.025, 0.975])
        out.append({
            "k": k,
            "overlap": values,
            "overlap_over_chance": [v / (k / d) for v in values],
            "chance": k / d,
            "null_mean": float(null.mean()),
            "null_range": [float(lo), float(hi)],
            "p_value": p,
            "p_holm": holm,
            "n_above_null": int(sum(q < 0.05 for q in holm)),
            "max_pair": [top, top + 1] if top is not None else None,
            "max_overlap": float(values[top]) if top is not None else float("nan"),
            "max_over_second": float(values[top] / second) if top is not None and second > 0 else float("nan"),
            "mean_overlap": float(np.mean(values)) if values else float("nan"),
        })
    return out


def energy_per_dimension(basis: torch.Tensor) -> torch.Tensor:
    """e_j = Σ_i V[i, j]²: how much residual dimension j takes part in the subspace (Σ_j e_j = k)."""
    return (basis.to(torch.float64) ** 2).sum(dim=0)


# ---------------------------------------------------------------------------- the mask file


@dataclass
class ZMask:
    """Every (layer, k) basis of one model and its random controls."""

    layers: list[int]
    ks: list[int]
    d_model: int
    n_layers: int
    bases: dict[tuple[int, int], torch.Tensor]
    randoms: dict[tuple[int, int], torch.Tensor]
    metadata: dict = field(default_factory=dict)
    every_layer_ks: list[int] = field(default_factory=list)  # sizes built at every block (bases holds them all)

    def basis(self, layer: int, k: int) -> torch.Tensor:
        return self.bases[(layer, k)]

    def has_every_layer(self, k: int) -> bool:
        return k in self.every_layer_ks

    def random(self, layer: int, k: int) -> torch.Tensor:
        return self.randoms[(layer, k)]

    def combos(self) -> list[tuple[int, int]]:
        return [(layer, k) for layer in self.layers for k in self.ks]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for (layer, k), v in self.bases.items():
            tensors[f"z.{layer}.{k}"] = v.to(torch.float32).contiguous()
        for (layer, k), v in self.randoms.items():
            tensors[f"random.{layer}.{k}"] = v.to(torch.float32).contiguous()
        meta = {
            **{key: str(value) for key, value in self.metadata.items()},
            "layers": json.dumps(self.layers),
            "k": json.dumps(self.ks),
            "d_model": str(self.d_model),
            "n_layers": str(self.n_layers),
            "every_layer_k": json.dumps(self.every_layer_ks),
            "definition": DEFINITION,
            "coordinates": COORDINATES,
            "layerscope_version": __version__,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ZMask":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ZMaskError(f"no Z-mask at {path}; run the z_mask rule")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            try:
                layers, ks = json.loads(meta["layers"]), json.loads(meta["k"])
            except KeyError as exc:
                raise ZMaskError(f"{path}: not a layerscope Z-mask (metadata {exc} missing)") from None
            if meta.get("coordinates") != COORDINATES:
                raise ZMaskError(
                    f"{path}: this Z-mask was built from the raw W_Q, W_K (directions of the normed residual, "
                    f"fold_norm={meta.get('fold_norm')}) but is applied to resid.layer; re-run the z_mask rule"
                )
            every = json.loads(meta.get("every_layer_k", "[]"))
            n_layers = int(meta["n_layers"])
            keys = {(l, k) for l in layers for k in ks} | {(l, k) for l in range(n_layers) for k in every}
            bases = {(l, k): f.get_tensor(f"z.{l}.{k}") for l, k in sorted(keys)}
            randoms = {(l, k): f.get_tensor(f"random.{l}.{k}") for l in layers for k in ks}
        return cls(layers, ks, int(meta["d_model"]), n_layers, bases, randoms, meta, every)

    def check_fits(self, n_layers: int, d_model: int, what: str) -> None:
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise ZMaskError(
                f"the Z-mask was built for a model with {self.n_layers} layers and d={self.d_model}, but {what} has "
                f"{n_layers} layers and d={d_model}"
            )


# ---------------------------------------------------------------------------- the experiment


@dataclass
class ZMaskResult:
    mask: ZMask
    metrics: pd.DataFrame
    summary: dict
    head_ranks: np.ndarray  # [n_layers, n_heads] entropy effective rank of each head's QK circuit
    stack_spectra: dict[int, np.ndarray]  # layer -> singular values of the stack (per-head k = max k)


def z_mask(adapter: ModelAdapter, *, model: str, layers: Sequence[int | float], k: Sequence[int],
           k_sweep: Sequence[int] = (), n_random_subspaces: int = 1000, seed: int = 0) -> ZMaskResult:
    facts = adapter.facts
    if facts.kind != "decoder":
        raise ZMaskError("z_mask is defined for decoders (the suite patches generation)")
    d, n_layers = facts.d_model, facts.n_layers
    resolved_layers = resolve_layers(layers, n_layers)
    ks = resolve_ks(k, d)
    every_ks = sorted(set(ks) | set(resolve_ks(k_sweep, d) if k_sweep else []))
    head_ranks = np.zeros((n_layers, facts.n_heads))
    circuits_at: dict[int, list] = {}
    bases, randoms, stack_spectra = {}, {}, {}
    for layer in range(n_layers):
        circuits = head_circuits(adapter, layer, fold_norm=True)
        head_ranks[layer] = [entropy_effective_rank(s.cpu().numpy()) for s, _ in circuits]
        if layer in resolved_layers:
            circuits_at[layer] = circuits
        for kk in every_ks:  # Z at every block, for the readers that need many layers
            bases[(layer, kk)] = z_basis(circuits, kk, d, layer=layer).basis
    adjacent = adjacent_overlaps(bases, n_layers, every_ks, d, n_null=n_random_subspaces, seed=seed)

    records = []
    for layer in range(n_layers):
        for h in range(facts.n_heads):
            records.append((layer, h, None, "qk_effective_rank", float(head_ranks[layer, h])))
    combos = []
    for layer in resolved_layers:
        for kk in ks:
            lm = z_basis(circuits_at[layer], kk, d, layer=layer)
            bases[(layer, kk)] = lm.basis
            randoms[(layer, kk)] = random_basis(d, kk, seed=seed, layer=layer)
            energy = lm.stack_singular**2
            captured = float(energy[:kk].sum() / energy.sum()) if energy.sum() > 0 else float("nan")
            records += [
                (layer, None, kk, "stack_energy_captured", captured),
                (layer, None, kk, "stack_rank", float(lm.stack_rank)),
                (layer, None, kk, "completed_dims", float(max(0, kk - lm.stack_rank))),
            ]
            combos.append({"layer": layer, "k": kk, "stack_energy_captured": captured, "stack_rank": lm.stack_rank,
                           "chance_energy": min(1.0, kk / d)})
            if kk == max(ks):
                stack_spectra[layer] = lm.stack_singular
    # how much the Z of different configured layers overlap (mean squared cosine of principal angles)
    overlaps = []
    for kk in ks:
        for i, a in enumerate(resolved_layers):
            for b in resolved_layers[i + 1 :]:
                va, vb = bases[(a, kk)], bases[(b, kk)]
                value = float((va @ vb.T).pow(2).sum() / kk)
                overlaps.append({"layer_a": a, "layer_b": b, "k": kk, "overlap": value, "chance": kk / d})
                records.append((a, None, kk, f"overlap_with_layer_{b}", value))
    metadata = {"model": model, "seed": seed, "layer_spec": json.dumps(list(layers)), "model_type": facts.model_type,
                "norm_folded": facts.norm_type}
    for row in adjacent:
        records += [(l, None, row["k"], "adjacent_overlap", v) for l, v in enumerate(row["overlap"])]
        records += [(l, None, row["k"], "adjacent_overlap_p_holm", v) for l, v in enumerate(row["p_holm"])]
    frame = pd.DataFrame(records, columns=["layer", "head", "k", "metric", "value"])
    frame = frame.astype({"head": "Int64", "k": "Int64"})
    frame.insert(0, "model", model)
    mask = ZMask(resolved_layers, ks, d, n_layers, bases, randoms, metadata, every_ks)
    labels = [f"L{c['layer']}/k{c['k']}" for c in combos]
    summary = {
        "model": model,
        "definition": DEFINITION,
        "n_layers": n_layers,
        "d_model": d,
        "n_heads": facts.n_heads,
        "n_kv_heads": facts.n_kv_heads,
        "head_dim": facts.head_dim,
        "coordinates": "resid.layer (before the attention input norm): the norm's scale γ folded into W_Q and W_K"
                       + (" with its centring" if facts.norm_type == "layernorm" else ""),
        "layer_spec": list(layers),
        "layers": resolved_layers,
        "k": ks,
        "combos": labels,
        "stack_energy_captured": [c["stack_energy_captured"] for c in combos],
        "qk_effective_rank": [float(head_ranks[layer].mean()) for layer in resolved_layers],
        "qk_effective_rank_all_layers_mean": float(head_ranks.mean()),
        "by_combo": combos,
        "layer_overlaps": overlaps,
        "qk_effective_rank_per_layer": head_ranks.mean(axis=1).tolist(),
        "every_layer_k": every_ks,
        "n_random_subspaces": int(n_random_subspaces),
        "adjacent_overlap": adjacent,
        **deterministic("the weights"),
    }
    return ZMaskResult(mask, frame, summary, head_ranks, stack_spectra)


def plot_spectra(result: ZMaskResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, layer_axis, save

    s = result.summary
    ranks = result.head_ranks
    n_layers = s["n_layers"]
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        x = np.arange(n_layers)
        axes[0].plot(x, ranks.mean(axis=1), marker="o", markersize=3, label="mean over heads")
        axes[0].fill_between(x, ranks.min(axis=1), ranks.max(axis=1), alpha=0.25, label="min–max over heads")
        for layer in s["layers"]:
            axes[0].axvline(layer, color="0.4", linestyle="--", linewidth=0.8)
        layer_axis(axes[0], n_layers - 1, label="block (dashed: Z-mask layers)")
        axes[0].set_ylabel(f"QK-circuit effective rank (of head_dim {s['head_dim']})")
        axes[0].legend(loc="best")
        for i, (layer, sv) in enumerate(result.stack_spectra.items()):
            energy = sv**2 / (sv**2).sum()
            axes[1].plot(np.arange(1, len(energy) + 1), np.cumsum(energy), color=PALETTE[i % 10], label=f"layer {layer}")
        for kk in s["k"]:
            axes[1].axvline(kk, color="0.5", linestyle=":", linewidth=0.8)
        axes[1].set_xlabel("directions of the stacked per-head bases (dotted: k)")
        axes[1].set_ylabel("cumulative fraction of stacked energy")
        axes[1].legend(loc="lower right")
        fig.suptitle(f"Z-mask of {s['model']}: norm-folded QK circuits per block (Z in resid.ℓ coordinates), and how "
                     f"much of all heads' top-{max(s['k'])} key directions a shared k-dim Z captures")
        save(fig, path)


def plot_adjacent_overlap(result: ZMaskResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, layer_axis, save

    s = result.summary
    n_layers = s["n_layers"]
    x = np.arange(n_layers - 1) + 0.5
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        for i, row in enumerate(s["adjacent_overlap"]):
            color = PALETTE[i % 10]
            axes[0].plot(x, row["overlap"], marker="o", markersize=3, color=color, label=f"k={row['k']}")
            axes[0].fill_between(x, *row["null_range"], color=color, alpha=0.12, linewidth=0)
            axes[1].plot(x, row["overlap_over_chance"], marker="o", markersize=3, color=color, label=f"k={row['k']}")
        axes[0].set_ylabel("overlap of Z_l and Z_l+1 (mean cos² of principal angles)")
        axes[0].set_ylim(0, 1.02)
        axes[1].axhline(1.0, color="0.4", linestyle="--", linewidth=0.8, label="random pair (k/d)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("overlap / chance k/d")
        for ax in axes:
            layer_axis(ax, n_layers - 1, label="between blocks l and l+1")
            ax.legend(loc="best", fontsize=7)
        fig.suptitle(f"Z of adjacent blocks — {s['model']} (bands: 95 % of the overlaps of "
                     f"{s['n_random_subspaces']} random k-subspaces; deterministic given the weights)")
        save(fig, path)


def run(job: Job) -> Result:
    """The Z-mask of one model, from its weights (CPU)."""
    from layerscope.model.adapter import load_model

    params = job.params
    adapter = load_model(job.input("model"), dtype="float32", device="cpu", kind="decoder")
    result = z_mask(adapter, model=job.model, layers=params["layers"], k=params["k"], k_sweep=params["k_sweep"],
                    n_random_subspaces=params["n_random_subspaces"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"spectra": partial(plot_spectra, result),
                 "adjacent_overlap": partial(plot_adjacent_overlap, result)},
        files={MASK_FILE: result.mask.save},
    )


EXPERIMENT = Experiment(
    name="z_mask",
    dashboard=('qk_effective_rank_all_layers_mean', 'qk_effective_rank', 'stack_energy_captured'),
    family="z_subspace",
    description="QK-circuit subspace Z per layer and k",
    description_long="The z_subspace suite's mask, from the weights: per layer and k, V_Z = top-k right singular "
                     "vectors of the stacked top-k right singular vectors of every head's QK circuit W_Q^T W_K (the "
                     "attention norm folded in, so Z lives in the residual it is applied to), and a seeded random "
                     "subspace of the same size. Its layers and k are those of every z_subspace experiment.",
    needs="decoder",
    data="weights",
    gpu=False,
    inputs=("model",),
    run=run,
    tables=("metrics",),
    figures=(Figure("spectra", "QK circuits and Z"), Figure("adjacent_overlap", "Z of adjacent blocks")),
    files=(MASK_FILE,),
    params={
        "layers": {
            "description": "Blocks whose input residual resid.l the mask applies to: integers are absolute "
                           "layers (negative: from the end), numbers with a decimal point fractions of depth "
                           "(floor(f*L + 0.5), capped at L-1; 1.0 = the last block).",
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "integer"}, {"type": "number", "minimum": 0, "maximum": 1}]},
            "default": [0.89, 0.92],
        },
        "k": {
            "description": "Subspace sizes (capped at d_model).",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {
                "type": "integer",
                "minimum": 1,
            },
            "default": [20, 50],
        },
        "k_sweep": {
            "description": "Further subspace sizes for which Z is built at every block (with those of k): the "
                           "adjacent-block overlap, ffn_avoidance and the z_separation k sweep read them; they add "
                           "no (layer, k) combo to the other experiments.",
            "type": "array",
            "uniqueItems": True,
            "items": {"type": "integer", "minimum": 1},
            "default": [5, 10, 20, 50, 100],
        },
        "n_random_subspaces": {
            "description": "Haar-random k-subspaces whose overlap with a fixed Z makes the null of the adjacent-block "
                           "overlap.",
            "type": "integer",
            "minimum": 1,
            "default": 1000,
        },
    },
    threads=1,
    runtime=30,
    section="z_subspace",
)
