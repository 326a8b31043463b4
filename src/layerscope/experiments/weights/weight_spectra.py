"""Spectral structure of every weight matrix (weights only, no prompts).

For each matrix of :func:`layerscope.engines.weights.weight_inventory` (block projections
``q k v o gate up down`` per layer, fused ones split, plus embeddings, an untied
unembedding and BERT's pooler; T5's cross-attention and relative position bias tables, a
ViT's patch embedding reshaped to [out, in·kh·kw], class and mask tokens) the singular values are computed in float64 and summarised
with the definitions of :mod:`layerscope.engines.spectra`, each named in its metric:

* ``roy_vetterli_effective_rank`` — exp(H(p)), p = σ/Σσ (Roy & Vetterli's effective rank), and
  ``roy_vetterli_effective_rank_ratio`` = that / min(rows, cols);
* ``entropy_effective_rank`` — exp(H(p)), p = σ²/Σσ² (the entropy rank of the energy spectrum:
  Roy & Vetterli's effective rank of WᵀW, not of W), and ``entropy_effective_rank_ratio`` =
  that / min(rows, cols); the layer jumps and degenerate matrices use this one;
* ``participation_ratio`` — (Σσ²)² / Σσ⁴ (a rank: n for a flat spectrum);
* ``stable_rank`` — Σσ² / σ_max²;
* ``spectral_norm`` — σ_max; ``condition_number`` — σ_max / σ_min over all min(rows, cols)
  singular values; ``frobenius_norm``.

Across depth, per block type: relative changes between consecutive layers
((x_{l+1} − x_l) / x_l) of the rank and norm metrics, the largest named; and *degenerate*
matrices, whose entropy effective-rank ratio is below ``degenerate_fraction`` × the
median ratio of their type.

Every number is a function of the weights alone: the summary says so (``uncertainty``:
deterministic given the weights) instead of giving intervals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope.model.adapter import PROJECTION_TYPES, ModelAdapter
from layerscope.engines.spectra import (
    condition_number, entropy_effective_rank, participation_ratio, roy_vetterli_effective_rank, singular_values,
    stable_rank,
)
from layerscope.engines.statistics import deterministic
from layerscope.engines.weights import WeightSource, parallel_map, weight_inventory
from layerscope.experiments.registry import Experiment, Figure, Job, Result

log = logging.getLogger(__name__)

RANK_DEFINITIONS = {
    "roy_vetterli_effective_rank": "exp(H(p)) with p = σ/Σσ (Roy & Vetterli's effective rank of W)",
    "roy_vetterli_effective_rank_ratio": "roy_vetterli_effective_rank / min(rows, cols)",
    "entropy_effective_rank": "exp(H(p)) with p = σ²/Σσ² (entropy rank of the energy spectrum; Roy & Vetterli's "
                              "effective rank of WᵀW, not of W)",
    "entropy_effective_rank_ratio": "entropy_effective_rank / min(rows, cols)",
    "participation_ratio": "(Σσ²)² / Σσ⁴ (participation-ratio rank; n for n equal singular values)",
    "stable_rank": "Σσ² / σ_max² = ‖W‖_F² / ‖W‖_2²",
    "spectral_norm": "σ_max",
    "condition_number": "σ_max / σ_min over all min(rows, cols) singular values (inf when σ_min = 0)",
    "frobenius_norm": "sqrt(Σσ²)",
    "relative_change": "(x_{l+1} − x_l) / x_l between consecutive layers of one matrix type",
    "degenerate": "entropy_effective_rank_ratio < degenerate_fraction × median ratio of the matrix type",
}
MATRIX_METRICS = (
    "roy_vetterli_effective_rank", "roy_vetterli_effective_rank_ratio", "entropy_effective_rank",
    "entropy_effective_rank_ratio", "participation_ratio", "stable_rank", "spectral_norm",
    "condition_number", "frobenius_norm", "sigma_min",
)
RESHAPES = {
    1: "a vector as one row [1, d] (CLIP's class embedding)",
    3: "[1, n, d] as [n, d] (DINOv2's class token and position table)",
    4: "a convolution kernel [out, in, kh, kw] as [out, in·kh·kw], flattened in (in, kh, kw) order: row o applied "
       "to a flattened patch gives output channel o (a ViT's patch embedding)",
}
JUMP_METRICS = ("entropy_effective_rank", "participation_ratio", "stable_rank", "spectral_norm")


def spectrum_metrics(s: np.ndarray, rows: int, cols: int) -> dict[str, float]:
    """Every per-matrix number from its singular values (all min(rows, cols) of them)."""
    erank = entropy_effective_rank(s)
    roy = roy_vetterli_effective_rank(s)
    return {
        "roy_vetterli_effective_rank": roy,
        "roy_vetterli_effective_rank_ratio": roy / min(rows, cols),
        "entropy_effective_rank": erank,
        "entropy_effective_rank_ratio": erank / min(rows, cols),
        "participation_ratio": participation_ratio(s),
        "stable_rank": stable_rank(s),
        "spectral_norm": float(s.max()) if s.size else 0.0,
        "condition_number": condition_number(s),
        "frobenius_norm": float(np.sqrt((s.astype(float) ** 2).sum())),
        "sigma_min": float(s.min()) if s.size else 0.0,
    }


def layer_jumps(table: pd.DataFrame, metrics=JUMP_METRICS) -> pd.DataFrame:
    """Relative change of each metric between consecutive layers, per block matrix type."""
    rows = []
    blocks = table[table["layer"].notna()]
    for mtype, group in blocks.groupby("type", sort=False):
        group = group.sort_values("layer")
        layers = group["layer"].to_numpy(dtype=int)
        for metric in metrics:
            values = group[metric].to_numpy(dtype=float)
            for k in range(len(values) - 1):
                if layers[k + 1] != layers[k] + 1:
                    continue
                before, after = values[k], values[k + 1]
                change = (after - before) / before if before != 0 else float("nan")
                rows.append((mtype, int(layers[k]), int(layers[k + 1]), metric, before, after, change))
    return pd.DataFrame(rows, columns=["type", "from_layer", "to_layer", "metric", "value_from", "value_to",
                                       "relative_change"])


def degenerate_matrices(table: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """Block matrices whose entropy effective-rank ratio is below ``fraction`` × their type's median."""
    blocks = table[table["layer"].notna()].copy()
    median = blocks.groupby("type")["entropy_effective_rank_ratio"].transform("median")
    blocks["type_median_ratio"] = median
    flagged = blocks[blocks["entropy_effective_rank_ratio"] < fraction * median]
    return flagged[["name", "type", "layer", "entropy_effective_rank_ratio", "type_median_ratio"]].reset_index(drop=True)


