"""bench/gpu.py, dry-run on the CPU (its `--provider cpu`): it loads a GPU variant and the source model, measures
both batch sizes and the long prompt, and judges the GPU issue's goals only where a measurement exists. Its GPU
numbers can only come from a GPU (docs/gpu-targets.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu.py"


def test_the_dry_run_measures_lmpack_and_pytorch_and_judges_the_goals(llama_variant_gpu_graph, tiny_llama, tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(SCRIPT), str(llama_variant_gpu_graph), "--hf", str(tiny_llama), "--provider", "cpu"]
    result = subprocess.run(
        [*command, "--tokens", "8", "--prompt-tokens", "100", "--json", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    lmpack, torch = report["rows"]
    assert lmpack["engine"] == "lmpack" and lmpack["providers"] == ["CPUExecutionProvider"]
    assert torch["engine"] == "transformers" and "cpu float32" in torch["providers"][0]
    for row in (lmpack, torch):
        assert row["decode_tok_s_batch1"] > 0 and row["decode_tok_s_batch8"] > 0
        assert row["prompt_tokens"] == 100 and row["ttft_s"] > 0
    assert lmpack["peak_gpu_bytes"] is None  # no GPU: no memory goal judged
    assert len(report["goals"]) == 2 and all("PyTorch eager (goal 3x)" in line for line in report["goals"])
