"""lmpack against its peers on one model, in one run: the comparison issue 4 asks for, with its goals checked.

    python bench/peers.py --int8 dist/VARIANT_INT8 --int4 dist/VARIANT_INT4 --hf HF_DIR --genai GENAI_INT4_DIR \
        --q8 MODEL.q8_0.gguf --q4 MODEL.Q4_1.gguf [--ov8 OV_INT8_DIR --ov4 OV_INT4_DIR] [--tokens 128] \
        [--threads 2] [--json OUT.json] [--svg OUT.svg]

1. Single stream (bench/decode.py, each engine in its own process, same prompt, greedy, --tokens new
   tokens; --repeat rounds that take the engines in turn, best round kept): lmpack int8 and int4,
   transformers (PyTorch fp32), onnxruntime-genai int4 (its own builder), llama.cpp q8_0 and Q4_1,
   OpenVINO GenAI int8 and int4 (optimum-intel's export): decode and prefill tokens/s,
   time to first token, peak RSS, and the memory-bandwidth bound (weights bytes / the bandwidth measured with
   --threads threads).
2. Through the HTTP server, for each lmpack variant: cold start (process start to /health/ready, which
   waits for a warm-up generation), then 1, 4 and 8 concurrent streaming clients (distinct prompts,
   --tokens each, --rounds rounds): total tokens/s, p50/p99 request latency, p50 time to first token,
   and the server's peak RSS. Beside them, OpenVINO GenAI's ContinuousBatchingPipeline given the same
   prompts at once in its own process (no HTTP: its in-process batching is the most it can give).
3. The goals, each with the measured numbers: single-stream decode at least 1.25x the fastest peer of
   the same bit width (judged on the median over rounds of the ratio within each round); 8 clients at
   least 3x the single-client throughput; cold start under 3 s; peak RSS under --rss-goal times the model file
   (1.5x by default; issue 23 asks 1.3x at 1B+),
   shown beside what a bare onnxruntime session of the same graph holds once loaded (in a process that
   imports nothing else), the part of the memory that is not lmpack's.

It prints the host first (CPU model, cores, the instruction sets the kernels choose between,
onnxruntime's version, load average; the load again at the end), since the same runs differ by 2x
between hosts. Peers whose library is missing are reported as skipped. Numbers on a shared machine are
noisy: this script runs everything in one go so that they are at least comparable with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import CLIENT, PROMPTS, at_once, server  # noqa: E402
from decode import bandwidth_gbs, measure, peak_rss_mb, run_child, weights_bytes  # noqa: E402

GOAL_PEER_RATIO, GOAL_SCALING, GOAL_COLD_START_S = 1.25, 3.0, 3.0
# Peak RSS over the model file: 1.5x at 135M, where onnxruntime's fixed memory weighs; 1.3x at 1B+ (--rss-goal).
GOAL_RSS_RATIO = 1.5
# The instruction sets onnxruntime's and llama.cpp's CPU kernels choose between: which of them a host has
# moves every number here (the same runs went about twice as fast on one 2-core host as on another).
KERNEL_ISA = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "neon", "sve")


def host() -> dict:
    """The facts that say which machine a run was on: CPU model, cores, kernel instruction sets, load."""
    import onnxruntime

    from lmpack.runtime.host import parse_cpu_flags

    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown"
    )
    flags = parse_cpu_flags(cpuinfo)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": [i for i in KERNEL_ISA if i in flags],
        "onnxruntime": onnxruntime.__version__,
        "load_average": os.getloadavg()[0],
    }


# Run in a process of its own: resident MB after `import onnxruntime`, then after loading the variant's graph
# in a bare session with its mapped weights pages released (as lmpack's engine does).
_FLOOR = """
import json, sys
def resident_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import onnxruntime as ort
imported = resident_mb()
from lmpack.runtime.heap import release_file_pages
from lmpack.runtime.variant import load_variant
variant = load_variant(sys.argv[1])
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
session = ort.InferenceSession(str(variant.onnx_path), options, providers=["CPUExecutionProvider"])
release_file_pages(variant.onnx_path.parent)
print(json.dumps({"import_mb": imported, "session_mb": resident_mb()}))
"""


def onnxruntime_floor(variant: str, threads: int) -> dict:
    """What any Python process serving the variant with onnxruntime holds before it serves anything: resident
    MB after `import onnxruntime` and after loading the graph in a bare session. Beside the peak RSS goal it
    shows how much of the peak is lmpack's own."""
    done = subprocess.run(
        [sys.executable, "-c", _FLOOR, variant, str(threads)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stream(url: str, prompt: str, tokens: int) -> dict:
    """One streaming completion: time to first token, whole latency, tokens."""
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, count = None, 0
    with CLIENT.stream("POST", f"{url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return {
        "ttft_s": first if first is not None else float("nan"),
        "latency_s": time.perf_counter() - started,
        "tokens": count,
    }


def _round(url: str, clients: int, tokens: int) -> tuple[float, list[dict]]:
    return at_once([lambda i=i: _stream(url, PROMPTS[i % len(PROMPTS)], tokens) for i in range(clients)])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def http_bench(variant: str, *, clients: list[int], tokens: int, threads: int, rounds: int) -> dict:
    with server(variant, [], threads, max(clients)) as live:
        best_rate, requests = {count: 0.0 for count in clients}, {count: [] for count in clients}
        for _ in range(rounds):  # the client counts take turns, so a slow minute does not hit one of them only
            for count in clients:
                seconds, results = _round(live.url, count, tokens)
                requests[count] += results
                best_rate[count] = max(best_rate[count], sum(r["tokens"] for r in results) / seconds)
        rows = []
        for count in clients:
            latencies = [r["latency_s"] for r in requests[count]]
            rows.append(
                {
                    "clients": count,
                    "tokens_per_s": best_rate[count],
                    "requests": len(requests[count]),
                    "latency_p50_s": _percentile(latencies, 0.5),
                    "latency_p99_s": _percentile(latencies, 0.99),
                    "ttft_p50_s": _percentile([r["ttft_s"] for r in requests[count]], 0.5),
                }
            )
        return {
            "cold_start_s": live.ready_seconds,
            "peak_rss_mb": peak_rss_mb(live.pid),
            "clients": rows,
            "weights_bytes": weights_bytes(variant),
        }


# Run in a process of its own: OpenVINO GenAI's continuous batching given 1, 4 and 8 of the prompts at once.
_OPENVINO_BATCH = """
import json, sys, time
import openvino_genai as ov_genai
path, threads, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
counts, prompts = json.loads(sys.argv[5]), json.loads(sys.argv[6])
pipe = ov_genai.ContinuousBatchingPipeline(path, ov_genai.SchedulerConfig(), "CPU", {"INFERENCE_NUM_THREADS": threads})
config = ov_genai.GenerationConfig()
config.max_new_tokens = config.min_new_tokens = tokens
config.do_sample = False
config.apply_chat_template = False
encoded = [pipe.get_tokenizer().encode(prompt).input_ids for prompt in prompts]  # token ids in, token ids out
best = {count: 0.0 for count in counts}
for _ in range(rounds):
    for count in counts:
        batch = [encoded[i % len(encoded)] for i in range(count)]
        started = time.perf_counter()
        results = pipe.generate(batch, [config] * count)
        seconds = time.perf_counter() - started
        best[count] = max(best[count], sum(len(r.m_generation_ids[0]) for r in results) / seconds)
print(json.dumps({"clients": [{"clients": count, "tokens_per_s": rate} for count, rate in best.items()]}))
"""


def openvino_batch(path: str, *, clients: list[int], tokens: int, threads: int, rounds: int) -> dict:
    """OpenVINO GenAI's in-process continuous batching on the same prompts: total tokens/s by batch size."""
    arguments = [str(threads), str(tokens), str(rounds), json.dumps(clients), json.dumps(PROMPTS)]
    return run_child(["-c", _OPENVINO_BATCH, path, *arguments], threads)


def goals(
    single: dict[str, dict],
    http: dict[str, dict],
    rounds: list[dict[str, float]],
    floor: dict[str, dict] | None = None,
    rss_goal: float = GOAL_RSS_RATIO,
) -> list[dict]:
    """Each goal with its numbers and whether it was met; `rounds` holds each round's decode tokens/s by engine,
    `floor` each lmpack variant's onnxruntime_floor (shown beside its memory goals)."""

    def decode(name: str) -> float | None:
        r = single.get(name, {})
        return r.get("decode_tok_s")

    def memory_goal(goal: str, name: str, peak_mb: float, weights: int) -> dict:
        ratio = peak_mb * 1e6 / weights
        measured = f"{peak_mb:.0f} MB / {weights / 1e6:.0f} MB = {ratio:.2f}x"
        if name in (floor or {}):
            session_mb = floor[name]["session_mb"]
            measured += (
                f" (a bare onnxruntime session of the graph, loaded: {session_mb:.0f} MB = "
                f"{session_mb * 1e6 / weights:.2f}x)"
            )
        return {
            "goal": f"{goal} < {rss_goal}x the model file",
            "measured": measured,
            "met": ratio < rss_goal,
        }

    out = []
    for name in ("lmpack int8", "lmpack int4"):
        r = single.get(name, {})
        if "peak_rss_mb" in r:
            out.append(memory_goal(f"{name}: single-stream peak RSS", name, r["peak_rss_mb"], r["weights_bytes"]))
    for bits, ours, peers in (
        ("8-bit", "lmpack int8", ["llama.cpp q8_0", "OpenVINO GenAI int8"]),
        ("4-bit", "lmpack int4", ["onnxruntime-genai int4", "llama.cpp Q4_1", "OpenVINO GenAI int4"]),
    ):
        measured = {p: decode(p) for p in peers if decode(p)}
        # Within one round the engines run seconds apart, so their ratio is less touched by the host's drift,
        # which moved each engine's best round by 10-30% between runs: the goal is judged on the median of the
        # per-round ratios, and the best rounds' ratio is shown beside it.
        paired = sorted(
            r[ours] / max(r[p] for p in measured if p in r)
            for r in rounds
            if ours in r and any(p in r for p in measured)
        )
        if decode(ours) and measured and paired:
            fastest = max(measured, key=measured.get)
            median = statistics.median(paired)
            out.append(
                {
                    "goal": f"{bits} single-stream decode >= {GOAL_PEER_RATIO}x the fastest peer",
                    "measured": f"{decode(ours):.1f} vs {fastest} {measured[fastest]:.1f} tok/s in the best rounds "
                    f"= {decode(ours) / measured[fastest]:.2f}x; round by round {median:.2f}x median "
                    f"({paired[0]:.2f}x-{paired[-1]:.2f}x over {len(paired)})",
                    "met": median >= GOAL_PEER_RATIO,
                }
            )
    for name, result in http.items():
        if "cold_start_s" not in result:  # a peer's in-process batching: shown, not judged
            continue
        by_clients = {row["clients"]: row["tokens_per_s"] for row in result["clients"]}
        if 1 in by_clients and 8 in by_clients:
            scale = by_clients[8] / by_clients[1]
            out.append(
                {
                    "goal": f"{name}: 8 clients >= {GOAL_SCALING}x one client's throughput",
                    "measured": f"{by_clients[8]:.1f} / {by_clients[1]:.1f} tok/s = {scale:.2f}x",
                    "met": scale >= GOAL_SCALING,
                }
            )
        out.append(
            {
                "goal": f"{name}: cold start < {GOAL_COLD_START_S} s",
                "measured": f"{result['cold_start_s']:.2f} s",
                "met": result["cold_start_s"] < GOAL_COLD_START_S,
            }
        )
        most = max(row["clients"] for row in result["clients"])
        out.append(
            memory_goal(
                f"{name}: server peak RSS ({most} clients)", name, result["peak_rss_mb"], result["weights_bytes"]
            )
        )
    return out


def svg(single: dict[str, dict], http: dict[str, dict], bandwidth: float) -> str:
    """Two bar charts side by side, no plotting library: single-stream decode tokens/s (with each model's
    bandwidth bound as a tick), and lmpack's HTTP throughput by client count."""
    bar_h, gap, left, width = 18, 6, 190, 300
    engines = [(name, r) for name, r in single.items() if "decode_tok_s" in r]
    top = max([r["decode_tok_s"] for _, r in engines] + [1.0])
    lines = []
    y = 40
    lines.append(
        f'<text x="10" y="22" font-weight="bold">Single-stream decode, tokens/s (| = bandwidth bound, '
        f"{bandwidth:.0f} GB/s)</text>"
    )
    scale = width / max(top, max((bandwidth * 1e9 / r["weights_bytes"] for _, r in engines), default=top))
    for name, r in engines:
        w = r["decode_tok_s"] * scale
        bound = bandwidth * 1e9 / r["weights_bytes"] * scale
        colour = "#2b6cb0" if name.startswith("lmpack") else "#a0aec0"
        lines += [
            f'<text x="10" y="{y + 13}">{name}</text>',
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>',
            f'<text x="{left + w + 4:.1f}" y="{y + 13}">{r["decode_tok_s"]:.0f}</text>',
            f'<line x1="{left + bound:.1f}" x2="{left + bound:.1f}" y1="{y - 2}" y2="{y + bar_h + 2}" '
            f'stroke="#c53030" stroke-width="2"/>',
        ]
        y += bar_h + gap
    x0 = left + width + 170
    y2 = 40
    lines.append(
        f'<text x="{x0 - 150}" y="22" font-weight="bold">lmpack serve, total tokens/s by concurrent clients</text>'
    )
    rows = [
        (f"{name}, {row['clients']} client{'s' if row['clients'] > 1 else ''}", row["tokens_per_s"])
        for name, result in http.items()
        for row in result["clients"]
    ]
    top2 = max([rate for _, rate in rows] + [1.0])
    for label, rate in rows:
        w = rate / top2 * width
        lines += [
            f'<text x="{x0 - 150}" y="{y2 + 13}">{label}</text>',
            f'<rect x="{x0}" y="{y2}" width="{w:.1f}" height="{bar_h}" fill="#2f855a"/>',
            f'<text x="{x0 + w + 4:.1f}" y="{y2 + 13}">{rate:.0f}</text>',
        ]
        y2 += bar_h + gap
    height = max(y, y2) + 10
    total_width = x0 + width + 60
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
        + "\n".join(lines)
        + "\n</svg>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--int8", required=True, help="lmpack int8 variant directory")
    parser.add_argument("--int4", required=True, help="lmpack int4 variant directory")
    parser.add_argument("--hf", help="the Hugging Face directory, for transformers (PyTorch fp32)")
    parser.add_argument("--genai", help="onnxruntime-genai int4 model directory (its own builder's)")
    parser.add_argument("--q8", help="llama.cpp q8_0 GGUF")
    parser.add_argument("--q4", help="llama.cpp Q4_1 GGUF")
    parser.add_argument("--ov8", help="OpenVINO int8 model directory (optimum-intel's export)")
    parser.add_argument("--ov4", help="OpenVINO int4 model directory (optimum-intel's export)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="HTTP rounds per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rss-goal", type=float, default=GOAL_RSS_RATIO, help="peak RSS goal, times the file")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--svg", type=Path, help="write the plot here")
    args = parser.parse_args()

    machine = host()
    bandwidth = bandwidth_gbs(args.threads)
    engines = {
        "lmpack int8": ("lmpack", args.int8),
        "lmpack int4": ("lmpack", args.int4),
        "transformers fp32": ("transformers", args.hf),
        "onnxruntime-genai int4": ("genai", args.genai),
        "llama.cpp q8_0": ("llamacpp", args.q8),
        "llama.cpp Q4_1": ("llamacpp", args.q4),
        "OpenVINO GenAI int8": ("openvino", args.ov8),
        "OpenVINO GenAI int4": ("openvino", args.ov4),
    }
    print(
        f"host: {machine['cpu']}, {machine['cores']} cores, {' '.join(machine['isa'])}; onnxruntime "
        f"{machine['onnxruntime']}; load average {machine['load_average']:.1f}"
    )
    print(f"memory bandwidth ({args.threads} threads reading): {bandwidth:.1f} GB/s\n")
    print("| engine | weights MB | bound tok/s | decode tok/s | of bound | prefill tok/s | TTFT ms | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    # The machine's speed drifts (shared hosts): every engine runs once per round, rounds interleave them,
    # and each keeps its best round, so a slow minute costs every engine alike.
    single: dict[str, dict] = {}
    rounds: list[dict[str, float]] = []
    for _ in range(args.repeat):
        rounds.append({})
        for name, (engine, path) in engines.items():
            if not path or "skipped" in single.get(name, {}) or "failed" in single.get(name, {}):
                continue
            r = measure(engine, path, tokens=args.tokens, threads=args.threads, repeat=1)
            if "decode_tok_s" in r:
                rounds[-1][name] = r["decode_tok_s"]
            if name not in single or r.get("decode_tok_s", 0) > single[name].get("decode_tok_s", 0):
                single[name] = r
    for name, r in single.items():
        if "decode_tok_s" not in r:
            print(f"| {name} | {r.get('skipped') or 'failed: ' + r.get('failed', '?')} |||||||", flush=True)
            continue
        bound = bandwidth * 1e9 / r["weights_bytes"]
        print(
            f"| {name} | {r['weights_bytes'] / 1e6:.0f} | {bound:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / bound:.0%} | {r['prefill_tok_s']:.0f} | {r['prefill_s'] * 1000:.0f} | "
            f"{r['peak_rss_mb']:.0f} |",
            flush=True,
        )

    variants = {"lmpack int8": args.int8, "lmpack int4": args.int4}
    floor = {name: onnxruntime_floor(path, args.threads) for name, path in variants.items()}
    print(
        f"\nonnxruntime alone: {floor['lmpack int8']['import_mb']:.0f} MB after `import onnxruntime`; a bare "
        "session of the graph (mapped weights pages released): "
        + ", ".join(
            f"{name} {floor[name]['session_mb']:.0f} MB "
            f"({floor[name]['session_mb'] * 1e6 / weights_bytes(path):.2f}x its file)"
            for name, path in variants.items()
        )
    )

    http = {}
    print("\n| variant | clients | total tokens/s | p50 latency s | p99 latency s | p50 TTFT ms |")
    print("|---|---|---|---|---|---|")
    for name, path in variants.items():
        result = http[name] = http_bench(
            path, clients=args.clients, tokens=args.tokens, threads=args.threads, rounds=args.rounds
        )
        for row in result["clients"]:
            print(
                f"| {name} | {row['clients']} | {row['tokens_per_s']:.1f} | {row['latency_p50_s']:.2f} | "
                f"{row['latency_p99_s']:.2f} | {row['ttft_p50_s'] * 1000:.0f} |",
                flush=True,
            )
        print(
            f"| {name} | cold start {result['cold_start_s']:.2f} s, server peak RSS {result['peak_rss_mb']:.0f} MB "
            f"||||| ",
            flush=True,
        )

    for name, path in (("OpenVINO GenAI int8", args.ov8), ("OpenVINO GenAI int4", args.ov4)):
        if not path or "decode_tok_s" not in single.get(name, {}):
            continue
        result = openvino_batch(
            path, clients=args.clients, tokens=args.tokens, threads=args.threads, rounds=args.rounds
        )
        if "failed" in result:
            print(f"| {name} (in-process batching) | failed: {result['failed']} |||||", flush=True)
            continue
        http[f"{name} (in-process batching)"] = result
        for row in result["clients"]:
            print(f"| {name} (in-process batching) | {row['clients']} | {row['tokens_per_s']:.1f} | | | |", flush=True)

    machine["load_average_end"] = os.getloadavg()[0]
    print(f"\nload average at the end: {machine['load_average_end']:.1f}")
    print("\n| goal | measured | met |\n|---|---|---|")
    checked = goals(single, http, rounds, floor, args.rss_goal)
    for goal in checked:
        print(f"| {goal['goal']} | {goal['measured']} | {'yes' if goal['met'] else 'no'} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "host": machine,
                    "bandwidth_gbs": bandwidth,
                    "tokens": args.tokens,
                    "threads": args.threads,
                    "single_stream": single,
                    "rounds": rounds,
                    "onnxruntime_floor": floor,
                    "http": http,
                    "goals": checked,
                },
                indent=2,
            )
        )
    if args.svg:
        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg(single, http, bandwidth))


if __name__ == "__main__":
    main()