@dataclass
class SpectraResult:
    table: pd.DataFrame  # one row per matrix, metrics as columns
    metrics: pd.DataFrame  # tidy: model, matrix, type, layer, rows, cols, metric, value
    singular_values: pd.DataFrame  # model, matrix, type, layer, index, value
    jumps: pd.DataFrame
    degenerate: pd.DataFrame
    summary: dict


def _type_order(types) -> list[str]:
    present = list(dict.fromkeys(types))
    return [t for t in PROJECTION_TYPES if t in present] + [t for t in present if t not in PROJECTION_TYPES]


def weight_spectra(
    adapter: ModelAdapter,
    *,
    model: str,
    top_k: int | None = None,
    degenerate_fraction: float = 0.5,
    n_top_jumps: int = 5,
    chunk_rows: int = 8192,
    workers: int | None = None,
) -> SpectraResult:
    source = WeightSource(adapter)
    inventory = weight_inventory(adapter)
    log.info("weight spectra: %d matrices on %d thread(s)", len(inventory), workers or torch.get_num_threads())

    def analyse(w):
        matrix = source.matrix(w)
        return tuple(int(x) for x in matrix.shape), singular_values(matrix, chunk_rows=chunk_rows)

    records, sv_frames = [], []
    for w, ((rows, cols), s) in zip(inventory, parallel_map(analyse, inventory, workers)):
        records.append({"name": w.name, "type": w.type, "layer": w.layer, "rows": rows, "cols": cols,
                        **spectrum_metrics(s, rows, cols)})
        kept = s if top_k is None else s[:top_k]
        sv_frames.append(pd.DataFrame({"matrix": w.name, "type": w.type, "layer": w.layer,
                                       "index": np.arange(len(kept), dtype=np.int32), "value": kept}))
    table = pd.DataFrame(records)
    table["layer"] = table["layer"].astype("Int64")
    svs = pd.concat(sv_frames, ignore_index=True)
    svs["layer"] = svs["layer"].astype("Int64")
    svs.insert(0, "model", model)

    long = table.melt(id_vars=["name", "type", "layer", "rows", "cols"], value_vars=list(MATRIX_METRICS),
                      var_name="metric", value_name="value").rename(columns={"name": "matrix"})
    long.insert(0, "model", model)

    jumps = layer_jumps(table)
    degenerate = degenerate_matrices(table, degenerate_fraction)
    summary = _summary(table, jumps, degenerate, adapter, model=model, top_k=top_k,
                       degenerate_fraction=degenerate_fraction, n_top_jumps=n_top_jumps)
    return SpectraResult(table, long, svs, jumps, degenerate, summary)


