"""Variant selection over recorded host facts: the GPU, the CPU and the memory are faked only here, at the edge.

NVML is never called in these tests: a host is a HostFacts value (what host.probe_host would record),
so a GPU host with compute capability 8.0, an aarch64 host and a small-memory host can be tested on
any machine. The real bundle and release tests use the real manifest code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_nvml import fake_nvml

from lmpack.bundle.manifest import Compatibility, GpuRequirement, VariantEntry
from lmpack.errors import NoCompatibleVariantError
from lmpack.runtime.host import GpuFacts, HostFacts, normalize_arch, parse_cpu_flags
from lmpack.runtime.select import Candidate, choose, explain, find_candidates, rank

GIB = 1 << 30
X86 = frozenset({"avx2", "fma", "sse4_2"})


def entry(
    name: str,
    *,
    precision: str,
    arch: str = "x86_64",
    isa=("avx2", "fma"),
    memory: int = GIB,
    cc: str | None = None,
    match: str = "minimum",
    gpu_memory: int = GIB,
) -> VariantEntry:
    gpu = (
        None
        if cc is None
        else GpuRequirement(vendor="nvidia", compute_capability=cc, match=match, min_memory_bytes=gpu_memory)
    )
    return VariantEntry(
        name=name,
        target="t",
        profile=precision,
        precision=precision,
        task="text-generation",
        execution_providers=("CPUExecutionProvider",),
        compatibility=Compatibility(cpu_arch=arch, cpu_isa=tuple(isa), min_memory_bytes=memory, gpu=gpu),
        provenance={"kind": "local"},
    )


def candidates(*entries: VariantEntry) -> list[Candidate]:
    return [Candidate(name=e.name, path=Path("variants") / e.name, entry=e) for e in entries]


BUNDLE = candidates(
    entry("m-cpu-x86-int8", precision="int8"),
    entry("m-cpu-x86-fp32", precision="fp32"),
    entry("m-cpu-arm64-int8", precision="int8", arch="aarch64", isa=("neon",)),
    entry("m-a100-fp16", precision="fp16", cc="8.0", gpu_memory=4 * GIB),
    entry("m-t4-int8", precision="int8", cc="7.5"),
    entry("m-h100-trt-fp8", precision="fp8", cc="9.0", match="exact"),
)

GPU_HOST = HostFacts(
    arch="x86_64",
    isa=X86,
    memory_bytes=64 * GIB,
    gpus=(GpuFacts(name="NVIDIA A100-SXM4-40GB", compute_capability="8.0", memory_bytes=40 * GIB),),
)
CPU_HOST = HostFacts(arch="x86_64", isa=X86, memory_bytes=16 * GIB, gpu_note="nvidia-ml-py is not installed")
ARM_HOST = HostFacts(arch="aarch64", isa=frozenset({"neon", "fp"}), memory_bytes=8 * GIB, gpu_note="NVML found no GPU")
SMALL_HOST = HostFacts(arch="x86_64", isa=X86, memory_bytes=GIB // 2, gpu_note="nvidia-ml-py is not installed")


def verdicts(host: HostFacts) -> dict[str, tuple[str, ...]]:
    return {v.candidate.name: v.reasons for v in rank("bundle", Path("b"), BUNDLE, host).verdicts}


def test_a_gpu_host_with_cc_8_0_gets_the_gpu_variant_in_the_preferred_precision():
    selection = rank("bundle", Path("b"), BUNDLE, GPU_HOST)
    assert selection.chosen.candidate.name == "m-a100-fp16"  # GPU first, then fp16 before the t4's int8
    names = [v.candidate.name for v in selection.verdicts if v.ok]
    assert names == ["m-a100-fp16", "m-t4-int8", "m-cpu-x86-int8", "m-cpu-x86-fp32"]
    reasons = verdicts(GPU_HOST)
    assert (
        "needs a GPU with compute capability 9.0 exactly (TensorRT engines); this host has NVIDIA A100-SXM4-40GB 8.0"
        in reasons["m-h100-trt-fp8"]
    )
    assert reasons["m-cpu-arm64-int8"] == ("needs a aarch64 CPU, this host is x86_64",)


def test_gpu_memory_and_exact_matches_are_checked():
    small_gpu = HostFacts(
        arch="x86_64",
        isa=X86,
        memory_bytes=64 * GIB,
        gpus=(GpuFacts(name="A2", compute_capability="8.6", memory_bytes=2 * GIB),),
    )
    reasons = verdicts(small_gpu)
    assert reasons["m-a100-fp16"] == ("needs 4.0 GiB of GPU memory, the largest matching GPU has 2.0 GiB",)
    assert reasons["m-t4-int8"] == ()  # "minimum": CUDA kernels for 7.5 run on 8.6
    exact = candidates(entry("trt-8.0", precision="fp16", cc="8.0", match="exact"))
    assert "exactly" in rank("bundle", Path("b"), exact, small_gpu).verdicts[0].reasons[0]


def test_a_cpu_host_gets_int8_before_fp32_and_says_why_gpu_variants_do_not_run():
    selection = rank("bundle", Path("b"), BUNDLE, CPU_HOST)
    assert selection.chosen.candidate.name == "m-cpu-x86-int8"
    assert verdicts(CPU_HOST)["m-t4-int8"] == (
        "needs a GPU with compute capability 7.5 or later; no GPU here (nvidia-ml-py is not installed)",
    )


def test_an_aarch64_host_gets_the_arm_variant():
    assert rank("bundle", Path("b"), BUNDLE, ARM_HOST).chosen.candidate.name == "m-cpu-arm64-int8"
    assert verdicts(ARM_HOST)["m-cpu-x86-int8"] == ("needs a x86_64 CPU, this host is aarch64",)


def test_a_missing_isa_flag_is_named():
    old_cpu = HostFacts(arch="x86_64", isa=frozenset({"sse4_2"}), memory_bytes=16 * GIB)
    assert verdicts(old_cpu)["m-cpu-x86-int8"] == ("the CPU lacks avx2, fma",)


def test_a_small_memory_host_runs_nothing_and_the_error_lists_every_variant(tmp_path, monkeypatch):
    reasons = verdicts(SMALL_HOST)
    assert all(reasons.values())
    assert "needs 1.0 GiB of memory, this host has 0.5 GiB" in reasons["m-cpu-x86-int8"]
    monkeypatch.setattr("lmpack.runtime.select.find_candidates", lambda path: ("bundle", Path(path), BUNDLE))
    with pytest.raises(NoCompatibleVariantError) as caught:
        choose(tmp_path, SMALL_HOST)
    assert set(caught.value.rejected) == {c.name for c in BUNDLE}
    assert "m-t4-int8: needs" in caught.value.message and "lmpack doctor" in caught.value.hint


def test_nvml_facts_become_gpu_facts_and_a_failing_nvml_means_no_gpu(monkeypatch):
    """NVML's answers through the stand-in pynvml (fake_nvml.py), as nvidia-ml-py would give them on an A100."""
    from lmpack.runtime.host import probe_gpus

    calls = []
    fake = fake_nvml(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"))
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    assert probe_gpus() == ((GpuFacts(name="NVIDIA A100", compute_capability="8.0", memory_bytes=40 * GIB),), "")
    assert calls == ["init", "shutdown"]

    def no_driver():
        raise RuntimeError("Driver Not Loaded")

    monkeypatch.setattr(fake, "nvmlInit", no_driver)
    assert probe_gpus() == ((), "NVML is not available: Driver Not Loaded")


def test_cpu_flags_and_arch_names_are_normalised():
    assert {"avx2", "fma"} <= parse_cpu_flags("processor : 0\nflags : fpu avx2 fma\n\nflags : other\n")
    assert {"asimd", "neon"} <= parse_cpu_flags("processor : 0\nFeatures : fp asimd evtstrm\n")
    assert normalize_arch("arm64") == "aarch64" and normalize_arch("AMD64") == "x86_64"


# --- real directories -------------------------------------------------------------------------------------


def test_a_bundle_directory_and_an_installed_release_are_read_through_the_manifest(bundle_dir, tmp_path):
    from lmpack.bundle.install import install

    selection = explain(bundle_dir, CPU_HOST)
    assert selection.kind == "bundle" and selection.chosen.candidate.path.parent == bundle_dir / "variants"
    assert [v.candidate.entry.precision for v in selection.verdicts] == ["int8", "fp32"]
    install(bundle_dir, tmp_path / "prefix")
    for path in (
        tmp_path / "prefix/releases/tiny",
        tmp_path / "prefix/releases/tiny/current",
        tmp_path / "prefix/releases/tiny/1.0.0",
    ):
        kind, root, found = find_candidates(path)
        assert kind == "release" and len(found) == 2 and (root / "manifest.json").is_file()


def test_a_variant_directory_gets_the_rule_pack_would_write(llama_variant):
    kind, _, found = find_candidates(llama_variant)
    assert kind == "variant" and found[0].entry.compatibility.cpu_arch == "x86_64"
    assert "needs a x86_64 CPU" in explain(llama_variant, ARM_HOST).verdicts[0].reasons[0]


def test_a_variant_directory_without_a_derivable_rule_is_served_unchecked(llama_variant, tmp_path):
    import shutil

    copy = tmp_path / "hand-made"
    shutil.copytree(llama_variant, copy)
    (copy / "report.json").write_text("{}")  # no source: pack could not describe it
    verdict = explain(copy, ARM_HOST).verdicts[0]
    assert verdict.ok and verdict.candidate.entry is None


def test_doctor_prints_the_host_each_variant_and_the_choice(bundle_dir, lmpack_cli, monkeypatch):
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: ARM_HOST)
    result = lmpack_cli("doctor", bundle_dir)
    assert result.exit_code == 17, result.output
    assert "needs a x86_64 CPU, this host is aarch64" in result.stdout and "chosen:  none" in result.stdout
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: CPU_HOST)
    result = lmpack_cli("doctor", bundle_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["host"]["gpu_note"] == "nvidia-ml-py is not installed"
    assert report["chosen"] == report["variants"][0]["name"] and all(v["ok"] for v in report["variants"])


# --- the operator names the variant (serve/generate/doctor --variant) --------------------------------------


def test_a_named_variant_is_chosen_if_it_runs_here_and_refused_with_its_reasons_if_not(tmp_path, monkeypatch):
    from lmpack.errors import NotFoundError

    assert (
        rank("bundle", Path("b"), BUNDLE, CPU_HOST, wanted="m-cpu-x86-fp32").chosen.candidate.name == "m-cpu-x86-fp32"
    )
    selection = rank("bundle", Path("b"), BUNDLE, CPU_HOST, wanted="m-t4-int8")
    assert selection.chosen is None and selection.to_dict()["wanted"] == "m-t4-int8"
    monkeypatch.setattr("lmpack.runtime.select.find_candidates", lambda path: ("bundle", Path(path), BUNDLE))
    with pytest.raises(NoCompatibleVariantError) as caught:
        choose(tmp_path, CPU_HOST, wanted="m-t4-int8")  # not silently replaced by the int8 that would run
    assert list(caught.value.rejected) == ["m-t4-int8"]
    assert "needs a GPU with compute capability 7.5" in caught.value.message and "--variant" in caught.value.hint
    with pytest.raises(NotFoundError) as unknown:
        choose(tmp_path, CPU_HOST, wanted="m-cpu-x86-int4")
    assert "m-cpu-x86-int8, m-cpu-x86-fp32" in unknown.value.message


def test_doctor_and_generate_take_the_named_variant_of_a_real_bundle(bundle_dir, lmpack_cli, monkeypatch, caplog):
    import logging

    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: CPU_HOST)
    default = json.loads(lmpack_cli("doctor", bundle_dir, "--json").stdout)
    other = next(v["name"] for v in default["variants"] if v["name"] != default["chosen"])
    result = lmpack_cli("doctor", bundle_dir, "--variant", other)
    assert result.exit_code == 0, result.output
    assert f"chosen:  {other} (named by --variant)" in result.stdout
    missing = lmpack_cli("doctor", bundle_dir, "--variant", "no-such-variant")
    assert missing.exit_code == 4 and default["chosen"] in missing.output
    with caplog.at_level(logging.INFO, logger="lmpack.select"):
        generated = lmpack_cli(
            "generate", bundle_dir, "The railway", "--max-tokens", "4", "--threads", "1", "--variant", other, "--json"
        )
    assert generated.exit_code == 0, generated.output
    assert f"serving variant {other} from bundle" in caplog.text and "named by --variant" in caplog.text
