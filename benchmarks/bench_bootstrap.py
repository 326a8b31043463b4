"""Benchmark: the cost of the shared bootstrap against the forward passes it never adds.

Run on demand (not a test):

    python benchmarks/bench_bootstrap.py [--prompts 7] [--layers 30] [--n-boot 1000]

Uses the statistics engine (:class:`layerscope.engines.statistics.Bootstrap`) the way the
surgery experiments do: per-prompt loss sums and token counts for a baseline and one
variant per block, the interval of every knockout ratio (resampled as a ratio of two
token-weighted means) and the stability of the most critical block. Compared with

* a plain Python loop over resamples computing the same statistics (the naive bootstrap),
  checked to give the same intervals;
* one forward-pass equivalent: the time of a batched matmul of the size of one SmolLM2-135M
  block on the sample's tokens, times the number of blocks (a lower bound on a forward pass).

Prints the three times and the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from layerscope.engines.statistics import Bootstrap, weighted_mean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=7)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--tokens-per-prompt", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    n, L = args.prompts, args.layers
    counts = rng.integers(5, 17, size=n).astype(float)
    base = counts * rng.uniform(0.3, 0.8, size=n)
    knocked = base[:, None] * rng.uniform(1.1, 20, size=(n, L))

    def ratio(b, k, c):
        return (k.sum(axis=1) / c.sum(axis=1)[:, None]) / (b.sum(axis=1) / c.sum(axis=1))[:, None]

    start = time.perf_counter()
    boot = Bootstrap(n, n_boot=args.n_boot, seed=0)
    _, ci = boot.interval(base, knocked, counts, statistic=ratio)
    boot.stability(base, knocked, counts, statistic=ratio)
    boot.interval(base, counts, statistic=weighted_mean)
    engine = time.perf_counter() - start

    start = time.perf_counter()
    values = []
    for row in boot.index:
        b, k, c = base[row], knocked[row], counts[row]
        values.append((k.sum(0) / c.sum()) / (b.sum() / c.sum()))
    values = np.array(values)
    naive_ci = np.quantile(values, [0.025, 0.975], axis=0).T
    for row in boot.index:
        int(np.argmax((knocked[row].sum(0) / counts[row].sum()) / (base[row].sum() / counts[row].sum())))
    naive = time.perf_counter() - start
    point = ratio(base[None], knocked[None], counts[None])[0]
    expected = np.column_stack([np.minimum(naive_ci[:, 0], point), np.maximum(naive_ci[:, 1], point)])
    assert np.allclose(np.array(ci, dtype=float), expected), "engine and loop disagree"

    d, hidden, tokens = 576, 1536, int(n * args.tokens_per_prompt)
    x = torch.randn(tokens, d)
    w = [torch.randn(d, d) for _ in range(4)] + [torch.randn(d, hidden), torch.randn(d, hidden), torch.randn(hidden, d)]
    start = time.perf_counter()
    for _ in range(L):
        for m in w[:4]:
            x @ m
        (x @ w[4]) * (x @ w[5]) @ w[6]
    forward = time.perf_counter() - start

    print(f"{n} prompts, {L} blocks, {args.n_boot} resamples")
    print(f"engine bootstrap (intervals + stability): {engine * 1e3:8.1f} ms")
    print(f"naive loop bootstrap:                     {naive * 1e3:8.1f} ms   ({naive / engine:.1f}x the engine)")
    print(f"one forward pass (matmuls only, {tokens} tokens): {forward * 1e3:8.1f} ms   "
          f"(bootstrap = {engine / forward:.2f} forward passes)")


if __name__ == "__main__":
    main()