def _jump_dict(row) -> dict:
    return {"type": row["type"], "from_layer": int(row["from_layer"]), "to_layer": int(row["to_layer"]),
            "relative_change": float(row["relative_change"]), "value_from": float(row["value_from"]),
            "value_to": float(row["value_to"])}


def _summary(table, jumps, degenerate, adapter, *, model, top_k, degenerate_fraction, n_top_jumps) -> dict:
    blocks = table[table["layer"].notna()]
    erank_jumps = jumps[(jumps["metric"] == "entropy_effective_rank") & jumps["relative_change"].notna()].copy()
    erank_jumps["magnitude"] = erank_jumps["relative_change"].abs()
    erank_jumps = erank_jumps.sort_values(["magnitude", "type", "from_layer"], ascending=[False, True, True])
    by_type = {}
    for mtype in _type_order(blocks["type"]):
        group = blocks[blocks["type"] == mtype]
        type_jumps = erank_jumps[erank_jumps["type"] == mtype]
        by_type[mtype] = {
            "n_matrices": int(len(group)),
            "shape": [int(group["rows"].iloc[0]), int(group["cols"].iloc[0])],
            "entropy_effective_rank_ratio_mean": float(group["entropy_effective_rank_ratio"].mean()),
            "entropy_effective_rank_ratio_median": float(group["entropy_effective_rank_ratio"].median()),
            "entropy_effective_rank_ratio_min": float(group["entropy_effective_rank_ratio"].min()),
            "roy_vetterli_effective_rank_ratio_mean": float(group["roy_vetterli_effective_rank_ratio"].mean()),
            "participation_ratio_mean": float(group["participation_ratio"].mean()),
            "stable_rank_mean": float(group["stable_rank"].mean()),
            "spectral_norm_mean": float(group["spectral_norm"].mean()),
            "largest_jump": _jump_dict(type_jumps.iloc[0]) if len(type_jumps) else None,
            "degenerate": degenerate.loc[degenerate["type"] == mtype, "name"].tolist(),
        }
    model_level = {
        row["name"]: {k: row[k] for k in ("type", "rows", "cols", *MATRIX_METRICS)}
        for _, row in table[table["layer"].isna()].iterrows()
    }
    top = [_jump_dict(r) for _, r in erank_jumps.head(n_top_jumps).iterrows()]
    params = dict(adapter.model.named_parameters())
    inventory = {w.name: w for w in weight_inventory(adapter)}
    summary = {
        "model": model,
        "kind": adapter.facts.kind,
        "stacks": adapter.facts.stacks,
        "n_layers": adapter.n_layers,
        "n_matrices": int(len(table)),
        "n_block_matrices": int(len(blocks)),
        "entropy_effective_rank_ratio_mean": float(blocks["entropy_effective_rank_ratio"].mean()),
        "roy_vetterli_effective_rank_ratio_mean": float(blocks["roy_vetterli_effective_rank_ratio"].mean()),
    }
    # (T5's types carry their stack, encoder.q: the key reads entropy_effective_rank_ratio_encoder_q)
    for mtype, info in by_type.items():
        summary[f"entropy_effective_rank_ratio_{mtype.replace('.', '_')}"] = info["entropy_effective_rank_ratio_mean"]
    for mtype, info in by_type.items():
        summary[f"roy_vetterli_effective_rank_ratio_{mtype.replace('.', '_')}"] = info[
            "roy_vetterli_effective_rank_ratio_mean"]
    summary.update({
        "largest_jump_type": top[0]["type"] if top else None,
        "largest_jump_from_layer": top[0]["from_layer"] if top else None,
        "largest_jump_to_layer": top[0]["to_layer"] if top else None,
        "largest_jump_relative_change": top[0]["relative_change"] if top else None,
        "n_degenerate": int(len(degenerate)),
        "degenerate": degenerate["name"].tolist(),
        "by_type": by_type,
        "top_jumps": top,
        "degenerate_matrices": {row["name"]: {"type": row["type"], "layer": int(row["layer"]),
                                              "entropy_effective_rank_ratio": row["entropy_effective_rank_ratio"],
                                              "type_median_ratio": row["type_median_ratio"]}
                                for _, row in degenerate.iterrows()},
        "model_matrices": model_level,
        # parameters that are not 2-D, analysed as the matrix the adapter makes of them
        "reshaped": {name: {"parameter_shape": list(params[w.param].shape),
                            "matrix_shape": [int(table.loc[table["name"] == name, "rows"].iloc[0]),
                                             int(table.loc[table["name"] == name, "cols"].iloc[0])],
                            "how": RESHAPES[params[w.param].ndim]}
                     for name, w in inventory.items() if params[w.param].ndim != 2},
        "definitions": RANK_DEFINITIONS,
        "params": {"top_k": top_k, "degenerate_fraction": degenerate_fraction, "jump_metric": "entropy_effective_rank"},
        **deterministic("the weights"),
    })
    return summary


