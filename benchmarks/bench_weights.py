"""Benchmark: the weight analyses (weight_spectra + weight_topology) on a 30-layer model, against a naive script.

Run on demand (not a test):

    python benchmarks/bench_weights.py [--model-dir resources/models/smollm2-135m] [--threads 2]

Each variant runs in a fresh subprocess that loads the model, runs, and reports its wall
time, CPU time and peak resident memory (ru_maxrss) above the memory it had after its
imports; the model's own size is its parameter bytes in float32.

* ``weight_spectra`` and ``weight_topology`` as the workflow runs them (each its own
  process, as each is its own job; outputs written to a temporary folder), with
  :class:`ActivationCache` replaced by a function that raises — it would fail if anything
  tried to open an activation cache.
* ``naive``: what a one-off script does for the same core numbers — every weight copied to
  float64 up front; for the spectra ``torch.linalg.svdvals`` of each; for the topology dense
  d_model × d_model QK products per head (singular values + eigenvalues of the symmetric
  part), ``torch.corrcoef`` of the stacked flattened weights of each type, and the
  sparsity counts.

It prints, per experiment, the ratios layerscope / naive of wall time, CPU time and extra
peak memory, and the extra peak memory of each as a multiple of the model's size (its
float32 parameter bytes; the check values show both compute the same numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "resources/models/smollm2-135m"

CHILD = r"""
import json, os, resource, sys, time
import torch
threads = int(sys.argv[3])
torch.set_num_threads(threads)
variant_is_naive = sys.argv[2].startswith("naive")
from layerscope.model.adapter import load_model
import layerscope.data.activations as activations

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

def forbidden(*args, **kwargs):
    raise RuntimeError("a weight analysis tried to open an activation cache")

activations.ActivationCache = forbidden
import numpy as np, pandas as pd
import gc
if not variant_is_naive:
    from layerscope.engines.weights import return_large_frees_to_the_os
    return_large_frees_to_the_os()  # as the workflow's stage functions do
import layerscope.experiments.weights.weight_spectra, layerscope.experiments.weights.weight_topology, layerscope.report.plotting  # imports before the baseline
del load_model(sys.argv[1], dtype="float32", device="cpu").model  # warm-up: transformers' lazy imports
gc.collect()
base = rss_mb()
wall, cpu = time.perf_counter(), time.process_time()
adapter = load_model(sys.argv[1], dtype="float32", device="cpu")
model_bytes = sum(p.numel() * 4 for p in adapter.model.parameters())
after_load = rss_mb()
variant, out = sys.argv[2], sys.argv[4]
from layerscope.engines.weights import weight_inventory, WeightSource
if variant == "weight_spectra":
    from layerscope.experiments.weights.weight_spectra import EXPERIMENT, to_result, weight_spectra
    from layerscope.jobs.writer import write_result
    result = weight_spectra(adapter, model="bench")
    write_result(EXPERIMENT, to_result(result), {k: f"{out}/{v.rsplit('/', 1)[-1]}" for k, v in EXPERIMENT.outputs("png").items()})
    check = {"n_matrices": result.summary["n_matrices"],
             "erank_ratio_q": round(result.summary["entropy_effective_rank_ratio_q"], 6)}
elif variant == "weight_topology":
    from layerscope.experiments.weights.weight_topology import EXPERIMENT, to_result, weight_topology
    from layerscope.jobs.writer import write_result
    result = weight_topology(adapter, model="bench")
    write_result(EXPERIMENT, to_result(result), {k: f"{out}/t_{v.rsplit('/', 1)[-1]}" for k, v in EXPERIMENT.outputs("png").items()})
    check = {"qk_sym": round(result.summary["qk_symmetric_energy_fraction_mean"], 6),
             "adjacent_corr_q": round(result.summary["cross_layer_adjacent_correlation_q"], 6)}
else:
    # the one-off script: every weight as a float64 copy up front
    source = WeightSource(adapter)
    inventory = weight_inventory(adapter)
    arrays = {w.name: source.matrix(w).double().clone() for w in inventory}
    if variant == "naive_spectra":
        svs = {n: torch.linalg.svdvals(a) for n, a in arrays.items()}
        q = [svs[f"q.{i}"] for i in range(adapter.n_layers)]
        er = [float(torch.exp(-(p * p.log()).sum())) / len(s) for s in q for p in [s**2 / (s**2).sum()]]
        check = {"n_matrices": len(svs), "erank_ratio_q": round(float(np.mean(er)), 6)}
    else:
        f = adapter.facts
        hd, sym = f.head_dim, []
        for i in range(f.n_layers):
            for h in range(f.n_heads):
                g = h // f.gqa_group
                m = arrays[f"q.{i}"][h * hd:(h + 1) * hd].T @ arrays[f"k.{i}"][g * hd:(g + 1) * hd]
                torch.linalg.svdvals(m)
                s = (m + m.T) / 2
                torch.linalg.eigvalsh(s)
                sym.append(float((s ** 2).sum() / (m ** 2).sum()))
        corr = {}
        for t in ("q", "k", "v", "o", "gate", "up", "down"):
            stack = [arrays[f"{t}.{i}"].flatten() for i in range(adapter.n_layers) if f"{t}.{i}" in arrays]
            if stack:
                corr[t] = torch.corrcoef(torch.stack(stack))
        sparsity = {t: float(sum(int((a.abs() < t).sum()) for a in arrays.values())) for t in (1e-4, 1e-3, 1e-2, 1e-1)}
        check = {"qk_sym": round(float(np.mean(sym)), 6),
                 "adjacent_corr_q": round(float(torch.diagonal(corr["q"], 1).mean()), 6)}
print(json.dumps({"variant": variant, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "peak_extra_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
                  "after_load_extra_mb": after_load - base, "model_mb": model_bytes / 2**20, "check": check}))
"""


def run(variant: str, model_dir: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), variant, str(threads), out],
                              capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model_dir}: not a prepared model (run the workflow's prepare_model first)")
    print(f"model {args.model_dir.name}; {args.threads} thread(s); each variant in a fresh process")
    for name in ("weight_spectra", "weight_topology"):
        ours, naive = run(name, args.model_dir, args.threads), run(f"naive_{name.split('_')[1]}", args.model_dir,
                                                                   args.threads)
        model_mb = ours["model_mb"]
        for label, r in ((name, ours), ("naive", naive)):
            print(f"  {label:16s} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  peak memory above imports "
                  f"{r['peak_extra_mb']:6.0f} MiB = {r['peak_extra_mb'] / model_mb:.2f} x the model's "
                  f"{model_mb:.0f} MiB  {r['check']}")
        print(f"  {name}: ratio to naive — wall {ours['wall_s'] / naive['wall_s']:.2f}, cpu "
              f"{ours['cpu_s'] / naive['cpu_s']:.2f}, extra peak memory {ours['peak_extra_mb'] / naive['peak_extra_mb']:.2f}")
    print("  the layerscope variants ran with ActivationCache disabled: no activation was loaded")

if __name__ == "__main__":
    main()
