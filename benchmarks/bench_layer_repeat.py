"""Benchmark: the layer_repeat sweep through the surgery engine vs a naive re-run of every variant.

Run on demand (not a test):

    python benchmarks/bench_layer_repeat.py [--prompts 7] [--max-target-tokens 16] [--max-repeats 3] [--no-pairs]
                                            [--stride 1] [--experiment]

On SmolLM2-135M (CPU), the variants of the default ``layer_repeat`` job — every block skipped,
every block applied r = 2 … R times in place, every contiguous pair applied twice — on the
seeded, category-stratified sample of N prompts the experiment draws, computed by

* the engine — :class:`layerscope.engines.surgery.LossEvaluator`, as the experiment runs it: a
  repeat of block i starts from the cached ``resid.{i+1}``, the repeats of one block share their
  head ``[0 … i, i]``, packed prompts, read-out at completion-predicting positions only;
* the naive re-run — :func:`layerscope.engines.surgery.naive_losses`: the model's own forward
  with its layer list replaced, every block on every token, logits everywhere, with its best
  batching (timed first).

The variants are ordered block by block (so a chunk keeps a block's repeats together) and the
two implementations alternate chunk by chunk in the same process (see ``bench_surgery.race``).
It prints both times, their ratio, the block calls each made and the largest absolute difference
of the losses. ``--stride k`` keeps the variants of every k-th block only (all depths still
covered; the naive re-run of the full sweep takes long on a busy machine); ``--experiment`` also
times the whole experiment function (full sweep, bootstrap and summary) on the same engine.

The model and activation cache are the default run's (``resources/models/smollm2-135m``,
``results/smollm2-135m/core/activations``); see ``bench_surgery.py`` for what happens when they
are missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_surgery import DEFAULT_CACHE, DEFAULT_MODEL, best_naive_batch, open_engine, race  # noqa: E402

TARGET = 0.5  # engine time / naive time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--prompts", type=int, default=7, help="stratified sample of N prompts of the cache")
    parser.add_argument("--max-target-tokens", type=int, default=16, help="first K completion tokens per prompt")
    parser.add_argument("--max-repeats", type=int, default=3)
    parser.add_argument("--no-pairs", action="store_true", help="leave out the pair repeats")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt sample and the bootstrap")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=6, help="alternate engine and naive over this many chunks")
    parser.add_argument("--stride", type=int, default=1, help="the variants of every k-th block only")
    parser.add_argument("--experiment", action="store_true", help="also time the whole experiment function")
    args = parser.parse_args()

    from layerscope.engines.surgery import skip
    from layerscope.experiments.surgery.layer_repeat import layer_repeat, repeat, repeat_pair

    engine = open_engine(args)
    L = engine.n_layers
    naive_batch = best_naive_batch(engine, args.batch_size)
    variants = []
    for i in range(0, L, args.stride):
        variants.append(skip(L, i))
        variants += [repeat(L, i, r) for r in range(2, args.max_repeats + 1)]
        if not args.no_pairs and i < L - 1:
            variants.append(repeat_pair(L, i))
    engine.losses([list(range(L))])  # warm-up (captures block inputs)
    calls = engine.blocks_run
    t_engine, t_naive, diff = race("layer_repeat", engine, variants, naive_batch, args.chunks)
    engine_calls = engine.blocks_run - calls
    naive_calls = sum(len(v) for v in variants)
    ratio = t_engine / t_naive
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"layer_repeat: {len(variants)} variants; engine {t_engine:.1f}s ({engine_calls} block calls), naive "
          f"{t_naive:.1f}s ({naive_calls} block calls); ratio {ratio:.3f} ({verdict} the target {TARGET}); "
          f"max |loss difference| {diff:.2e} nats", flush=True)
    if not args.experiment:
        return 0
    started = time.perf_counter()
    result = layer_repeat(engine, model=args.model_dir.name, prompt_set="core", max_repeats=args.max_repeats,
                          pairs=not args.no_pairs, seed=args.seed)
    s = result.summary
    print(f"experiment function (sweep + bootstrap + summary): {time.perf_counter() - started:.1f}s; most tolerant "
          f"block {s['most_tolerant_layer']} ({s['most_tolerant_layer_stability']:.0%} of resamples), Spearman "
          f"{s['repeat_vs_skip_spearman']} {s['repeat_vs_skip_spearman_ci']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