# ---------------------------------------------------------------------------- figures


def plot_rank_ratio(result: SpectraResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    blocks = result.table[result.table["layer"].notna()]
    n_layers = int(blocks["layer"].max()) + 1 if len(blocks) else 1  # per stack for T5 (types carry the stack)
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        for k, mtype in enumerate(_type_order(blocks["type"])):
            group = blocks[blocks["type"] == mtype].sort_values("layer")
            x = group["layer"].to_numpy(dtype=int)
            color = PALETTE[k % len(PALETTE)]
            style = ":" if mtype.startswith("decoder.cross") else "--" if mtype.startswith("decoder.") else "-"
            axes[0].plot(x, group["entropy_effective_rank_ratio"], marker="o", markersize=2.5, color=color,
                         label=mtype, linestyle=style)
            axes[1].plot(x, group["spectral_norm"], marker="o", markersize=2.5, color=color, label=mtype,
                         linestyle=style)
        deg = result.degenerate
        if len(deg):
            axes[0].scatter(deg["layer"].astype(int), deg["entropy_effective_rank_ratio"], s=60, facecolors="none",
                            edgecolors="red", linewidths=1.2, label="degenerate", zorder=5)
        axes[0].set_ylabel("entropy effective rank / min(rows, cols)")
        axes[1].set_ylabel("spectral norm σ_max")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("layer (block index" + (" within its stack)" if result.summary.get("stacks") else ")"))
            ax.set_xlim(-0.5, n_layers - 0.5)
        axes[0].legend(loc="best", ncol=2)
        top = result.summary["top_jumps"][:1]
        note = (f"; largest jump {top[0]['type']} {top[0]['from_layer']}→{top[0]['to_layer']} "
                f"({top[0]['relative_change']:+.1%})") if top else ""
        fig.suptitle(f"weight spectra — {result.summary['model']}: effective rank ratio exp(H(σ²/Σσ²))/min(m,n) "
                     f"by layer{note}")
        save(fig, path)


def plot_singular_values(result: SpectraResult, path: str | Path) -> None:
    import matplotlib as mpl

    from layerscope.report.plotting import figure, save

    svs = result.singular_values
    types = _type_order(result.table["type"])
    ncols = min(4, len(types))
    nrows = int(np.ceil(len(types) / ncols))
    layers = result.table["layer"].dropna()
    n_layers = int(layers.max()) + 1 if len(layers) else 1
    cmap = mpl.colormaps["viridis"]
    with figure(nrows, ncols, width=2.6 * ncols + 1, height=2.3 * nrows + 0.6) as (fig, axes):
        axes = np.atleast_1d(axes).ravel()
        for ax, mtype in zip(axes, types):
            group = svs[svs["type"] == mtype]
            for name, sv in group.groupby("matrix", sort=False):
                layer = sv["layer"].iloc[0]
                values = sv["value"].to_numpy(dtype=float)
                top = values[0] if values.size and values[0] > 0 else 1.0
                color = "black" if pd.isna(layer) else cmap(int(layer) / max(1, n_layers - 1))
                ax.plot(sv["index"], values / top, color=color, linewidth=0.8, alpha=0.8)
            ax.set_yscale("log")
            ax.set_title(mtype)
            ax.set_xlabel("singular value index")
        for ax in axes[len(types):]:
            ax.set_visible(False)
        axes[0].set_ylabel("σ_i / σ_1")
        from matplotlib.lines import Line2D

        proxies = [Line2D([], [], color=cmap(0.0), label="layer 0"),
                   Line2D([], [], color=cmap(1.0), label=f"layer {n_layers - 1}")]
        axes[0].legend(handles=proxies, loc="lower left")
        fig.suptitle(f"normalised singular value spectra — {result.summary['model']} (colour: layer; black: "
                     "model-level matrices)")
        save(fig, path)


def run(job: Job) -> Result:
    """The spectra of one model's weights (no activations, no prompts; CPU)."""
    from layerscope.engines.weights import return_large_frees_to_the_os
    from layerscope.model.adapter import load_model

    params = job.params
    return_large_frees_to_the_os()
    adapter = load_model(job.input("model"), dtype="float32", device="cpu", weights_only=True)
    result = weight_spectra(
        adapter, model=job.model, top_k=params["top_k"], degenerate_fraction=params["degenerate_fraction"],
        n_top_jumps=params["n_top_jumps"], chunk_rows=params["chunk_rows"],
    )
    return to_result(result)


def to_result(result: SpectraResult) -> Result:
    """The registry's result: tables, figures and summary of an analysis."""
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "singular_values": result.singular_values, "jumps": result.jumps},
        figures={"rank_ratio": partial(plot_rank_ratio, result),
                 "singular_values": partial(plot_singular_values, result)},
    )


