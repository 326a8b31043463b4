"""Benchmark: the two per-layer sweeps of issue 6 against their naive implementations.

Run on demand (not a test):

    python benchmarks/bench_quantization_linearization.py [--model-dir resources/models/smollm2-135m]
        [--cache results/smollm2-135m/core/activations] [--threads 1]

Without ``--cache`` a small cache of random-token sequences is extracted into a temporary
folder first. In the same process it times

* the per-block quantization sweep at one bit width as layerscope runs it (block i's variant
  starts from the cached ``resid.i``) against the naive sweep that re-runs every block from the
  embeddings, and checks that both give the same losses;
* the linearization gap of one block with every (token, direction) copy of a sequence batched
  into one forward / one jvp per ε, against one forward and one jvp per copy, and checks that
  both give the same residuals;

and prints each ratio. On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP
spin-waiting (see README).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import layerscope  # noqa: F401,E402  (sets OMP_WAIT_POLICY=PASSIVE before torch loads)

REPO = Path(__file__).resolve().parents[1]


def random_cache(adapter, tokenizer, folder: Path, n: int = 4, length: int = 96):
    import torch

    from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations

    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(n):
        ids = torch.randint(10, adapter.facts.vocab_size, (length,), generator=g).tolist()
        roles = ["prompt"] * (length // 2) + ["completion"] * (length - length // 2)
        seqs.append(TokenSequence(f"p{i}", "c", ids, roles))
    extract_activations(adapter, tokenizer, seqs, folder / "resid.safetensors", folder / "tokens.parquet")
    return ActivationCache(folder)


def bench_quantization(adapter, cache, prompts: int, bits: int, max_target_tokens: int | None = None) -> None:
    import numpy as np

    from layerscope.engines.sampling import sample_cache_prompts
    from layerscope.engines.surgery import LossEvaluator
    from layerscope.engines.weights import WeightEditor
    from layerscope.experiments.nonlinearity.quantization import rtn

    prompt_ids, _ = sample_cache_prompts(cache.tokens, prompts, seed=0)  # stratified, as the experiment draws them
    ev = LossEvaluator(adapter, cache, prompt_ids=prompt_ids, max_target_tokens=max_target_tokens)
    editor = WeightEditor(adapter)
    identity = list(range(adapter.n_layers))
    results = {}
    ev.loss(identity)  # warm-up
    for name, kwargs in (("cached prefix", {}), ("naive re-run", {"use_cache": False})):
        start = time.perf_counter()
        losses = []
        for layer in range(adapter.n_layers):
            with editor.variant():
                editor.edit(layer, None, rtn(bits, 128))
                prefix = {"max_prefix": layer} if not kwargs else {}
                losses.append(ev.loss(identity, **kwargs, **prefix))
        results[name] = (time.perf_counter() - start, np.asarray(losses))
    (t_fast, fast), (t_slow, slow) = results["cached prefix"], results["naive re-run"]
    print(f"per-block quantization sweep at {bits} bits over {adapter.n_layers} blocks, {ev.n_targets} tokens:")
    print(f"  cached prefix {t_fast:.2f}s, naive re-run {t_slow:.2f}s: ratio {t_slow / t_fast:.2f}x faster; "
          f"max |Δ loss| between them {np.abs(fast - slow).max():.2e}")


def bench_linearization(adapter, cache, layer: int, tokens: int, directions: int) -> None:
    import numpy as np
    import torch

    from layerscope.experiments.nonlinearity.linearization import _BatchedInputs, _directions, linearization_gap, sample_sequences

    adapter.use_attention("eager")
    adapter.model.requires_grad_(False)
    seq = sample_sequences(cache, n_sequences=1, tokens_per_sequence=tokens, seed=0)[0][0]
    batched = _BatchedInputs(adapter, seq.ids)
    h = cache.resid(layer, slice(*seq.rows))[None]
    v, _ = _directions(h, seq.positions, directions, torch.Generator().manual_seed(0))
    eps = [0.01, 0.03, 0.1, 0.3]
    n = v.shape[0]

    def block(batch):
        inputs = batched(batch)
        return lambda z: adapter.run_block(layer, z, inputs)

    linearization_gap(block(1), h, v[:1], eps)  # warm-up: first-call costs stay out of both timings
    linearization_gap(block(n), h.expand(n, -1, -1), v, eps)
    start = time.perf_counter()
    together = linearization_gap(block(n), h.expand(n, -1, -1), v, eps).residual
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    one = np.concatenate([linearization_gap(block(1), h, v[i : i + 1], eps).residual for i in range(n)])
    t_single = time.perf_counter() - start
    print(f"linearization gap of block {layer}: {n} (token, direction) copies of a {h.shape[1]}-token sequence:")
    print(f"  batched {t_batched:.2f}s, one copy at a time {t_single:.2f}s: ratio {t_single / t_batched:.2f}x faster; "
          f"max relative difference {np.max(np.abs(together - one) / one):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO.parent / "shared/models/stories260K")
    parser.add_argument("--cache", type=Path, default=None, help="an activation cache folder of this model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--max-target-tokens", type=int, default=None,
                        help="completion tokens per prompt the loss is evaluated on (the experiment's parameter)")
    args = parser.parse_args()

    import torch

    from layerscope.data.activations import ActivationCache
    from layerscope.model.adapter import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    adapter = load_model(args.model_dir, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        cache = ActivationCache(args.cache) if args.cache else random_cache(adapter, load_tokenizer(args.model_dir),
                                                                           Path(tmp))
        bench_quantization(adapter, cache, args.prompts, args.bits, args.max_target_tokens)
        bench_linearization(adapter, cache, adapter.n_layers // 2, tokens=2, directions=2)


if __name__ == "__main__":
    main()
