"""ARD-MMD: which residual dimensions carry the difference between a problem's zh and en token clouds.

Kernel: the ARD-RBF kernel k_ℓ(x, y) = exp(−½ Σ_j (x_j − y_j)² / ℓ_j²), one lengthscale per
residual dimension. For pair i, the unbiased estimator between the Chinese token cloud
X (n tokens) and the English one Y (m tokens) is

    MMD²_u = Σ_{a≠a'} k(x_a, x_a')/(n(n−1)) + Σ_{b≠b'} k(y_b, y_b')/(m(m−1)) − 2 Σ_{a,b} k(x_a, y_b)/(nm).

The tokens are the problem-text tokens at ``resid.ℓ`` (see :mod:`layerscope.data.paired_states`),
each dimension standardised by its standard deviation over all those tokens, so lengthscales
are in units of that dimension's spread.

Objective (Adam on θ_j = log(ℓ_j / s), every λ of the grid from the same start):

    minimise   − mean_i MMD²_u(i; ℓ)  +  λ · mean_j s / ℓ_j

i.e. a λ Σ 1/ℓ sparsity penalty (in mean form) with the MMD term *maximised*. The sign
matters: minimising Σ MMD² + λ Σ 1/ℓ has a trivial optimum (every ℓ → ∞ makes the kernel
constant, MMD² = 0 and the penalty 0), while maximising the MMD finds the dimensions that
tell the two languages apart and lets the penalty switch off (ℓ → ∞) every dimension that
carries no difference. Sums are taken as means so that λ means the same for any number of
pairs and any d. ``s`` is a global scale from the median heuristic (the median over zh/en
token pairs of the warm-start distance is 1).

Warm start from the Z-mask: e_j = Σ_i V_Z[i, j]² (the share of dimension j in Z, mean k/d);
ℓ_j⁰ = s · (k/d) / (e_j + ε·k/d): dimensions that Z uses start sensitive, others start wide.

A dimension is *active* when ℓ_j < ``off_ratio`` · s; the active set A(λ) is ARD's
language-difference subspace (in coordinates), |A| per layer is reported with the
lengthscale spectrum, and its overlap with SVD-Z is the fraction of A among the |A|
dimensions with the largest Z energy (chance |A|/d), per k, plus the Spearman correlation
of log ℓ with e. The objective of every step is kept (convergence log); a run counts as
converged when the objective changed by less than ``tol`` (relative) over its last 10% of steps.

Uncertainty. The mean MMD² over pairs (at the warm start and at the end of each run) gets
a bootstrap interval over pairs, from the per-pair MMD² at the fitted lengthscales (the
lengthscales are held fixed: the interval is over which pairs were drawn, not over the
optimisation). The overlap of A with Z claims structure, so it gets a null: the overlap of a
random set of |A| dimensions with the |A| dimensions of largest Z energy is hypergeometric,
and ``overlap_z_k{k}_p_value`` is the exact probability of an overlap at least as large. The
active set itself is fitted once on all pairs and has no interval (a bootstrap would re-run
the optimisation once per resample); runs that did not converge are flagged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.engines import statistics as st
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.data.paired_states import POOLING, PairedStates
from layerscope.experiments.z_subspace.z_mask import ZMask, energy_per_dimension, resolve_layers
from layerscope.progress import Progress, progress

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- MMD


def ard_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances between rows of a [..., n, d] and b [..., m, d] (already divided by ℓ)."""
    aa = (a * a).sum(-1)
    bb = (b * b).sum(-1)
    return (aa[..., :, None] + bb[..., None, :] - 2 * a @ b.transpose(-1, -2)).clamp_min(0)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, lengthscales: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Unbiased MMD² between the rows of x [n, d] and y [m, d] under the ARD-RBF kernel."""
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise LayerscopeError(f"the unbiased MMD² needs at least 2 samples on each side, got {n} and {m}")
    xs, ys = x / lengthscales, y / lengthscales
    kxx = torch.exp(-0.5 * ard_sq_dists(xs, xs))
    kyy = torch.exp(-0.5 * ard_sq_dists(ys, ys))
    kxy = torch.exp(-0.5 * ard_sq_dists(xs, ys))
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())


@dataclass
class PaddedClouds:
    """Token clouds of N pairs, zero-padded to common sizes, with masks (for one batched MMD)."""

    x: torch.Tensor  # [N, n_max, d]
    y: torch.Tensor  # [N, m_max, d]
    mx: torch.Tensor  # [N, n_max] 1 for real tokens
    my: torch.Tensor

    @classmethod
    def build(cls, clouds: Sequence[tuple[torch.Tensor, torch.Tensor]], device=None, dtype=torch.float32) -> "PaddedClouds":
        for i, (a, b) in enumerate(clouds):
            if a.shape[0] < 2 or b.shape[0] < 2:
                raise LayerscopeError(f"pair #{i}: the unbiased MMD² needs at least 2 tokens per prompt "
                                      f"(got {a.shape[0]} and {b.shape[0]})")
        n, m, d = max(a.shape[0] for a, _ in clouds), max(b.shape[0] for _, b in clouds), clouds[0][0].shape[1]
        x = torch.zeros(len(clouds), n, d, dtype=dtype)
        y = torch.zeros(len(clouds), m, d, dtype=dtype)
        mx = torch.zeros(len(clouds), n, dtype=dtype)
        my = torch.zeros(len(clouds), m, dtype=dtype)
        for i, (a, b) in enumerate(clouds):
            x[i, : a.shape[0]], mx[i, : a.shape[0]] = a, 1
            y[i, : b.shape[0]], my[i, : b.shape[0]] = b, 1
        return cls(x.to(device), y.to(device), mx.to(device), my.to(device))


class BucketedClouds:
    """Pairs grouped by cloud size into padded buckets, so padding costs little; MMD² in the original pair order."""

    def __init__(self, clouds: Sequence[tuple[torch.Tensor, torch.Tensor]], *, bucket: int = 8, device=None,
                 dtype=torch.float32):
        order = sorted(range(len(clouds)), key=lambda i: (clouds[i][0].shape[0] + clouds[i][1].shape[0], i))
        self.groups = [order[i : i + bucket] for i in range(0, len(order), bucket)]
        self.buckets = [PaddedClouds.build([clouds[i] for i in g], device=device, dtype=dtype) for g in self.groups]
        self.inverse = torch.argsort(torch.tensor([i for g in self.groups for i in g]))
        self.n_pairs = len(clouds)

    def mmd2(self, lengthscales: torch.Tensor) -> torch.Tensor:
        values = torch.cat([batched_mmd2(b, lengthscales) for b in self.buckets])
        return values[self.inverse.to(values.device)]

    def cross_sq_dists(self, lengthscales: torch.Tensor) -> torch.Tensor:
        """Every zh/en token distance² of every pair (padding dropped), for the median heuristic."""
        out = []
        for b in self.buckets:
            d2 = ard_sq_dists(b.x / lengthscales, b.y / lengthscales)
            out.append(d2[(b.mx[:, :, None] * b.my[:, None, :]) > 0])
        return torch.cat(out)


def batched_mmd2(clouds: PaddedClouds, lengthscales: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of every pair [N] (equal to :func:`mmd2_unbiased` pair by pair)."""
    xs, ys = clouds.x / lengthscales, clouds.y / lengthscales
    mx, my = clouds.mx, clouds.my
    n, m = mx.sum(1), my.sum(1)
    wxx = mx[:, :, None] * mx[:, None, :]
    wyy = my[:, :, None] * my[:, None, :]
    wxy = mx[:, :, None] * my[:, None, :]
    kxx = torch.exp(-0.5 * ard_sq_dists(xs, xs)) * wxx
    kyy = torch.exp(-0.5 * ard_sq_dists(ys, ys)) * wyy
    kxy = torch.exp(-0.5 * ard_sq_dists(xs, ys)) * wxy
    diag_x = torch.diagonal(kxx, dim1=1, dim2=2).sum(1)
    diag_y = torch.diagonal(kyy, dim1=1, dim2=2).sum(1)
    return ((kxx.sum((1, 2)) - diag_x) / (n * (n - 1)) + (kyy.sum((1, 2)) - diag_y) / (m * (m - 1))
            - 2 * kxy.sum((1, 2)) / (n * m))


