"""Single-stream decode speed of lmpack's runtime against its peers, side by side in one run.

    python bench/decode.py lmpack:dist/VARIANT_INT8 lmpack:dist/VARIANT_INT4 \
        transformers:HF_DIR genai:GENAI_MODEL_DIR llamacpp:FILE.gguf openvino:OV_MODEL_DIR [--tokens 128] [--repeat 3]

Each engine runs in its own process (so peak RSS and cold start are its own) and loads its model once,
then generates --repeat times with 2 threads, greedy decoding, the same prompt and the same number of
new tokens; the best run is kept.
An engine whose library is not installed is reported as skipped. Also prints the memory-bandwidth
bound: a decoder reads every weight once per token, so model bytes / bandwidth (read with as many
threads as the engines use) is the fastest a token can be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The history of the railway in England began"


def _lmpack(path: str, tokens: int, threads: int):
    from lmpack.runtime.engine import DecoderEngine
    from lmpack.runtime.sampling import SamplingParams
    from lmpack.runtime.select import prepare_variant

    engine = DecoderEngine(prepare_variant(Path(path)), threads=threads)
    ids = engine.encode_prompt(PROMPT)

    def run() -> dict:
        result = engine.generate(ids, SamplingParams(max_tokens=tokens, temperature=0.0)).result(None)
        return {
            "new_tokens": result.completion_tokens,
            "prompt_tokens": result.prompt_tokens,
            "prefill_s": result.prefill_seconds,
            "decode_s": result.decode_seconds,
        }

    return run


def _transformers(path: str, tokens: int, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def run() -> dict:
        with torch.no_grad():
            started = time.perf_counter()
            model(ids)  # prefill alone, to split prefill from decode
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            total = time.perf_counter() - started
        return {
            "new_tokens": out.shape[1] - ids.shape[1],
            "prompt_tokens": ids.shape[1],
            "prefill_s": prefill,
            "decode_s": max(total - prefill, 1e-9),
        }

    return run


def _genai(path: str, tokens: int, threads: int):
    import onnxruntime_genai as og

    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(PROMPT)

    def run() -> dict:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        prefill = time.perf_counter() - started
        count = 1
        started = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        return {
            "new_tokens": count,
            "prompt_tokens": len(ids),
            "prefill_s": prefill,
            "decode_s": time.perf_counter() - started,
        }

    return run


def _llamacpp(path: str, tokens: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
    ids = llm.tokenize(PROMPT.encode())

    def run() -> dict:
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - started
        count = 0
        started = time.perf_counter()
        for _ in range(tokens):
            token = llm.sample(temp=0.0)
            llm.eval([token])
            count += 1
        return {
            "new_tokens": count,
            "prompt_tokens": len(ids),
            "prefill_s": prefill,
            "decode_s": time.perf_counter() - started,
        }

    return run


def _openvino(path: str, tokens: int, threads: int):
    """OpenVINO GenAI's LLMPipeline on a model exported by optimum-intel (bench/README.md says how). Its own
    performance counters split the time: time to first token is the prefill (with the first token, as for the
    other engines), the rest is decode."""
    import openvino_genai as ov_genai

    pipe = ov_genai.LLMPipeline(path, "CPU", INFERENCE_NUM_THREADS=threads)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = tokens
    config.do_sample = False
    config.apply_chat_template = False  # the same raw prompt as every other engine

    def run() -> dict:
        metrics = pipe.generate([PROMPT], config).perf_metrics
        prefill = metrics.get_ttft().mean / 1000
        return {
            "new_tokens": metrics.get_num_generated_tokens(),
            "prompt_tokens": metrics.get_num_input_tokens(),
            "prefill_s": prefill,
            "decode_s": metrics.get_generate_duration().mean / 1000 - prefill,
        }

    return run


# Each loads its model once and returns a function that runs one generation, so --repeat measures the
# same loaded engine again (and peak RSS is one engine's, not two overlapping while the first is freed).
ENGINES = {
    "lmpack": _lmpack,
    "transformers": _transformers,
    "genai": _genai,
    "llamacpp": _llamacpp,
    "openvino": _openvino,
}


def _child(engine: str, path: str, tokens: int, threads: int, repeat: int) -> None:
    """Runs in the engine's own process; prints one JSON line."""
    started = time.perf_counter()
    try:
        run = ENGINES[engine](path, tokens, threads)
        runs = [run() for _ in range(repeat)]
    except ImportError as exc:
        print(json.dumps({"skipped": f"{type(exc).__name__}: {exc}"}))
        return
    best = max(runs, key=lambda r: (r["new_tokens"] - 1) / r["decode_s"])
    best["wall_s"] = time.perf_counter() - started
    best["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(best))


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the process's peak resident memory. (getrusage's ru_maxrss would not do: it survives exec, so a
    child would report the parent's peak when that is larger.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bandwidth_gbs(threads: int) -> float:
    """Read bandwidth with `threads` threads (the engines' own count), each taking the max of its share of
    512 MB of bytes; best of 5. A decoder's threads read the weights together, so one thread's bandwidth
    would understate the bound (here 10 GB/s with one thread, 20 with two). The max, not a sum: numpy's
    float64 sum is slower than the memory on some CPUs (8 GB/s a thread here), so it measured numpy."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(512 * 1024 * 1024, dtype=np.uint8)
    shares = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:  # numpy lets go of the GIL while it reduces
        for _ in range(5):
            started = time.perf_counter()
            list(pool.map(np.max, shares))
            best = max(best, data.nbytes / (time.perf_counter() - started) / 1e9)
    return best


def weights_bytes(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(
        f.stat().st_size
        for f in p.rglob("*")
        if f.suffix in (".onnx", ".data", ".safetensors")
        or f.name.endswith((".onnx.data", ".onnx_data"))
        or f.name == "openvino_model.bin"  # not the tokenizer's openvino_tokenizer.bin beside it
    )


def run_child(args: list[str], threads: int) -> dict:
    """`python ARGS` in a process of its own with `threads` threads: the last JSON line it prints, or
    {"failed": its last line of stderr}."""
    child = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        return {"failed": (child.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def measure(engine: str, path: str, *, tokens: int, threads: int, repeat: int) -> dict:
    """One engine in its own process: its best run, or {"skipped": why} / {"failed": why}."""
    if engine not in ENGINES:
        raise SystemExit(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    options = ["--tokens", str(tokens), "--threads", str(threads), "--repeat", str(repeat)]
    result = run_child([__file__, "--child", engine, path, *options, "x"], threads)
    if "failed" in result:
        return result
    if "skipped" not in result:
        result["weights_bytes"] = weights_bytes(path)
        result["decode_tok_s"] = (result["new_tokens"] - 1) / result["decode_s"]
        result["prefill_tok_s"] = result["prompt_tokens"] / result["prefill_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", help="ENGINE:PATH with ENGINE one of " + ", ".join(ENGINES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.tokens, args.threads, args.repeat)
        return
    bandwidth = bandwidth_gbs(args.threads)
    print(f"memory bandwidth ({args.threads} threads reading): {bandwidth:.1f} GB/s")
    print("| engine | model | weights MB | bound tok/s | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.engines:
        engine, _, path = spec.partition(":")
        r = measure(engine, path, tokens=args.tokens, threads=args.threads, repeat=args.repeat)
        if "skipped" in r or "failed" in r:
            print(f"| {engine} | {path} | {r.get('skipped') or 'failed: ' + r['failed']} ||||||")
            continue
        weights = r["weights_bytes"]
        print(
            f"| {engine} | {Path(path).name} | {weights / 1e6:.0f} | {bandwidth * 1e9 / weights:.0f} | "
            f"{r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {r['prefill_s'] * 1000:.0f} | "
            f"{r['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
