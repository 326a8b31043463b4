"""Weight topology (weights only, decoders and encoders alike).

* **sparsity** — per matrix, per type and over the whole model: the fraction of entries
  with |w| below absolute thresholds (``sparsity_abs_lt_{t}``) and below t × the matrix's
  RMS entry (``sparsity_rms_lt_{t}``, scale-free).
* **QK circuit** per query head h: M = W_Q,hᵀ W_K,g (d_model × d_model, the bilinear form of
  the attention score x_qᵀ M x_k before the 1/√d_head scale; bias terms and the rotary
  rotation left out: this is the content circuit at relative offset 0), with g = h // gqa_group
  the key/value head that serves h (grouped-query attention). Its singular values and ranks,
  and its symmetric / antisymmetric energy balance: S = (M + Mᵀ)/2, A = (M − Mᵀ)/2,
  ‖M‖² = ‖S‖² + ‖A‖², ``symmetric_energy_fraction`` = ‖S‖²/‖M‖² (1: a similarity form,
  0.5: no preference, 0: antisymmetric), and ``positive_energy_fraction`` = Σ_{λ>0}λ² / Σλ²
  over the eigenvalues λ of S. Everything is computed exactly in the 2·d_head-dimensional
  span of [W_Qᵀ W_Kᵀ] (a QR factorisation), never as a d_model × d_model product.
* **MLP neurons** — per hidden neuron j: the norms of its input rows (gate and up) and of
  its output column (down), each divided by the layer's median of that norm; r = the
  smallest of those ratios. ``dead``: r < dead_ratio; ``degenerate``: dead_ratio ≤ r <
  degenerate_ratio.
* **cross-layer similarity** — hidden units (MLP neurons, heads and their dimensions) are
  not aligned across layers, so entries of two layers' matrices cannot be compared one to
  one (the Pearson correlation of flattened weights is ≈ 0 by construction). The residual
  stream's basis *is* shared by every layer, so each matrix is compared on its residual
  side: G = WᵀW for q k v gate up (the residual is the input), G = WWᵀ for o down (the
  output), a d_model × d_model matrix that does not depend on the order or any rotation of
  the hidden units. ``gram_similarity`` of layers i and j = ⟨G̃_i, G̃_j⟩_F / (‖G̃_i‖_F ‖G̃_j‖_F)
  with G̃ = G − (tr G / d) I, the trace-free part (the isotropic part says nothing about
  directions). 1 for the same matrix up to a permutation or rotation of hidden units and a
  positive scale. Null: the same similarity after a Haar-random rotation of one layer's
  residual basis (spectra kept, alignment destroyed): mean 0, ``n_null`` seeded draws,
  computed exactly from the eigenvalues (see :func:`rotation_null`); per pair the null
  mean, its 95th percentile and the empirical p-value.
* **norm scales** — the effective per-dimension scale γ of every norm (Gemma's stored γ−1
  corrected by the adapter) across depth: mean, std, min, max, and the full vectors.
* **position structure** — for learned absolute position embeddings (GPT-2 ``wpe``, BERT
  ``position_embeddings``, a ViT's ``position_embed`` over class token + patches in raster
  order): norm by position, cosine between positions as a function of their offset, and the
  effective rank of the table. Rotary models have no position weights. T5's learned
  relative position bias (one [buckets, heads] table per stack, shared by its layers) is
  reported by shape, bucket count, maximum distance, direction, per-head norm and the bias
  each head adds as a function of the relative position key − query.

Multi-stack models (T5): block matrices carry their stack in their type (``encoder.q``),
so every per-type analysis stays within one stack; QK circuits are ``encoder.self``,
``decoder.self`` and ``decoder.cross`` (queries from the decoder stream, keys from the
encoder output: the symmetry measures compare a space with itself and are left out, NaN,
for cross circuits); norm roles are ``encoder.attn``, ``decoder.cross_attn``, ... The
``layer`` column is the index within the stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.model.adapter import ModelAdapter, qualify
from layerscope.engines.spectra import entropy_effective_rank, gram_matrix, single_thread, singular_values, stable_rank
from layerscope.engines.statistics import deterministic, empirical_p
from layerscope.engines.weights import WeightSource, base_type, parallel_map, weight_inventory
from layerscope.experiments.registry import Experiment, Figure, Job, Result

log = logging.getLogger(__name__)

DEFINITIONS = {
    "sparsity_abs_lt_t": "fraction of entries with |w| < t",
    "sparsity_rms_lt_t": "fraction of entries with |w| < t · sqrt(mean(w²)) of the same matrix",
    "qk_circuit": "M = W_Q,hᵀ W_K,g (g = h // gqa_group), no bias, no rotary rotation, no 1/√d_head scale; "
                  "circuit self (queries and keys from the same stream) or cross (T5 decoder: W_Q reads the decoder "
                  "stream, W_K the encoder output; symmetry measures NaN)",
    "relative_position_bias": "T5: a learned [num_buckets, n_heads] table per stack; the bias of head h for "
                              "relative position key − query is table[bucket(key − query), h] (bidirectional "
                              "buckets in the encoder, causal in the decoder)",
    "symmetric_energy_fraction": "‖(M + Mᵀ)/2‖_F² / ‖M‖_F²",
    "positive_energy_fraction": "Σ_{λ>0} λ² / Σ λ² over eigenvalues λ of (M + Mᵀ)/2",
    "entropy_effective_rank": "exp(H(p)), p = σ²/Σσ²; for QK circuits the ratio is to d_head (their maximal rank)",
    "neuron_ratio": "min over the neuron's input rows (gate, up) and output column (down) of norm / layer median",
    "residual_gram": "G = WᵀW (q k v gate up: residual = input) or W Wᵀ (o down: residual = output), d_model × d_model",
    "gram_similarity": "⟨G̃_i, G̃_j⟩_F / (‖G̃_i‖_F ‖G̃_j‖_F), G̃ = G − (tr G / d) I, same matrix type in layers i, j",
    "gram_similarity_null": "gram_similarity after a Haar-random rotation R of layer j's residual basis "
                            "(G̃_j → R G̃_j Rᵀ); mean 0; p = (1 + #null ≥ observed) / (1 + n_null)",
    "norm_scale": "effective γ of a norm (adapter.norm_scale: Gemma's stored γ − 1 corrected)",
    "position_offset_cosine": "mean cosine between position embeddings p_i and p_{i+Δ} over i",
}


# ---------------------------------------------------------------------------- sparsity


def _row_blocks(matrix: torch.Tensor, chunk_elements: int):
    rows = max(1, chunk_elements // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        yield matrix[start : start + rows]


def sparsity(source: WeightSource, abs_thresholds, rms_thresholds, workers: int | None = None,
             chunk_elements: int = 1 << 20) -> pd.DataFrame:
    """One row per matrix: its size and the count of entries below each threshold (streamed by row blocks)."""

    def count(w):
        m = source.matrix(w)
        sumsq = sum(float((block.double() ** 2).sum()) for block in _row_blocks(m, chunk_elements))
        rms = float(np.sqrt(sumsq / m.numel()))
        row = {"matrix": w.name, "type": w.type, "layer": w.layer, "numel": m.numel(), "rms": rms}
        cols = [(f"sparsity_abs_lt_{t:g}", t) for t in abs_thresholds]
        cols += [(f"sparsity_rms_lt_{t:g}", t * rms) for t in rms_thresholds]
        for name, _ in cols:
            row[name] = 0
        for block in _row_blocks(m, chunk_elements):
            a = block.abs().float()
            for name, threshold in cols:
                row[name] += int((a < threshold).sum())
        return row

    frame = pd.DataFrame(parallel_map(count, weight_inventory(source.adapter), workers))
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def sparsity_fractions(counts: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict]:
    """Fractions per matrix, per type (pooled entries) and over the whole model."""
    cols = [c for c in counts.columns if c.startswith("sparsity_")]
    per_matrix = counts.copy()
    per_matrix[cols] = per_matrix[cols].div(per_matrix["numel"], axis=0)
    pooled = counts.groupby("type", sort=False)[cols + ["numel"]].sum()
    by_type = {t: {c: float(pooled.loc[t, c] / pooled.loc[t, "numel"]) for c in cols} for t in pooled.index}
    total = counts["numel"].sum()
    overall = {c: float(counts[c].sum() / total) for c in cols}
    return per_matrix, by_type, overall


# ---------------------------------------------------------------------------- QK circuits


def qk_circuit(w_q: torch.Tensor, w_k: torch.Tensor, *, same_space: bool = True) -> dict:
    """Spectrum and symmetry of M = w_qᵀ w_k for one head (w_q, w_k: [d_head, d_model]).

    ``same_space=False`` (a cross-attention circuit: queries and keys read different streams)
    leaves the symmetry measures out (NaN): the transpose of M pairs unrelated coordinates.

    With C = [w_qᵀ w_kᵀ] = Q R (reduced QR, R = [R_q R_k]), M = Q (R_q R_kᵀ) Qᵀ: the small
    matrix M' = R_q R_kᵀ has M's nonzero singular values, Frobenius norms of M, of its
    symmetric and antisymmetric parts, and the nonzero eigenvalues of the symmetric part.
    """
    wq = torch.as_tensor(w_q).detach().to(torch.float64)
    wk = torch.as_tensor(w_k).detach().to(torch.float64)
    head_dim = wq.shape[0]
    r = torch.linalg.qr(torch.cat([wq.T, wk.T], dim=1), mode="r").R
    small = r[:, :head_dim] @ r[:, head_dim:].T
    sym = (small + small.T) / 2
    total = float((small**2).sum())
    sym_energy = float((sym**2).sum())
    sv = torch.linalg.svdvals(small).numpy()[: min(head_dim, wq.shape[1])]
    eig = torch.linalg.eigvalsh(sym).numpy()
    tol = 1e-9 * max(1e-300, float(np.abs(eig).max(initial=0.0)))
    pos, neg = eig[eig > tol], eig[eig < -tol]
    eig_energy = float((eig**2).sum())
    erank = entropy_effective_rank(sv)
    if not same_space:
        nan = float("nan")
        return {
            "singular_values": sv, "sym_eigenvalues": np.zeros(0), "entropy_effective_rank": erank,
            "entropy_effective_rank_ratio": erank / head_dim, "stable_rank": stable_rank(sv),
            "spectral_norm": float(sv.max()) if sv.size else 0.0, "frobenius_norm": float(np.sqrt(total)),
            "symmetric_energy_fraction": nan, "antisymmetric_energy_fraction": nan, "positive_energy_fraction": nan,
            "n_positive_eigenvalues": -1, "n_negative_eigenvalues": -1,
        }
    return {
        "singular_values": sv,
        "sym_eigenvalues": eig[::-1],
        "entropy_effective_rank": erank,
        "entropy_effective_rank_ratio": erank / head_dim,
        "stable_rank": stable_rank(sv),
        "spectral_norm": float(sv.max()) if sv.size else 0.0,
        "frobenius_norm": float(np.sqrt(total)),
        "symmetric_energy_fraction": sym_energy / total if total > 0 else float("nan"),
        "antisymmetric_energy_fraction": 1 - sym_energy / total if total > 0 else float("nan"),
        "positive_energy_fraction": float((pos**2).sum() / eig_energy) if eig_energy > 0 else float("nan"),
        "n_positive_eigenvalues": int(len(pos)),
        "n_negative_eigenvalues": int(len(neg)),
    }


QK_METRICS = ("entropy_effective_rank", "entropy_effective_rank_ratio", "stable_rank", "spectral_norm",
              "frobenius_norm", "symmetric_energy_fraction", "antisymmetric_energy_fraction",
              "positive_energy_fraction", "n_positive_eigenvalues", "n_negative_eigenvalues")


def qk_circuits(adapter: ModelAdapter, workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (circuit, layer, query head): the circuit's metrics; and its singular values (long).

    ``circuit`` is ``self`` (single-stack models) or ``{stack}.self`` / ``decoder.cross`` (T5);
    ``layer`` is the block's index within its stack.
    """
    f = adapter.facts
    hd, group = f.head_dim, f.gqa_group

    def block_circuits(block):
        proj = adapter.projections(block)
        stack, layer = adapter.block_site(block)
        rows, spectra = [], []
        for circuit, q_type, k_type in adapter.qk_pairs(block):
            name = qualify(stack, circuit)
            for head in range(f.n_heads):
                kv = head // group
                out = qk_circuit(proj[q_type][head * hd : (head + 1) * hd], proj[k_type][kv * hd : (kv + 1) * hd],
                                 same_space=circuit == "self")
                rows.append({"circuit": name, "layer": layer, "head": head, "kv_head": kv,
                             **{m: out[m] for m in QK_METRICS}})
                sv = out["singular_values"]
                spectra.append(pd.DataFrame({"circuit": name, "layer": layer, "head": head,
                                             "index": np.arange(len(sv), dtype=np.int32), "singular_value": sv}))
        return rows, spectra

    results = parallel_map(block_circuits, range(adapter.n_layers), workers)
    rows = [r for block_rows, _ in results for r in block_rows]
    spectra = [s for _, block_spectra in results for s in block_spectra]
    return pd.DataFrame(rows), pd.concat(spectra, ignore_index=True)


