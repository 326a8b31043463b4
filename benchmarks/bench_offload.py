"""Benchmark: a model bigger than the memory it is given, run with disk offload.

Run on demand (not a test):

    python benchmarks/bench_offload.py [--layers 24] [--hidden 768] [--budget 100MB] [--sequences 8]
    python benchmarks/bench_offload.py --model-dir /work/run/resources/models/smollm2-135m --budget 100MB

A randomly initialised Llama (default ~0.6 GB in float32; or a prepared model folder) is
saved as safetensors; then, each in its own subprocess (so each peak RSS is its own, read from
VmHWM):

* **in memory** — the whole model loaded as usual;
* **offloaded** — ``max_memory={"cpu": budget}`` with the budget at most a quarter of the
  model: accelerate keeps what fits in memory and offloads the rest to disk, reading every
  offloaded module's weights back for each forward.

Each run extracts the activation cache of ``--sequences`` random token sequences and runs a
knockout sweep (the baseline and every single-block knockout) of the loss evaluator on it.
Prints tokens/s of both stages, peak RSS, the offloaded bytes, and checks that the offloaded
run's cache and losses equal the in-memory run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RUN = textwrap.dedent("""
    import json, sys, time, torch
    from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
    from layerscope.engines.surgery import LossEvaluator, skip
    from layerscope.model.adapter import load_model

    model_dir, out_dir, placement, n_seq, length = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(int(sys.argv[6]))
    t0 = time.perf_counter()
    adapter = load_model(model_dir, dtype="float32", placement=placement)
    load_s = time.perf_counter() - t0

    class Tok:  # the cache's token table needs only decode and a pad id
        pad_token_id = 0
        def batch_decode(self, ids):
            return [str(i[0]) for i in ids]

    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(n_seq):
        ids = torch.randint(1, adapter.facts.vocab_size, (length,), generator=g).tolist()
        roles = ["prompt"] * (length // 2) + ["completion"] * (length - length // 2)
        seqs.append(TokenSequence(f"s{i}", "c", ids, roles))
    t0 = time.perf_counter()
    extract_activations(adapter, Tok(), seqs, f"{out_dir}/resid.safetensors", f"{out_dir}/tokens.parquet", batch_size=4)
    extract_s = time.perf_counter() - t0
    cache = ActivationCache(out_dir)
    evaluator = LossEvaluator(adapter, cache, batch_size=4, layout="padded")
    sequences = [list(range(adapter.n_layers))] + [skip(adapter.n_layers, i) for i in range(adapter.n_layers)]
    t0 = time.perf_counter()
    losses = evaluator.losses(sequences)
    sweep_s = time.perf_counter() - t0
    tied = set(getattr(adapter.model, "all_tied_weights_keys", {}) or {})  # tied copies count once
    params = [(n, p) for n, p in adapter.model.named_parameters(remove_duplicate=False) if n not in tied]
    params = list({id(p): (n, p) for n, p in params}.values())
    offloaded = sum(p.numel() * p.element_size() for _, p in params if p.device.type == "meta")
    total = sum(p.numel() * p.element_size() for _, p in params)
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"load_s": load_s, "extract_s": extract_s, "sweep_s": sweep_s, "tokens": n_seq * length,
                      "block_positions": evaluator.blocks_run and evaluator.positions_per_block,
                      "blocks_run": evaluator.blocks_run, "losses": losses, "peak_rss": hwm,
                      "offloaded": offloaded, "weights": total,
                      "device_map": sorted(set(map(str, getattr(adapter.model, "hf_device_map", {"": "cpu"}).values())))}))
""")


def run(model_dir, out_dir, placement, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RUN, str(model_dir), str(out_dir), json.dumps(placement),
                           str(args.sequences), str(args.length), str(args.threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", help="a prepared model folder (default: a random Llama)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--budget", default="100MB", help="max_memory of the CPU in the offloaded run")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from layerscope.model.placement import parse_size

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                 num_key_value_heads=args.hidden // 64, vocab_size=args.vocab, tie_word_embeddings=False)
            torch.manual_seed(0)
            model_dir = tmp / "model"
            LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
        (tmp / "mem").mkdir()
        (tmp / "off").mkdir()
        mem = run(model_dir, tmp / "mem", {}, args)
        off = run(model_dir, tmp / "off", {"max_memory": {"cpu": args.budget}}, args)
        from safetensors.torch import load_file

        a, b = load_file(str(tmp / "mem" / "resid.safetensors")), load_file(str(tmp / "off" / "resid.safetensors"))
        cache_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    budget = parse_size(args.budget)
    loss_diff = max(abs(x - y) for x, y in zip(mem["losses"], off["losses"]))
    mib = 2**20
    print(f"model: {mem['weights'] / mib:.0f} MiB of float32 weights; offloaded run: max_memory cpu {args.budget} "
          f"({mem['weights'] / budget:.1f}x smaller than the model), devices {off['device_map']}, "
          f"{off['offloaded'] / mib:.0f} MiB offloaded to disk")
    print(f"{'run':<10} {'load s':>7} {'extract tok/s':>14} {'sweep tok/s':>12} {'peak RSS MiB':>13}")
    for name, r in (("in memory", mem), ("offloaded", off)):
        sweep_tokens = r["tokens"] * (len(r["losses"]))  # each variant reads every token once
        print(f"{name:<10} {r['load_s']:>7.1f} {r['tokens'] / r['extract_s']:>14.0f} {sweep_tokens / r['sweep_s']:>12.0f} "
              f"{r['peak_rss'] / mib:>13.0f}")
    print(f"peak RSS saved: {(mem['peak_rss'] - off['peak_rss']) / mib:.0f} MiB (offloaded weights "
          f"{off['offloaded'] / mib:.0f} MiB); knockout variants: {len(mem['losses'])}, "
          f"max |Δ cache| {cache_diff:.2e}, max |Δ loss| {loss_diff:.2e}")


if __name__ == "__main__":
    main()