EXPERIMENT = Experiment(
    name="weight_spectra",
    kinds=("decoder", "encoder", "encoder_decoder", "vision"),  # weights only: any architecture the adapter reads
    dashboard=('entropy_effective_rank_ratio_mean', 'roy_vetterli_effective_rank_ratio_mean', 'n_deg', 'largest_jump_from_layer'),
    family="weights",
    description="singular-value spectra of every weight matrix",
    description_long="Singular values and rank measures of every weight matrix (weights only, no prompts), "
                     "jumps between layers, degenerate matrices.",
    needs="any",
    data="weights",
    gpu=False,
    inputs=("model",),
    run=run,
    tables=("metrics", "singular_values", "jumps"),
    figures=(Figure("rank_ratio", "effective rank ratio by layer"),
             Figure("singular_values", "singular value spectra")),
    params={
        "top_k": {
            "description": "Leading singular values kept per matrix in singular_values.parquet; null keeps all "
                           "(the metrics always use all).",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": None,
        },
        "degenerate_fraction": {
            "description": "A block matrix is degenerate when its entropy effective-rank ratio is below this "
                           "fraction of its type's median ratio.",
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 0.5,
        },
        "n_top_jumps": {
            "description": "Largest relative changes of effective rank between consecutive layers named in the "
                           "summary.",
            "type": "integer",
            "minimum": 1,
            "default": 5,
        },
        "chunk_rows": {
            "description": "Row block of the streamed float64 QR for tall matrices such as the embedding "
                           "(memory, not results).",
            "type": "integer",
            "minimum": 64,
            "default": 8192,
        },
    },
    threads=2,
    runtime=60,
)