# ---------------------------------------------------------------------------- MLP neurons


def mlp_neurons(adapter: ModelAdapter, dead_ratio: float, degenerate_ratio: float,
                workers: int | None = None) -> pd.DataFrame:
    """One row per (layer, hidden neuron): input/output norms, their ratios to the layer median, status."""
    if dead_ratio > degenerate_ratio:
        raise LayerscopeError(f"weight_topology: dead_ratio ({dead_ratio}) must not exceed degenerate_ratio "
                              f"({degenerate_ratio})")

    def layer_neurons(block):
        proj = adapter.projections(block)
        stack, layer = adapter.block_site(block)
        norms = {}
        for t in ("gate", "up"):
            if t in proj:
                norms[f"{t}_norm"] = torch.linalg.vector_norm(proj[t].double(), dim=1).numpy()
        norms["down_norm"] = torch.linalg.vector_norm(proj["down"].double(), dim=0).numpy()
        frame = pd.DataFrame(norms)
        ratios = []
        for col in list(norms):
            median = float(np.median(frame[col]))
            ratio = frame[col] / median if median > 0 else pd.Series(np.zeros(len(frame)))
            frame[col.replace("_norm", "_ratio")] = ratio
            ratios.append(ratio.to_numpy())
        frame["ratio"] = np.min(np.vstack(ratios), axis=0)
        frame["status"] = np.where(frame["ratio"] < dead_ratio, "dead",
                                   np.where(frame["ratio"] < degenerate_ratio, "degenerate", "ok"))
        frame.insert(0, "neuron", np.arange(len(frame), dtype=np.int32))
        frame.insert(0, "layer", layer)
        frame.insert(0, "stack", stack)  # "" for single-stack models
        return frame

    return pd.concat(parallel_map(layer_neurons, range(adapter.n_layers), workers), ignore_index=True)