# ---------------------------------------------------------------------------- the optimiser


@dataclass
class ArdRun:
    lam: float
    log_ratio: np.ndarray  # θ_j = log(ℓ_j / s) at the end, [d]
    objective: np.ndarray  # per step
    mmd: np.ndarray  # mean MMD² per step
    penalty: np.ndarray  # mean s/ℓ per step
    converged: bool
    relative_change: float
    mmd_per_pair: np.ndarray | None = None  # MMD² of every pair at the final lengthscales


def median_scale(clouds: BucketedClouds, init_ratio: torch.Tensor) -> float:
    """s such that the median zh/en token distance under lengthscales s·exp(init_ratio) is 1."""
    with torch.no_grad():
        med = float(clouds.cross_sq_dists(init_ratio.exp()).median())
    return math.sqrt(med) if med > 0 else 1.0


def optimise(clouds: BucketedClouds, init_ratio: torch.Tensor, scale: float, lam: float, *, steps: int, lr: float,
             tol: float, progress: Progress | None = None) -> ArdRun:
    """Adam on θ = log(ℓ/s) for one λ (see module docstring); ``progress`` counts the steps."""
    theta = init_ratio.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    objective, mmd_trace, penalty_trace = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        mmd = clouds.mmd2(scale * theta.exp()).mean()
        penalty = torch.exp(-theta).mean()
        loss = -mmd + lam * penalty
        loss.backward()
        opt.step()
        objective.append(float(loss.detach()))
        mmd_trace.append(float(mmd.detach()))
        penalty_trace.append(float(penalty.detach()))
        if progress:
            progress.update()
    with torch.no_grad():
        per_pair = clouds.mmd2(scale * theta.exp())
        mmd = per_pair.mean()
        penalty = torch.exp(-theta).mean()
        final = float(-mmd + lam * penalty)
    objective.append(final)
    mmd_trace.append(float(mmd))
    penalty_trace.append(float(penalty))
    tail = max(2, len(objective) // 10)
    ref = objective[-tail]
    change = abs(final - ref) / max(abs(ref), abs(final), 1e-12)
    return ArdRun(lam, theta.detach().cpu().numpy().astype(np.float64), np.array(objective), np.array(mmd_trace),
                  np.array(penalty_trace), bool(change < tol), float(change),
                  per_pair.detach().cpu().numpy().astype(np.float64))


def standardise(clouds: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Divide every dimension by its standard deviation over all tokens (zh and en, every pair)."""
    allt = torch.cat([t for pair in clouds for t in pair])
    std = allt.std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(a / std, b / std) for a, b in clouds]


def warm_start(energy: torch.Tensor, epsilon: float) -> torch.Tensor:
    """θ⁰_j = log((k/d) / (e_j + ε·k/d)) for Z energies e (Σe = k)."""
    mean = energy.mean()
    return torch.log(mean / (energy + epsilon * mean))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def overlap_with_energy(active: np.ndarray, energy: np.ndarray) -> float:
    """Fraction of the active dimensions among the |A| dimensions of largest energy."""
    n = int(active.sum())
    if n == 0:
        return float("nan")
    top = np.argsort(-energy, kind="stable")[:n]
    return float(active[top].sum() / n)


def overlap_p_value(active: np.ndarray, energy: np.ndarray) -> float:
    """P(overlap ≥ observed) for a random set of |A| of the d dimensions (hypergeometric); NaN when A is empty or all."""
    from scipy.stats import hypergeom

    d, n = active.size, int(active.sum())
    if n == 0 or n == d:
        return float("nan")
    hits = int(round(overlap_with_energy(active, energy) * n))
    return float(hypergeom.sf(hits - 1, d, n, n))


# ---------------------------------------------------------------------------- the experiment


@dataclass
class ArdResult:
    metrics: pd.DataFrame
    lengthscales: pd.DataFrame
    trajectory: pd.DataFrame
    summary: dict
    runs: dict  # (layer, λ) -> ArdRun


def ard_mmd(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str, lambdas: Sequence[float], steps: int,
            lr: float, warm_start_k: int | None = None, epsilon: float = 0.1, off_ratio: float = 10.0, tol: float = 1e-3,
            device: torch.device | str = "cpu", seed: int = 0,
            layers: Sequence[int | float] | None = None) -> ArdResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    if not lambdas:
        raise LayerscopeError("ard_mmd.lambdas is empty")
    k_warm = max(mask.ks) if warm_start_k is None else int(warm_start_k)
    if k_warm not in mask.ks:
        raise LayerscopeError(f"ard_mmd.warm_start_k = {k_warm} is not one of the Z-mask's k values {mask.ks}")
    try:
        grid = list(mask.layers) if not layers else resolve_layers(layers, mask.n_layers)
    except LayerscopeError as exc:
        raise LayerscopeError(str(exc).replace("z_mask.layers", "ard_mmd.layers")) from None
    ks = [k for k in mask.ks if all((layer, k) in mask.bases for layer in grid)]
    if k_warm not in ks:
        raise LayerscopeError(f"ard_mmd.layers {list(layers or [])}: the Z-mask has Z of size k = {k_warm} (the warm "
                              f"start) only at blocks {mask.layers}; add {k_warm} to z_mask.k_sweep to build it at "
                              "every block")
    d = mask.d_model
    log_off = math.log(off_ratio)
    boot = st.Bootstrap(states.n_pairs, unit="pair", seed=seed)
    records, ls_rows, traj_rows, runs, combos = [], [], [], {}, []
    bar = progress("ard_mmd", total=len(grid) * len(lambdas) * steps, unit="steps")
    for layer in grid:
        clouds = BucketedClouds(standardise(states.clouds(layer)), device=device)
        energies = {k: energy_per_dimension(mask.basis(layer, k)).numpy() for k in ks}
        init = warm_start(torch.from_numpy(energies[k_warm]), epsilon).to(torch.float32).to(device)
        scale = median_scale(clouds, init)
        with torch.no_grad():
            init_per_pair = clouds.mmd2(scale * init.exp()).cpu().numpy().astype(np.float64)
        mmd_init, mmd_init_ci = boot.interval(init_per_pair)
        for lam in lambdas:
            run = optimise(clouds, init, scale, float(lam), steps=steps, lr=lr, tol=tol, progress=bar)
            runs[(layer, float(lam))] = run
            active = run.log_ratio < log_off
            n_active = int(active.sum())
            init_active = init.cpu().numpy() < log_off
            mmd_final, mmd_final_ci = boot.interval(run.mmd_per_pair)
            row = {"layer": layer, "lambda": float(lam), "n_active": n_active, "active_fraction": n_active / d,
                   "mmd_init": mmd_init, "mmd_init_ci": mmd_init_ci, "mmd_final": mmd_final,
                   "mmd_final_ci": mmd_final_ci, "objective_final": float(run.objective[-1]),
                   "converged": run.converged, "relative_change_last_10pct": run.relative_change, "scale": scale,
                   "active_at_warm_start": int(init_active.sum()),
                   "changed_from_warm_start": float((active != init_active).mean())}
            for k in ks:
                row[f"overlap_z_k{k}"] = overlap_with_energy(active, energies[k])
                row[f"overlap_z_k{k}_p_value"] = overlap_p_value(active, energies[k])
                row[f"spearman_log_lengthscale_z_energy_k{k}"] = spearman(run.log_ratio, energies[k])
            row["overlap_chance"] = n_active / d
            combos.append(row)
            for key, value in row.items():
                if key not in ("layer", "lambda") and not isinstance(value, (bool, list)):
                    lo, hi = row.get(f"{key}_ci", (np.nan, np.nan))
                    records.append((layer, float(lam), key, float(value), lo, hi))
            records.append((layer, float(lam), "converged", float(run.converged), np.nan, np.nan))
            for j in range(d):
                ls_rows.append((layer, float(lam), j, float(run.log_ratio[j] / math.log(10)), bool(active[j]),
                                float(energies[k_warm][j])))
            for step, (o, m_, p) in enumerate(zip(run.objective, run.mmd, run.penalty)):
                traj_rows.append((layer, float(lam), step, float(o), float(m_), float(p)))
            log.info("ARD layer %d λ=%g: %d/%d active, MMD² %.4g → %.4g, converged=%s (last-10%% change %.2g)",
                     layer, lam, n_active, d, mmd_init, run.mmd[-1], run.converged, run.relative_change)
    bar.close()
    frame = pd.DataFrame(records, columns=["layer", "lambda", "metric", "value", "ci_lo", "ci_hi"])
    for f in (frame,):
        f.insert(0, "prompt_set", prompt_set)
        f.insert(0, "model", model)
    lengthscales = pd.DataFrame(ls_rows, columns=["layer", "lambda", "dim", "log10_lengthscale_over_scale", "active",
                                                  f"z_energy_k{k_warm}"])
    trajectory = pd.DataFrame(traj_rows, columns=["layer", "lambda", "step", "objective", "mmd2", "penalty"])
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    unconverged = [f"L{c['layer']}/λ{c['lambda']:g}" for c in combos if not c["converged"]]
    if unconverged:
        boot.flag(f"{len(unconverged)} of {len(combos)} ARD runs did not converge ({', '.join(unconverged)}): their "
                  "active sets are not final")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        **states.sample,
        "tokens": POOLING.replace("mean over", "token clouds of"),
        "objective": "minimise -mean_i MMD2_u(zh_i, en_i; l) + lambda * mean_j s/l_j (Adam on log l)",
        "d_model": d,
        "layers": grid,
        "lambdas": [float(x) for x in lambdas],
        "steps": steps,
        "lr": lr,
        "warm_start_k": k_warm,
        "off_ratio": off_ratio,
        "combos": [f"L{c['layer']}/λ{c['lambda']:g}" for c in combos],
        "n_active": pick("n_active"),
        f"overlap_z_k{k_warm}": pick(f"overlap_z_k{k_warm}"),
        f"overlap_z_k{k_warm}_p_value": pick(f"overlap_z_k{k_warm}_p_value"),
        "overlap_chance": pick("overlap_chance"),
        f"spearman_log_lengthscale_z_energy_k{k_warm}": pick(f"spearman_log_lengthscale_z_energy_k{k_warm}"),
        "mmd_init": pick("mmd_init"),
        "mmd_init_ci": pick("mmd_init_ci"),
        "mmd_final": pick("mmd_final"),
        "mmd_final_ci": pick("mmd_final_ci"),
        "changed_from_warm_start": pick("changed_from_warm_start"),
        "n_converged": int(sum(c["converged"] for c in combos)),
        "n_runs": len(combos),
        "n_active_uncertainty": "none: the active set is fitted once on all pairs",
        **boot.summary(),
        "by_run": combos,
    }
    return ArdResult(frame, lengthscales, trajectory, summary, runs)


def plot_lengthscales(result: ArdResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    lambdas = s["lambdas"]
    layers = s["layers"]
    log_off = math.log10(s["off_ratio"])
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        values = [run.log_ratio / math.log(10) for run in result.runs.values()]
        lo, hi = min(v.min() for v in values), max(v.max() for v in values)
        bins = np.linspace(lo, hi + 1e-9, 40)
        for i, ((layer, lam), run) in enumerate(result.runs.items()):
            axes[0].hist(run.log_ratio / math.log(10), bins=bins, histtype="step", color=PALETTE[i % 10],
                         label=f"L{layer} λ={lam:g}")
        axes[0].axvline(log_off, color="0.3", linestyle="--", linewidth=0.8, label="off threshold")
        axes[0].set_xlabel("log10(ℓ_j / s)")
        axes[0].set_ylabel("dimensions")
        axes[0].set_title("lengthscale spectrum")
        axes[0].legend(loc="best", ncol=2)
        for i, lam in enumerate(lambdas):
            counts = [result.summary["by_run"][j]["n_active"] for j, c in enumerate(result.summary["by_run"])
                      if c["lambda"] == lam]
            axes[1].plot(layers, counts, marker="o", color=PALETTE[i % 10], label=f"λ={lam:g}")
        axes[1].set_xlabel("layer (resid.ℓ)")
        axes[1].set_ylabel(f"active dimensions |A| (of {s['d_model']})")
        axes[1].set_ylim(0, s["d_model"] * 1.05)
        axes[1].set_xticks(layers)
        axes[1].set_title("dimensions that carry the zh/en difference")
        axes[1].legend(loc="best")
        fig.suptitle(f"ARD-MMD — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs, warm start from Z k={s['warm_start_k']})")
        save(fig, path)


def plot_convergence(result: ArdResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    with figure(1, 2, width=10.0, height=3.6) as (fig, axes):
        for i, (((layer, lam), run), row) in enumerate(zip(result.runs.items(), s["by_run"])):
            label = f"L{layer} λ={lam:g}" + ("" if run.converged else " (not converged)")
            axes[0].plot(run.objective, color=PALETTE[i % 10], label=label)
            axes[1].plot(run.mmd, color=PALETTE[i % 10])
            lo, hi = row["mmd_final_ci"]
            last = len(run.mmd) - 1
            axes[1].errorbar([last], [row["mmd_final"]], yerr=[[row["mmd_final"] - lo], [hi - row["mmd_final"]]],
                             fmt="o", markersize=3, color=PALETTE[i % 10], capsize=3)
        axes[0].set_ylabel("objective  −MMD² + λ·mean(s/ℓ)")
        axes[1].set_ylabel("mean unbiased MMD² over pairs (bar: 95 % over pairs)")
        for ax in axes:
            ax.set_xlabel("Adam step")
        axes[0].legend(loc="best", ncol=2)
        fig.suptitle(f"ARD-MMD convergence — {s['model']} on {s['prompt_set']}")
        save(fig, path)


def run(job: Job) -> Result:
    """ARD-RBF lengthscales that separate each pair's zh and en token clouds (GPU when leased)."""
    params = job.params
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    result = ard_mmd(states, ZMask.load(job.input("mask")), model=job.model, prompt_set=job.prompt_set,
                     lambdas=params["lambdas"], steps=params["steps"], lr=params["lr"],
                     warm_start_k=params["warm_start_k"], epsilon=params["epsilon"], off_ratio=params["off_ratio"],
                     tol=params["tol"], device=job.device, seed=params["seed"], layers=params["layers"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "lengthscales": result.lengthscales,
                "trajectory": result.trajectory},
        figures={"lengthscales": partial(plot_lengthscales, result),
                 "convergence": partial(plot_convergence, result)},
    )


EXPERIMENT = Experiment(
    name="ard_mmd",
    headlines=("mmd_final",),
    family="z_subspace",
    description="ARD-RBF MMD lengthscales of zh vs en token clouds",
    description_long="z_subspace: ARD-RBF lengthscales trained with Adam to maximise the mean unbiased MMD^2 between "
                     "each pair's zh and en token clouds minus lambda * mean(s/l); active dimensions per layer, "
                     "lengthscale spectrum, overlap with SVD-Z.",
    needs="decoder",
    data="paired",
    gpu=True,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics", "lengthscales", "trajectory"),
    figures=(Figure("lengthscales", "lengthscale spectrum"), Figure("convergence", "convergence")),
    params={
        "layers": {
            "description": "Blocks to fit at (integers, or fractions of depth as in z_mask.layers): null = the "
                           "Z-mask's layers; a grid gives the number of active dimensions against depth (the "
                           "warm start's k must be in z_mask.k_sweep, which z_mask builds at every block).",
            "type": ["array", "null"],
            "items": {"type": "number"},
            "default": None,
        },
        "lambdas": {
            "description": "Sparsity strengths lambda of the penalty lambda * mean_j s/l_j.",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {
                "type": "number",
                "minimum": 0,
            },
            "default": [0.001, 0.01, 0.1],
        },
        "steps": {
            "description": "Adam steps per (layer, lambda).",
            "type": "integer",
            "minimum": 1,
            "default": 500,
        },
        "lr": {
            "description": "Adam learning rate on log-lengthscales.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.01,
        },
        "warm_start_k": {
            "description": "Which Z (k) the warm start reads its per-dimension energies from (null: the "
                           "largest k).",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": None,
        },
        "epsilon": {
            "description": "Energy floor of the warm start, as a fraction of the mean energy k/d.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.1,
        },
        "off_ratio": {
            "description": "A dimension counts as shut off when its lengthscale exceeds off_ratio times the "
                           "global scale s.",
            "type": "number",
            "exclusiveMinimum": 1,
            "default": 10.0,
        },
        "tol": {
            "description": "Converged when the objective changed by less than this (relative) over the last "
                           "10% of steps.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.001,
        },
    },
    threads=1,
    runtime=60,
    section="z_subspace",
)
