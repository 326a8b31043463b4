"""Benchmark: peak memory of the cache-reading geometry experiments, lazy (layer by layer) vs all layers in memory.

Run on demand (not a test):

    python benchmarks/bench_geometry.py [--cache results/smollm2-135m/core/activations]

``residual_geometry`` and ``delta_svd`` read the activation cache one layer at a time
(``delta_svd`` holds two). Each is run in a fresh subprocess twice on the same cache:
(a) as the workflow runs it, reading lazily from ``resid.safetensors``; (b) a naive
version that first loads every layer into memory (``safetensors.torch.load_file``) and
then runs the identical computation from that in-memory copy. Peak memory is the peak of
the process's anonymous resident memory (RssAnon, sampled every 2 ms; the file pages a
lazy read maps are the kernel's page cache, not the process's) above its level after the
imports, with glibc's mmap threshold fixed so that freed buffers are returned at once. It prints both peaks next to the cache size and one layer's size, the ratios, and
the wall times, and checks that both versions give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "results/smollm2-135m/core/activations"


def rss_anon_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_anon_kib(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_anon_kib())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, rss_anon_kib())


class InMemoryCache:
    """The ActivationCache interface served from a dict of every layer (the naive version)."""

    def __init__(self, directory: Path):
        from safetensors.torch import load_file

        from layerscope.data.activations import ActivationCache

        lazy = ActivationCache(directory)
        self.directory, self.n_layers, self.d_model, self.n_tokens = directory, lazy.n_layers, lazy.d_model, lazy.n_tokens
        self.tokens = lazy.tokens
        # every layer, copied into memory now (load_file alone may map the file without reading it)
        self.layers = {name: tensor.clone() for name, tensor in load_file(str(directory / "resid.safetensors")).items()}

    def resid(self, layer, rows=None, dtype=None):
        import numpy as np
        import torch

        tensor = self.layers[f"resid.{layer}"]
        if isinstance(rows, slice):
            tensor = tensor[rows]
        elif rows is not None:
            tensor = tensor[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
        return tensor.to(dtype or torch.float32)


def child(experiment: str, mode: str, cache_dir: Path, threads: int) -> dict:
    import torch

    from layerscope.data.activations import ActivationCache
    from layerscope.experiments.geometry.delta_svd import delta_svd
    from layerscope.experiments.geometry.residual_geometry import residual_geometry

    torch.set_num_threads(threads)
    baseline = rss_anon_kib()
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    cache = ActivationCache(cache_dir) if mode == "lazy" else InMemoryCache(cache_dir)
    run = residual_geometry if experiment == "residual_geometry" else delta_svd
    result = run(cache, model="bench", prompt_set="bench")
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    key = "pr_min" if experiment == "residual_geometry" else "effective_rank_mean"
    return {"peak_mib": (peak - baseline) / 1024, "seconds": seconds, "check": result.summary[key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="an activation cache folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("EXPERIMENT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.cache, args.threads)))
        return
    resid = args.cache / "resid.safetensors"
    if not resid.is_file():
        sys.exit(f"no activation cache at {args.cache}: run `snakemake --cores all "
                 f"results/smollm2-135m/core/activations/resid.safetensors` first, or pass --cache")
    from layerscope.data.activations import ActivationCache

    cache = ActivationCache(args.cache)
    layer_mib = cache.n_tokens * cache.d_model * 4 / 2**20
    size_mib = resid.stat().st_size / 2**20
    print(f"cache {args.cache}: {cache.n_layers + 1} sites × {cache.n_tokens} tokens × d={cache.d_model}; "
          f"{size_mib:.1f} MiB on disk, one layer {layer_mib:.1f} MiB (float32)")
    # a fixed glibc mmap threshold: freed large buffers go back to the OS at once, so the sampled
    # resident memory is live data rather than what the allocator's dynamic threshold keeps around
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    for experiment in ("residual_geometry", "delta_svd"):
        out = {}
        for mode in ("lazy", "naive"):
            proc = subprocess.run([sys.executable, __file__, "--cache", str(args.cache), "--threads", str(args.threads),
                                   "--child", experiment, mode], capture_output=True, text=True, env=env, check=True)
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        lazy, naive = out["lazy"], out["naive"]
        same = abs(lazy["check"] - naive["check"]) <= 1e-9 * max(1.0, abs(naive["check"]))
        print(f"{experiment:18s} peak extra memory: lazy {lazy['peak_mib']:7.1f} MiB "
              f"({lazy['peak_mib'] / layer_mib:4.1f} layers, {lazy['peak_mib'] / size_mib:5.1%} of the cache) | "
              f"all layers in memory {naive['peak_mib']:7.1f} MiB ({naive['peak_mib'] / layer_mib:4.1f} layers) | "
              f"ratio naive/lazy {naive['peak_mib'] / lazy['peak_mib']:.2f}× | "
              f"time lazy {lazy['seconds']:.1f} s, naive {naive['seconds']:.1f} s | same numbers: {same}")


if __name__ == "__main__":
    main()