# ---------------------------------------------------------------------------- cross-layer similarity

# the side of each block projection ([out, in]) that lives in the residual stream
# (T5 cross-attention: cross_q reads the decoder stream, cross_k / cross_v the encoder output — the encoder's
# residual basis after its final norm — and cross_o writes the decoder stream)
RESIDUAL_SIDE = {"q": "in", "k": "in", "v": "in", "gate": "in", "up": "in", "o": "out", "down": "out",
                 "cross_q": "in", "cross_k": "in", "cross_v": "in", "cross_o": "out"}


def residual_gram(matrix: torch.Tensor, side: str, chunk_elements: int = 1 << 20) -> torch.Tensor:
    """The residual-side Gram matrix in float64: WᵀW when the residual is W's input, WWᵀ when it is its output.

    It sums over the hidden units (neurons, head dimensions), so it does not depend on their order or
    on any orthogonal change of basis among them. Accumulated by blocks of hidden units.
    """
    m = torch.as_tensor(matrix).detach()
    hidden_major = m if side == "in" else m.T  # [hidden, d_model]
    return gram_matrix(hidden_major, chunk_rows=max(1, chunk_elements // max(1, hidden_major.shape[1])))


def traceless(gram: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """G − (tr G / d) I and its eigenvalues (those of G minus their mean)."""
    d = gram.shape[0]
    shifted = gram - torch.trace(gram) / d * torch.eye(d, dtype=gram.dtype)
    return shifted, torch.linalg.eigvalsh(shifted).cpu().numpy()


def gram_similarity_matrix(grams: list[torch.Tensor], chunk_elements: int = 1 << 20) -> np.ndarray:
    """⟨G̃_i, G̃_j⟩_F / (‖G̃_i‖_F ‖G̃_j‖_F) for all pairs of trace-free Gram matrices G̃ (float64 sums)."""
    n = len(grams)
    flat = [g.reshape(-1) for g in grams]
    size = flat[0].numel()
    step = max(1, chunk_elements // max(1, n))
    inner = torch.zeros((n, n), dtype=torch.float64)
    with single_thread():  # the same sums whatever the thread count
        for start in range(0, size, step):
            block = torch.stack([f[start : start + step].to(torch.float64) for f in flat])
            inner += block @ block.T
    scale = np.sqrt(np.clip(np.diag(inner.numpy()), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return inner.numpy() / np.outer(scale, scale)


def haar_squares(d: int, n: int, *, seed: int, workers: int | None = None) -> list[np.ndarray]:
    """n matrices Q∘Q (entrywise squares) of Haar-random orthogonal d × d matrices Q, seeded."""

    def draw(i):
        g = torch.from_numpy(np.random.default_rng([int(seed), 0xC105, int(d), int(i)]).standard_normal((d, d)))
        q, r = torch.linalg.qr(g)
        return ((q * torch.sign(torch.diagonal(r))) ** 2).numpy()  # the sign fix makes Q Haar-distributed

    return parallel_map(draw, range(int(n)), workers)


def rotation_null(eigenvalues: np.ndarray, squares: list[np.ndarray]) -> np.ndarray:
    """The similarity of every pair of layers after a Haar-random rotation R of one layer's residual basis.

    For G̃_i = U Λ Uᵀ and G̃_j = V M Vᵀ, ⟨G̃_i, R G̃_j Rᵀ⟩ = Σ_ab λ_a (Q_ab)² μ_b with Q = Uᵀ R V, itself
    Haar-distributed when R is: one draw of Q∘Q gives the rotated similarity of every pair from the
    eigenvalues alone. ``eigenvalues``: [n_layers, d] of the trace-free Grams. Returns
    [n_draws, n_layers, n_layers]. The null mean is 0 (E[Q∘Q] = 11ᵀ/d and Σλ = 0).
    """
    lam = np.asarray(eigenvalues, dtype=float)
    norms = np.linalg.norm(lam, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = lam / norms[:, None]
    return np.stack([unit @ sq @ unit.T for sq in squares])


@dataclass
class CrossLayer:
    similarity: np.ndarray  # [n_layers, n_layers] residual Gram similarity
    null: np.ndarray  # [n_null, n_layers, n_layers] the same after a random rotation of one layer's residual basis
    layers: list[int]


def cross_layer(source: WeightSource, chunk_elements: int = 1 << 20, workers: int | None = None, *,
                n_null: int = 200, seed: int = 0) -> dict[str, CrossLayer]:
    """Per block type: the layers × layers residual Gram similarity and its random-rotation null."""
    adapter = source.adapter
    d = adapter.facts.d_model
    inventory = [w for w in weight_inventory(adapter) if w.layer is not None and base_type(w.type) in RESIDUAL_SIDE]
    groups = {}
    for mtype in dict.fromkeys(w.type for w in inventory):  # types carry their stack: one stack per group
        group = sorted((w for w in inventory if w.type == mtype), key=lambda w: w.layer)
        if len(group) >= 2:
            groups[mtype] = group
    if not groups:
        return {}

    def layer_gram(w):
        m = source.matrix(w)
        side = RESIDUAL_SIDE[base_type(w.type)]
        if (m.shape[1] if side == "in" else m.shape[0]) != d:
            raise LayerscopeError(f"weight_topology: {w.name} {tuple(m.shape)} has no residual side of size {d}")
        shifted, eig = traceless(residual_gram(m, side, chunk_elements))
        return shifted.to(torch.float32), eig  # float32 storage: L·d² values per type, summed in float64

    squares = haar_squares(d, n_null, seed=seed, workers=workers) if n_null > 0 else []
    out = {}
    for mtype, group in groups.items():
        grams, eigs = zip(*parallel_map(layer_gram, group, workers))
        eig = np.stack(eigs)
        null = rotation_null(eig, squares) if squares else np.zeros((0, len(group), len(group)))
        out[mtype] = CrossLayer(gram_similarity_matrix(list(grams), chunk_elements), null, [w.layer for w in group])
    return out


# ---------------------------------------------------------------------------- norm scales


def norm_scales(adapter: ModelAdapter) -> pd.DataFrame:
    """Every norm's effective γ per dimension (and β where the norm has a bias): long table.

    Roles carry the stack in multi-stack models (``decoder.cross_attn``); DINOv2's layer scales
    (``attn_layer_scale``, ``mlp_layer_scale``: per-dimension factors on the sub-layer outputs) are
    listed with γ = their λ.
    """
    entries = []
    model_norms = adapter.model_norms()
    entries += [(None, role, norm) for role, norm in model_norms if role == "embed"]
    for block in range(adapter.n_layers):
        stack, layer = adapter.block_site(block)
        for role, norm in adapter.block_norms(block).items():
            entries.append((layer, qualify(stack, role), norm))
    entries += [(None, role, norm) for role, norm in model_norms if role != "embed"]
    frames = []
    for layer, role, norm in entries:
        gamma = adapter.norm_scale(norm)
        if gamma is None:
            continue
        gamma = gamma.double().numpy()
        bias = getattr(norm, "bias", None)
        frames.append(pd.DataFrame({
            "layer": layer, "role": role, "dim": np.arange(len(gamma), dtype=np.int32), "gamma": gamma,
            "beta": bias.detach().double().numpy() if bias is not None else np.nan,
        }))
    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def norm_scale_stats(scales: pd.DataFrame) -> pd.DataFrame:
    grouped = scales.groupby(["role", "layer"], sort=False, dropna=False)
    stats = grouped["gamma"].agg(["mean", "std", "min", "max"]).reset_index()
    stats["abs_mean"] = grouped["gamma"].apply(lambda g: g.abs().mean()).to_numpy()
    stats["argmax_abs_dim"] = grouped.apply(lambda g: int(g["dim"].to_numpy()[np.argmax(g["gamma"].abs().to_numpy())]),
                                            include_groups=False).to_numpy()
    return stats


# ---------------------------------------------------------------------------- position structure


def position_structure(table: torch.Tensor, offsets_reported=(1, 2, 4, 8, 16, 32, 64)) -> tuple:
    """Structure of a learned absolute position table [n_positions, d_model].

    Returns (stats, offset-cosine curve, norm per position, cosine matrix).
    """
    p = torch.as_tensor(table).detach().to(torch.float64)
    n = p.shape[0]
    norms = torch.linalg.vector_norm(p, dim=1)
    unit = p / norms.clamp_min(1e-300)[:, None]
    cos = (unit @ unit.T).numpy()
    offset_cos = np.array([np.diagonal(cos, offset=k).mean() for k in range(1, n)])
    centered = p - p.mean(dim=0, keepdim=True)
    s = singular_values(centered)
    first = offset_cos[0] if len(offset_cos) else float("nan")
    below = np.nonzero(offset_cos < first / 2)[0] if len(offset_cos) else np.array([])
    stats = {
        "n_positions": int(n),
        "norm_mean": float(norms.mean()),
        "norm_first": float(norms[0]),
        "norm_last": float(norms[-1]),
        "adjacent_cosine": float(first),
        **{f"offset_cosine_{k}": float(offset_cos[k - 1]) for k in offsets_reported if k < n},
        "half_similarity_offset": int(below[0] + 1) if len(below) else None,
        "centered_entropy_effective_rank": entropy_effective_rank(s),
        "centered_entropy_effective_rank_ratio": entropy_effective_rank(s) / min(p.shape),
    }
    curve = pd.DataFrame({"offset": np.arange(1, n, dtype=np.int32), "mean_cosine": offset_cos})
    return stats, curve, norms.numpy(), cos


def relative_position_bias(table: torch.Tensor, *, bidirectional: bool, max_distance: int,
                           max_offset: int | None = None) -> tuple[dict, pd.DataFrame]:
    """A T5 relative position bias table [num_buckets, n_heads]: its facts, and the bias of every head
    for every relative position key − query in [−max_offset, max_offset] (default: 2 × max_distance)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    t = torch.as_tensor(table).detach().to(torch.float64)
    n_buckets, n_heads = t.shape
    span = 2 * max_distance if max_offset is None else max_offset
    offsets = torch.arange(-span, span + 1)
    buckets = T5Attention._relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=n_buckets,
                                                    max_distance=max_distance)
    curve = pd.DataFrame({"offset": np.repeat(offsets.numpy(), n_heads).astype(np.int32),
                          "head": np.tile(np.arange(n_heads, dtype=np.int32), len(offsets)),
                          "bucket": np.repeat(buckets.numpy(), n_heads).astype(np.int32),
                          "bias": t[buckets].reshape(-1).numpy()})
    head_norms = torch.linalg.vector_norm(t, dim=0)
    stats = {
        "shape": [int(n_buckets), int(n_heads)],
        "num_buckets": int(n_buckets),
        "max_distance": int(max_distance),
        "bidirectional": bool(bidirectional),
        "head_norm": [float(v) for v in head_norms],
        "head_norm_mean": float(head_norms.mean()),
        "frobenius_norm": float(torch.linalg.vector_norm(t)),
        "bias_range": [float(t.min()), float(t.max())],
        "buckets_used": sorted(int(b) for b in set(buckets.tolist())),
    }
    return stats, curve


CROSS_LAYER_METRICS = ("gram_similarity", "null_mean", "null_q95", "p_value")


def cross_layer_table(similarities: dict[str, CrossLayer]) -> pd.DataFrame:
    """One row per ordered pair of distinct layers of one type: similarity and its rotation null."""
    rows = []
    for mtype, c in similarities.items():
        n = len(c.layers)
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                observed = float(c.similarity[i, j])
                draws = c.null[:, i, j]
                rows.append((mtype, c.layers[i], c.layers[j], observed, float(draws.mean()),
                             float(np.quantile(draws, 0.95)), empirical_p(observed, draws)))
    return pd.DataFrame(rows, columns=["type", "layer_i", "layer_j", *CROSS_LAYER_METRICS])


# ---------------------------------------------------------------------------- the experiment


@dataclass
class TopologyResult:
    metrics: pd.DataFrame  # tidy long: model, analysis, type, layer, index, metric, value
    sparsity: pd.DataFrame
    qk: pd.DataFrame
    qk_spectra: pd.DataFrame
    neurons: pd.DataFrame
    cross_layer: pd.DataFrame
    norm_scales: pd.DataFrame
    position: pd.DataFrame
    summary: dict
    similarities: dict  # type -> layers × layers residual Gram similarity (for the figure)
    position_tables: dict  # name -> (norms, cosine matrix) (for the figure)
    relative_biases: dict = None  # name -> bias by relative position and head (T5; for the figure)


def _tidy(analysis: str, frame: pd.DataFrame, metrics, *, type_col: str | None = None, type_value: str = "",
          layer_col: str | None = "layer", index_col: str | None = None, matrix_col: str | None = None) -> pd.DataFrame:
    """Rows of ``frame`` × ``metrics`` in the experiment's tidy format."""
    n = len(frame)

    def ints(col):
        return (frame[col].astype("Int64") if col else pd.Series(pd.array([pd.NA] * n, dtype="Int64"))).to_numpy()

    base = pd.DataFrame({
        "analysis": analysis,
        "matrix": frame[matrix_col].astype(str).to_numpy() if matrix_col else "",
        "type": frame[type_col].astype(str).to_numpy() if type_col else type_value,
        "layer": pd.array(ints(layer_col), dtype="Int64"),
        "index": pd.array(ints(index_col), dtype="Int64"),
    })
    parts = [base.assign(metric=m, value=frame[m].astype(float).to_numpy()) for m in metrics]
    return pd.concat(parts, ignore_index=True) if parts else base.assign(metric="", value=np.nan).iloc[:0]


def weight_topology(
    adapter: ModelAdapter,
    *,
    model: str,
    abs_thresholds=(1e-4, 1e-3, 1e-2, 1e-1),
    rms_thresholds=(0.01, 0.1),
    dead_ratio: float = 0.01,
    degenerate_ratio: float = 0.1,
    chunk_elements: int = 1 << 20,
    workers: int | None = None,
    n_null: int = 200,
    seed: int = 0,
) -> TopologyResult:
    f = adapter.facts
    source = WeightSource(adapter)

    log.info("sparsity")
    counts = sparsity(source, abs_thresholds, rms_thresholds, workers, chunk_elements)
    per_matrix, sparsity_by_type, sparsity_overall = sparsity_fractions(counts)
    sparsity_cols = [c for c in per_matrix.columns if c.startswith("sparsity_")]

    log.info("QK circuits (%d blocks x %d heads)", adapter.n_layers, f.n_heads)
    qk, qk_spectra = qk_circuits(adapter, workers)

    log.info("MLP neurons")
    neurons = mlp_neurons(adapter, dead_ratio, degenerate_ratio, workers)
    per_layer_neurons = neurons.groupby(["stack", "layer"], sort=False)["status"].value_counts().unstack(fill_value=0)
    for status in ("dead", "degenerate", "ok"):
        if status not in per_layer_neurons:
            per_layer_neurons[status] = 0
    per_layer_neurons = per_layer_neurons.reset_index()
    per_layer_neurons["type"] = [qualify(st, "mlp") for st in per_layer_neurons["stack"]]

    log.info("cross-layer residual Gram similarity (%d random rotations)", n_null)
    similarities = cross_layer(source, chunk_elements, workers, n_null=n_null, seed=seed)
    corr_frame = cross_layer_table(similarities)

    log.info("norm scales and position structure")
    scales = norm_scales(adapter)
    scale_stats = norm_scale_stats(scales)
    position_rows, position_stats, position_tables = [], {}, {}
    for w in weight_inventory(adapter):
        if w.type != "position_embed":
            continue
        stats, curve, norms, cos = position_structure(source.matrix(w))
        position_stats[w.name] = stats
        position_tables[w.name] = (norms, cos, curve)
        curve.insert(0, "matrix", w.name)
        position_rows.append(curve)
    relative_stats, relative_curves = {}, {}
    for w in weight_inventory(adapter):
        if w.type != "relative_bias":
            continue
        stack = w.name.split(".")[0]
        relative_stats[w.name], relative_curves[w.name] = relative_position_bias(
            source.matrix(w), bidirectional=stack != "decoder",
            max_distance=int(getattr(adapter.config, "relative_attention_max_distance", 128)))
    position = (pd.concat(position_rows, ignore_index=True) if position_rows
                else pd.DataFrame({"matrix": pd.Series(dtype=str), "offset": pd.Series(dtype=np.int32),
                                   "mean_cosine": pd.Series(dtype=float)}))

    # tidy metrics table
    # tidy table: analysis, matrix, type, layer, index (head / paired layer), metric, value
    parts = [
        _tidy("sparsity", per_matrix, sparsity_cols, type_col="type", matrix_col="matrix"),
        _tidy("qk_circuit", qk.assign(qk_type=["qk" if c == "self" else f"qk.{c}" for c in qk["circuit"]]),
              QK_METRICS, type_col="qk_type", index_col="head"),
        _tidy("mlp_neurons", per_layer_neurons, ["dead", "degenerate", "ok"], type_col="type"),
        _tidy("cross_layer_gram_similarity", corr_frame, list(CROSS_LAYER_METRICS), type_col="type",
              layer_col="layer_i", index_col="layer_j"),
        _tidy("norm_scale", scale_stats, ["mean", "std", "min", "max", "abs_mean"], type_col="role"),
    ]
    for name, stats in position_stats.items():
        frame = pd.DataFrame([{k: (np.nan if v is None else float(v)) for k, v in stats.items()}])
        parts.append(_tidy("position", frame.assign(matrix=name), list(stats), type_value="position_embed",
                           layer_col=None, matrix_col="matrix"))
    for w in weight_inventory(adapter):  # one row per (bucket, head): the learned bias itself
        if w.type == "relative_bias":
            table = source.matrix(w).double().numpy()
            heads = [f"bias_head_{h}" for h in range(table.shape[1])]
            frame = pd.DataFrame(table, columns=heads).assign(matrix=w.name, bucket=np.arange(len(table)))
            parts.append(_tidy("relative_position_bias", frame, heads, type_value="relative_bias", layer_col=None,
                               index_col="bucket", matrix_col="matrix"))
    metrics = pd.concat(parts, ignore_index=True)
    metrics.insert(0, "model", model)

    summary = _summary(
        adapter, model=model, sparsity_by_type=sparsity_by_type, sparsity_overall=sparsity_overall, qk=qk,
        neurons=neurons, per_layer_neurons=per_layer_neurons, similarities=similarities, cross_frame=corr_frame,
        scale_stats=scale_stats, position_stats=position_stats, relative_stats=relative_stats,
        params={"abs_thresholds": list(abs_thresholds), "rms_thresholds": list(rms_thresholds),
                "dead_ratio": dead_ratio, "degenerate_ratio": degenerate_ratio, "n_null": n_null, "seed": seed},
    )
    for frame in (per_matrix, qk, qk_spectra, neurons, corr_frame, scales, position):
        frame.insert(0, "model", model)
    return TopologyResult(metrics, per_matrix, qk, qk_spectra, neurons, corr_frame, scales, position, summary,
                          {t: c.similarity for t, c in similarities.items()}, position_tables, relative_curves)


def _offdiag(corr: np.ndarray, k: int | None = None) -> np.ndarray:
    n = corr.shape[0]
    if k is not None:
        return np.diagonal(corr, offset=k)
    return corr[~np.eye(n, dtype=bool)]


def _pair(row) -> dict:
    return {"layers": [int(row["layer_i"]), int(row["layer_j"])], "similarity": float(row["gram_similarity"]),
            "null_q95": float(row["null_q95"]), "p_value": float(row["p_value"])}


def _summary(adapter, *, model, sparsity_by_type, sparsity_overall, qk, neurons, per_layer_neurons, similarities,
             cross_frame, scale_stats, position_stats, params, relative_stats=None) -> dict:
    f = adapter.facts
    n_neurons = len(neurons)
    qk_sorted = qk[qk["symmetric_energy_fraction"].notna()].sort_values("symmetric_energy_fraction")  # self circuits
    cross = {}
    n_null = params["n_null"]
    adjacent_all = cross_frame[cross_frame["layer_j"] == cross_frame["layer_i"] + 1]
    floor = 1 / (1 + n_null)  # the smallest p-value the null can give: above every rotated draw
    for mtype, c in similarities.items():
        adjacent = adjacent_all[adjacent_all["type"] == mtype].sort_values("gram_similarity")
        upper = cross_frame[(cross_frame["type"] == mtype) & (cross_frame["layer_j"] > cross_frame["layer_i"])]
        cross[mtype] = {
            "adjacent_mean": float(adjacent["gram_similarity"].mean()),
            "all_pairs_mean": float(upper["gram_similarity"].mean()),
            "adjacent_null_q95_mean": float(adjacent["null_q95"].mean()),
            "n_adjacent": int(len(adjacent)),
            "n_adjacent_above_null": int((adjacent["p_value"] <= floor + 1e-12).sum()),
            "strongest_adjacent": _pair(adjacent.iloc[-1]),
            "weakest_adjacent": _pair(adjacent.iloc[0]),
        }
    all_block_scales = scale_stats[scale_stats["layer"].notna()]
    norms = {}
    for role, group in all_block_scales.groupby("role", sort=False):
        group = group.sort_values("layer")
        norms[role] = {"mean_by_layer": [float(v) for v in group["mean"]],
                       "max_by_layer": [float(v) for v in group["max"]]}
    for _, row in scale_stats[scale_stats["layer"].isna()].iterrows():  # embed, final (T5: one per stack)
        norms[row["role"]] = {k: float(row[k]) for k in ("mean", "std", "min", "max")}
    # DINOv2's layer scales are reported with the norms but are not norms: the norm-scale headlines leave them out
    block_scales = all_block_scales[~all_block_scales["role"].str.endswith("layer_scale")]
    summary = {
        "model": model,
        "n_layers": adapter.n_layers,
        "family": f.family,
        "kind": f.kind,
        "stacks": f.stacks,
        "position": f.position,
    }
    summary.update(sparsity_overall)
    summary.update({
        "qk_heads": int(len(qk)),
        "qk_symmetric_energy_fraction_mean": float(qk["symmetric_energy_fraction"].mean()),
        "qk_positive_energy_fraction_mean": float(qk["positive_energy_fraction"].mean()),
        "qk_entropy_effective_rank_ratio_mean": float(qk["entropy_effective_rank_ratio"].mean()),
        "qk_most_symmetric_head": _head_name(qk_sorted.iloc[-1]),
        "qk_most_antisymmetric_head": _head_name(qk_sorted.iloc[0]),
        "mlp_neurons": int(n_neurons),
        "mlp_dead_neurons": int((neurons["status"] == "dead").sum()),
        "mlp_degenerate_neurons": int((neurons["status"] == "degenerate").sum()),
        "mlp_dead_fraction": float((neurons["status"] == "dead").mean()) if n_neurons else None,
        "cross_layer_adjacent_gram_similarity_mean": (float(np.mean([c["adjacent_mean"] for c in cross.values()]))
                                                      if cross else None),
        "cross_layer_all_pairs_gram_similarity_mean": (float(np.mean([c["all_pairs_mean"] for c in cross.values()]))
                                                       if cross else None),
        "cross_layer_adjacent_null_q95_mean": float(adjacent_all["null_q95"].mean()) if cross else None,
        "cross_layer_adjacent_above_null_fraction": (float((adjacent_all["p_value"] <= floor + 1e-12).mean())
                                                     if cross else None),
    })
    for mtype, info in cross.items():
        summary[f"cross_layer_adjacent_gram_similarity_{mtype.replace('.', '_')}"] = info["adjacent_mean"]
    if len(block_scales):
        first = block_scales[block_scales["layer"] == block_scales["layer"].min()]
        last = block_scales[block_scales["layer"] == block_scales["layer"].max()]
        summary["norm_scale_mean_first_layer"] = float(first["mean"].mean())
        summary["norm_scale_mean_last_layer"] = float(last["mean"].mean())
        summary["norm_scale_max"] = float(block_scales["max"].max())
    if "final" in norms:
        summary["final_norm_scale_mean"] = norms["final"]["mean"]
    for name, stats in position_stats.items():
        for key in ("adjacent_cosine", "half_similarity_offset", "centered_entropy_effective_rank_ratio"):
            summary[f"{name}_{key}"] = stats[key]
    summary.update({
        "sparsity_by_type": sparsity_by_type,
        # per block in model order (T5: encoder self, then per decoder block its self and cross circuits)
        "qk_by_layer": {
            "symmetric_energy_fraction": [float(v) for v in qk.groupby(["circuit", "layer"], sort=False)[
                "symmetric_energy_fraction"].mean()],
            "entropy_effective_rank_ratio": [float(v) for v in qk.groupby(["circuit", "layer"], sort=False)[
                "entropy_effective_rank_ratio"].mean()],
        },
        "qk_by_circuit": {
            circuit: {
                "n_heads": int(len(group)),
                "layers": [int(v) for v in group["layer"].unique()],
                "spectral_norm_mean": float(group["spectral_norm"].mean()),
                "entropy_effective_rank_ratio_mean": float(group["entropy_effective_rank_ratio"].mean()),
                "entropy_effective_rank_ratio_by_layer": [
                    float(v) for v in group.groupby("layer", sort=False)["entropy_effective_rank_ratio"].mean()],
                "symmetric_energy_fraction_mean": (float(group["symmetric_energy_fraction"].mean())
                                                   if group["symmetric_energy_fraction"].notna().any() else None),
            }
            for circuit, group in qk.groupby("circuit", sort=False)
        },
        "mlp_by_layer": {
            "dead": [int(v) for v in per_layer_neurons["dead"]],
            "degenerate": [int(v) for v in per_layer_neurons["degenerate"]],
        },
        "cross_layer": cross,
        "cross_layer_null": {
            "method": "Haar-random orthogonal rotation of one layer's residual basis (spectra kept, alignment "
                      "with the shared residual basis destroyed); exact from the eigenvalues",
            "n_null": n_null, "seed": params["seed"], "mean": 0.0,
        },
        "norm_scales": norms,
        "position_embeddings": position_stats,
        "relative_position_bias": relative_stats or {},
        "definitions": DEFINITIONS,
        "params": params,
        **deterministic("the weights"),
    })
    return summary


def _head_name(row) -> str:
    circuit = row.get("circuit", "self")
    prefix = "" if circuit == "self" else f"{circuit}."
    return f"{prefix}L{int(row['layer'])}.H{int(row['head'])}"


# ---------------------------------------------------------------------------- figures


def plot_qk(result: TopologyResult, path: str | Path) -> None:
    import matplotlib as mpl

    from layerscope.report.plotting import figure, save

    qk, spectra = result.qk, result.qk_spectra
    n_layers = int(qk["layer"].max()) + 1
    circuits = list(dict.fromkeys(qk["circuit"]))
    cmap = mpl.colormaps["viridis"]
    with figure(1, 3, width=12.5, height=3.9) as (fig, axes):
        for (layer, head), group in spectra.groupby(["layer", "head"], sort=False):
            values = group["singular_value"].to_numpy()
            top = values[0] if values.size and values[0] > 0 else 1.0
            axes[0].plot(group["index"], values / top, color=cmap(layer / max(1, n_layers - 1)), linewidth=0.6,
                         alpha=0.6)
        axes[0].set_yscale("log")
        axes[0].set_xlabel("singular value index")
        axes[0].set_ylabel("σ_i / σ_1 of W_Qᵀ W_K (per head)")
        axes[0].set_title("QK circuit spectra (colour: layer 0 → last)")
        for ax, metric, title, kwargs in (
            (axes[1], "symmetric_energy_fraction", "symmetric energy ‖S‖²/‖M‖²", dict(cmap="RdBu_r", vmin=0, vmax=1)),
            (axes[2], "entropy_effective_rank_ratio", "effective rank / d_head", dict(cmap="viridis", vmin=0)),
        ):
            # one band of rows per circuit (T5: encoder.self, decoder.self, decoder.cross), layers upward
            pivots = [qk[qk["circuit"] == c].pivot(index="layer", columns="head", values=metric) for c in circuits]
            grid = np.vstack([pv.to_numpy(dtype=float) for pv in pivots])
            image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", **kwargs)
            ax.set_xlabel("query head")
            if len(circuits) > 1:
                labels = [f"{c} {layer}" for c, pv in zip(circuits, pivots) for layer in pv.index]
                ax.set_yticks(range(len(labels)), labels, fontsize="x-small")
                edges = np.cumsum([len(pv) for pv in pivots])[:-1] - 0.5
                for edge in edges:
                    ax.axhline(edge, color="white", linewidth=1.5)
            else:
                ax.set_ylabel("layer")
            ax.set_title(title)
            ax.grid(False)
            fig.colorbar(image, ax=ax)
        cross = "; cross circuits: no symmetry (blank)" if any(c.endswith("cross") for c in circuits) else ""
        fig.suptitle(f"QK circuits — {result.summary['model']} ({result.summary['qk_heads']} heads; "
                     f"mean symmetric fraction {result.summary['qk_symmetric_energy_fraction_mean']:.3f}, 0.5 = none"
                     f"{cross})")
        save(fig, path)


def plot_cross_layer(result: TopologyResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    types = list(result.similarities)
    ncols = max(1, min(4, len(types)))
    nrows = max(1, int(np.ceil(len(types) / ncols)))
    with figure(nrows, ncols, width=3.0 * ncols + 0.8, height=2.8 * nrows + 0.5) as (fig, axes):
        axes = np.atleast_1d(axes).ravel()
        image = None
        # the diagonal (= 1) is left blank so the off-diagonal structure gets the whole colour range
        scale = max([0.05] + [float(np.nanmax(np.abs(_offdiag(c)))) for c in result.similarities.values()])
        for ax, mtype in zip(axes, types):
            shown = result.similarities[mtype].copy()
            np.fill_diagonal(shown, np.nan)
            image = ax.imshow(shown, vmin=-scale, vmax=scale, cmap="RdBu_r", origin="lower",
                              interpolation="nearest")
            info = result.summary["cross_layer"][mtype]
            ax.set_title(f"{mtype}: adjacent {info['adjacent_mean']:+.3f} (null q95 {info['adjacent_null_q95_mean']:.3f})",
                         fontsize="small")
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            ax.grid(False)
        for ax in axes[len(types):]:
            ax.set_visible(False)
        if image is not None:
            fig.colorbar(image, ax=axes[len(types) - 1], label="residual Gram similarity")
        else:
            axes[0].text(0.5, 0.5, "fewer than two layers: no cross-layer pairs", ha="center", va="center")
        fig.suptitle(f"cross-layer similarity of same-type weights on the shared residual side — "
                     f"{result.summary['model']} (trace-free Gram cosine; random-rotation null mean 0; "
                     "diagonal = 1 left blank)")
        save(fig, path)


def plot_norm_scales(result: TopologyResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    scales = result.norm_scales
    blocks = scales[scales["layer"].notna()]
    n_layers = result.summary["n_layers"]
    with figure(1, 2, width=11.0, height=3.8) as (fig, axes):
        roles = list(dict.fromkeys(blocks["role"]))
        for k, role in enumerate(roles):
            g = blocks[blocks["role"] == role].groupby("layer")["gamma"]
            x = np.array(sorted(g.groups), dtype=int)
            color = PALETTE[k % len(PALETTE)]
            axes[0].plot(x, g.mean().to_numpy(), marker="o", markersize=2.5, color=color, label=f"{role} (mean γ)")
            axes[0].fill_between(x, g.min().to_numpy(), g.max().to_numpy(), color=color, alpha=0.12)
        final = scales[scales["role"] == "final"]
        if len(final):
            axes[0].errorbar([n_layers], [final["gamma"].mean()], yerr=[[final["gamma"].mean() - final["gamma"].min()],
                             [final["gamma"].max() - final["gamma"].mean()]], fmt="s", color="black",
                             label="final norm")
        axes[0].set_xlabel("layer (block index; final norm at the right)")
        axes[0].set_ylabel("γ (band: min–max over dimensions)")
        axes[0].legend(loc="best")
        if roles:
            first = blocks[blocks["role"] == roles[0]]
            grid = first.pivot(index="layer", columns="dim", values="gamma").to_numpy(dtype=float)
            image = axes[1].imshow(np.abs(grid), aspect="auto", origin="lower", interpolation="nearest",
                                   cmap="magma")
            fig.colorbar(image, ax=axes[1], label="|γ|")
            axes[1].set_xlabel("dimension")
            axes[1].set_ylabel("layer")
            axes[1].set_title(f"|γ| of the '{roles[0]}' norm")
            axes[1].grid(False)
        fig.suptitle(f"norm scales γ across depth — {result.summary['model']}")
        save(fig, path)


def plot_position(result: TopologyResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    relative = result.relative_biases or {}
    if not result.position_tables and not relative:
        with figure(width=6.4, height=1.6) as (fig, ax):
            ax.axis("off")
            ax.text(0.5, 0.5, f"{result.summary['model']}: {result.summary['position']} position encoding — "
                    "no learned position weights to analyse", ha="center", va="center")
            save(fig, path)
        return
    items = list(result.position_tables.items())
    rows = len(items) + (1 if relative else 0)
    with figure(rows, 3, width=12.0, height=3.6 * rows) as (fig, axes):
        axes = np.atleast_2d(axes)
        for row, (name, (norms, cos, curve)) in zip(axes, items):
            image = row[0].imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r", origin="lower", interpolation="nearest")
            row[0].set_title(f"{name}: cosine between positions")
            row[0].set_xlabel("position")
            row[0].set_ylabel("position")
            row[0].grid(False)
            fig.colorbar(image, ax=row[0])
            row[1].plot(curve["offset"], curve["mean_cosine"])
            row[1].set_xscale("log")
            row[1].set_xlabel("offset Δ")
            row[1].set_ylabel("mean cos(p_i, p_{i+Δ})")
            row[2].plot(np.arange(len(norms)), norms)
            row[2].set_xlabel("position")
            row[2].set_ylabel("‖p_i‖")
        if relative:
            row = axes[-1]
            for ax, (name, curve) in zip(row[:2], list(relative.items())[:2]):
                for h, group in curve.groupby("head"):
                    ax.plot(group["offset"], group["bias"], color=PALETTE[h % len(PALETTE)], linewidth=0.9,
                            drawstyle="steps-mid", label=f"head {h}" if h < 8 else None)
                ax.axvline(0, color="grey", linewidth=0.6)
                info = result.summary["relative_position_bias"][name]
                ax.set_title(f"{name}: {info['num_buckets']} buckets, max distance {info['max_distance']}, "
                             f"{'bidirectional' if info['bidirectional'] else 'causal'}", fontsize="small")
                ax.set_xlabel("relative position key − query")
                ax.set_ylabel("bias added to the score")
            row[0].legend(loc="best", fontsize="x-small", ncol=2)
            for k, name in enumerate(relative):
                norms = result.summary["relative_position_bias"][name]["head_norm"]
                row[2].bar(np.arange(len(norms)) + 0.4 * k, norms, width=0.4, label=name)
            row[2].set_xlabel("head")
            row[2].set_ylabel("‖bias column‖ over buckets")
            row[2].legend(loc="best", fontsize="x-small")
        fig.suptitle(f"learned position weights — {result.summary['model']}")
        save(fig, path)


def run(job: Job) -> Result:
    """The topology of one model's weights (no activations, no prompts; CPU)."""
    from layerscope.engines.weights import return_large_frees_to_the_os
    from layerscope.model.adapter import load_model

    params = job.params
    return_large_frees_to_the_os()
    adapter = load_model(job.input("model"), dtype="float32", device="cpu", weights_only=True)
    result = weight_topology(
        adapter, model=job.model, abs_thresholds=tuple(params["abs_thresholds"]),
        rms_thresholds=tuple(params["rms_thresholds"]), dead_ratio=params["dead_ratio"],
        degenerate_ratio=params["degenerate_ratio"], chunk_elements=params["chunk_elements"],
        n_null=params["n_null"], seed=params["seed"],
    )
    return to_result(result)


def to_result(result: TopologyResult) -> Result:
    """The registry's result: tables, figures and summary of an analysis."""
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "sparsity": result.sparsity, "qk_circuits": result.qk,
                "qk_spectra": result.qk_spectra, "mlp_neurons": result.neurons, "cross_layer": result.cross_layer,
                "norm_scales": result.norm_scales, "position": result.position},
        figures={"qk_circuits": partial(plot_qk, result), "cross_layer": partial(plot_cross_layer, result),
                 "norm_scales": partial(plot_norm_scales, result), "position": partial(plot_position, result)},
    )


EXPERIMENT = Experiment(
    name="weight_topology",
    kinds=("decoder", "encoder", "encoder_decoder", "vision"),  # weights only: any architecture the adapter reads
    dashboard=('mlp_dead_fraction', 'qk_symmetric_energy_fraction_mean', 'cross_layer_adjacent_gram_similarity_mean', 'cross_layer_adjacent_above_null_fraction'),
    family="weights",
    description="sparsity, QK circuits, MLP neurons, cross-layer similarity, norm scales, positions",
    description_long="Sparsity, per-head QK circuits, dead/degenerate MLP neurons, cross-layer similarity of "
                     "same-type weights on the shared residual side (against a random-rotation null), norm "
                     "scales and learned position structure (weights only).",
    needs="any",
    data="weights",
    gpu=False,
    inputs=("model",),
    run=run,
    tables=("metrics", "sparsity", "qk_circuits", "qk_spectra", "mlp_neurons", "cross_layer", "norm_scales",
            "position"),
    figures=(Figure("qk_circuits", "QK circuit spectra and symmetry"),
             Figure("cross_layer", "cross-layer residual Gram similarity"),
             Figure("norm_scales", "norm scales across depth"),
             Figure("position", "position embeddings")),
    params={
        "abs_thresholds": {
            "description": "Sparsity = fraction of entries with |w| below each absolute threshold.",
            "type": "array",
            "items": {"type": "number", "exclusiveMinimum": 0},
            "minItems": 1,
            "uniqueItems": True,
            "default": [0.0001, 0.001, 0.01, 0.1],
        },
        "rms_thresholds": {
            "description": "Scale-free sparsity: fraction of entries with |w| below each threshold times the "
                           "matrix's RMS entry.",
            "type": "array",
            "items": {"type": "number", "exclusiveMinimum": 0},
            "uniqueItems": True,
            "default": [0.01, 0.1],
        },
        "dead_ratio": {
            "description": "An MLP neuron is dead when its smallest input/output norm is below this fraction of "
                           "the layer's median norm.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.01,
        },
        "degenerate_ratio": {
            "description": "An MLP neuron is degenerate (not dead) when that ratio is below this fraction; must "
                           "be >= dead_ratio.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.1,
        },
        "chunk_elements": {
            "description": "Weights converted to float64 at once by the sparsity count and the cross-layer "
                           "Gram matrices (memory, not results).",
            "type": "integer",
            "minimum": 1024,
            "default": 1048576,
        },
        "n_null": {
            "description": "Haar-random rotations of one layer's residual basis in the null of the cross-layer "
                           "Gram similarity (seeded by seed; one d_model x d_model QR each, shared by all pairs).",
            "type": "integer",
            "minimum": 1,
            "default": 200,
        },
    },
    threads=2,
    runtime=60,
)
