"""lmpack's variants on one GPU against transformers + PyTorch (fp16, eager) on the same GPU, in one run.

    python bench/gpu.py dist/MODEL-a100-fp16 dist/MODEL-a100-int4 --hf HF_DIR [--tokens 64] [--prompt-tokens 1000]
        [--provider cuda|cpu] [--json OUT.json]

For each lmpack variant (each in its own process, loaded the way `lmpack serve` loads it): decode tokens/s of one
sequence and of 8 decoded together (lmpack's batched steps, the batcher's path), time to first token for a prompt
of --prompt-tokens tokens, and the peak GPU memory the process held (NVML, per process). For --hf, the same with
transformers' generate at fp16. Then the GPU issue's goals: at least 3x PyTorch eager at batch 1 and 8, and peak
GPU memory under 1.3x the weights plus the KV cache. `--provider cpu` runs everything on the CPU (a dry run of the
script where there is no GPU, as its test does); the numbers then say nothing about a GPU.
Never yet run on a GPU (docs/gpu-targets.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import PROMPT, run_child, weights_bytes  # noqa: E402

BATCH = 8
PROMPTS = [PROMPT, "Once upon a time", "The station clock", "In the year 1900", "Steam", "A map of", "Rain", "Bread"]


def _gpu_memory_used() -> int | None:
    """This process's GPU memory through NVML, None where NVML or the query is not there."""
    from lmpack.nvml import NvmlUnavailable, nvml, nvml_value

    try:
        with nvml() as pynvml:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            running = nvml_value(pynvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
            return next((int(p.usedGpuMemory) for p in running if p.pid == os.getpid() and p.usedGpuMemory), None)
    except NvmlUnavailable:
        return None


def _long_prompt(tokenizer_encode, tokens: int) -> list[int]:
    from lmpack.data import all_eval_text

    ids = tokenizer_encode(all_eval_text())
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def _lmpack(path: str, tokens: int, prompt_tokens: int, provider: str) -> dict:
    from dataclasses import replace

    import numpy as np

    from lmpack.runtime.engine import DecoderEngine
    from lmpack.runtime.select import prepare_variant
    from lmpack.runtime.sessions import KVCache
    from lmpack.runtime.variant import load_variant

    if provider == "cpu":  # the dry run: any variant, on the CPU, whatever it was built for
        variant = replace(load_variant(Path(path)), providers=["CPUExecutionProvider"])
    else:
        variant = prepare_variant(Path(path))
    engine = DecoderEngine(variant)
    runner = engine.runner
    session_providers = runner.session.get_providers()

    def one(ids: list[int], cache: KVCache) -> int:
        return int(np.argmax(runner.step(ids, cache)))

    cache = KVCache()  # batch 1: a prompt, then one token a step
    token = one(engine.encode_prompt(PROMPT), cache)
    started = time.perf_counter()
    for _ in range(tokens):
        token = one([token], cache)
    single = tokens / (time.perf_counter() - started)

    batch, last = runner.new_batch(BATCH), []
    for prompt in PROMPTS[:BATCH]:
        cache = KVCache()
        last.append(one(engine.encode_prompt(prompt), cache))
        batch.join(cache)
    started = time.perf_counter()
    for _ in range(tokens):
        last = [int(t) for t in np.argmax(runner.step_batch(last, batch), axis=-1)]
    batched = BATCH * tokens / (time.perf_counter() - started)

    long = _long_prompt(lambda text: engine.text_tokenizer.encode(text).ids, prompt_tokens)
    one(long[:16], KVCache())  # warm the prompt path
    started = time.perf_counter()
    one(long, KVCache())
    ttft = time.perf_counter() - started
    info = variant.info
    kv_bytes = (
        2 * info["num_layers"] * info["num_kv_heads"] * info["head_dim"] * (prompt_tokens + tokens) * BATCH * 2
        if "num_layers" in info
        else None
    )
    return {
        "engine": "lmpack",
        "model": Path(path).name,
        "providers": session_providers,
        "weights_bytes": weights_bytes(path),
        "kv_cache_bytes_fp16": kv_bytes,
        "decode_tok_s_batch1": single,
        f"decode_tok_s_batch{BATCH}": batched,
        "ttft_s": ttft,
        "prompt_tokens": len(long),
        "peak_gpu_bytes": _gpu_memory_used(),
    }


def _transformers(path: str, tokens: int, prompt_tokens: int, provider: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if provider == "cuda" else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device).eval()

    def generate(prompts: list[str]) -> float:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # prefill, warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
        return len(prompts) * tokens / (time.perf_counter() - started)

    single, batched = generate([PROMPT]), generate(PROMPTS[:BATCH])
    long = torch.tensor([_long_prompt(lambda text: tokenizer(text).input_ids, prompt_tokens)], device=device)
    with torch.no_grad():
        started = time.perf_counter()
        model(long)
        if device == "cuda":
            torch.cuda.synchronize()
        ttft = time.perf_counter() - started
    return {
        "engine": "transformers",
        "model": Path(path).name,
        "providers": [f"torch {device} {str(dtype).removeprefix('torch.')} (eager)"],
        "decode_tok_s_batch1": single,
        f"decode_tok_s_batch{BATCH}": batched,
        "ttft_s": ttft,
        "prompt_tokens": int(long.shape[1]),
        "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
    }


ENGINES = {"lmpack": _lmpack, "transformers": _transformers}


def goals(rows: list[dict]) -> list[str]:
    """The GPU issue's goals, met or not, for every lmpack row against the transformers row."""
    baseline = next((r for r in rows if r.get("engine") == "transformers" and "failed" not in r), None)
    lines = []
    for row in rows:
        if row.get("engine") != "lmpack" or "failed" in row:
            continue
        if baseline is not None:
            for key in ("decode_tok_s_batch1", f"decode_tok_s_batch{BATCH}"):
                ratio = row[key] / baseline[key]
                lines.append(
                    f"{row['model']} {key}: {ratio:.2f}x PyTorch eager (goal 3x): {'met' if ratio >= 3 else 'not met'}"
                )
        if row.get("peak_gpu_bytes") and row.get("kv_cache_bytes_fp16"):
            ratio = row["peak_gpu_bytes"] / (row["weights_bytes"] + row["kv_cache_bytes_fp16"])
            lines.append(
                f"{row['model']} peak GPU memory {ratio:.2f}x weights + KV cache (goal 1.3x): "
                f"{'met' if ratio <= 1.3 else 'not met'}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", type=Path, help="lmpack variant directories")
    parser.add_argument("--hf", type=Path, help="the source model's Hugging Face directory, for the PyTorch row")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, path = args.child
        print(json.dumps(ENGINES[engine](path, args.tokens, args.prompt_tokens, args.provider)))
        return
    options = ["--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens), "--provider", args.provider]
    jobs = [("lmpack", str(v)) for v in args.variants] + ([("transformers", str(args.hf))] if args.hf else [])
    rows = []
    for engine, path in jobs:
        row = run_child([__file__, "--child", engine, path, *options], threads=os.cpu_count() or 1)
        rows.append({"engine": engine, "model": Path(path).name, **row})
        print(json.dumps(rows[-1]), flush=True)
    print(f"| engine | model | providers | tok/s batch 1 | tok/s batch {BATCH} | TTFT s | peak GPU MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['engine']} | {r['model']} | failed: {r['failed']} | | | | |")
            continue
        peak = f"{r['peak_gpu_bytes'] / 1e6:.0f}" if r.get("peak_gpu_bytes") else "-"
        print(
            f"| {r['engine']} | {r['model']} | {', '.join(r['providers'])} | {r['decode_tok_s_batch1']:.1f} | "
            f"{r[f'decode_tok_s_batch{BATCH}']:.1f} | {r['ttft_s']:.3f} | {peak} |"
        )
    for line in goals(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"provider": args.provider, "rows": rows, "goals": goals(rows)}, indent=2))


if __name__ == "__main__":
    main()
