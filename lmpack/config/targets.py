"""Hardware targets: facts about a machine a model is built for, read from targets/*.toml."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmpack.config import paths
from lmpack.config.catalog import Catalog
from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml
from lmpack.errors import ConfigError

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
ARCHES = ("x86_64", "aarch64")
EXECUTION_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SPARSITY_PATTERNS = ("unstructured", "2:4")


@dataclass(frozen=True)
class CpuFacts:
    arch: str
    isa: list[str]


@dataclass(frozen=True)
class GpuFacts:
    vendor: str
    model: str
    compute_capability: str
    memory_gib: float
    # The CUDA runtime (cudart, cuBLAS, cuDNN, ...) ships in the wheelhouse as NVIDIA's pip wheels; false where
    # the vendor's OS image provides it (JetPack on Jetson), so the bundle does not carry a second copy.
    cuda_wheels: bool = True


@dataclass(frozen=True)
class TensorrtOptions:
    builder_optimization_level: int = 3
    workspace_gib: float = 4.0
    hardware_compatibility: str = "none"
    version_compatible: bool = False


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    cpu: CpuFacts
    memory_gib: float
    precisions: list[str]
    execution_providers: list[str]
    platform_tag: str
    python: str
    default_profile: str
    gpu: GpuFacts | None = None
    tensorrt: TensorrtOptions | None = None
    sparsity: list[str] = field(default_factory=list)
    source: str = ""
    digest: str = ""

    @property
    def kind(self) -> str:
        return "gpu" if self.gpu else "cpu"

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("digest")
        return data


def parse_target(data: dict, *, source: str, digest: str = "") -> Target:
    """Validate a target table; every error names `source` and the field."""
    r = TableReader(data, source=source)
    check_schema_version(r)
    name = r.str("name", required=True)
    cpu_table = r.table("cpu", required=True)
    cpu = CpuFacts(arch=cpu_table.str("arch", required=True, choices=ARCHES), isa=cpu_table.str_list("isa"))
    cpu_table.finish()
    gpu = None
    if (gpu_table := r.table("gpu")) is not None:
        gpu = GpuFacts(
            vendor=gpu_table.str("vendor", required=True, choices=("nvidia",)),
            model=gpu_table.str("model", required=True),
            compute_capability=_compute_capability(gpu_table),
            memory_gib=gpu_table.float("memory_gib", required=True, minimum=0.5),
            cuda_wheels=gpu_table.bool("cuda_wheels", True),
        )
        gpu_table.finish()
    tensorrt = None
    if (trt_table := r.table("tensorrt")) is not None:
        tensorrt = TensorrtOptions(
            builder_optimization_level=trt_table.int("builder_optimization_level", 3, minimum=0, maximum=5),
            workspace_gib=trt_table.float("workspace_gib", 4.0, minimum=0.1),
            hardware_compatibility=trt_table.str(
                "hardware_compatibility", "none", choices=("none", "ampere_plus", "same_compute_capability")
            ),
            version_compatible=trt_table.bool("version_compatible", False),
        )
        trt_table.finish()
    target = Target(
        name=name,
        description=r.str("description", ""),
        cpu=cpu,
        gpu=gpu,
        tensorrt=tensorrt,
        memory_gib=r.float("memory_gib", required=True, minimum=0.25),
        precisions=r.str_list("precisions", required=True, choices=PRECISIONS),
        execution_providers=r.str_list("execution_providers", required=True, choices=EXECUTION_PROVIDERS),
        platform_tag=r.str("platform_tag", required=True),
        python=r.str("python", required=True),
        default_profile=r.str("default_profile", required=True),
        sparsity=r.str_list("sparsity", choices=SPARSITY_PATTERNS),
        source=source,
        digest=digest,
    )
    r.finish()
    _check_consistency(target)
    return target


def _compute_capability(table: TableReader) -> str:
    value = table.str("compute_capability", required=True)
    major, _, minor = value.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ConfigError(
            f"{table.source}: field '{table.prefix}compute_capability' must look like '8.0', got {value!r}"
        )
    return value


def _check_consistency(target: Target) -> None:
    where = target.source
    if not target.precisions:
        raise ConfigError(f"{where}: field 'precisions' must not be empty")
    if "CPUExecutionProvider" not in target.execution_providers:
        raise ConfigError(f"{where}: field 'execution_providers' must end with CPUExecutionProvider (the fallback)")
    gpu_eps = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(target.execution_providers)
    if gpu_eps and target.gpu is None:
        raise ConfigError(
            f"{where}: field 'execution_providers' lists {sorted(gpu_eps)[0]} but the target has no [gpu] table"
        )
    if target.tensorrt is not None and "TensorrtExecutionProvider" not in target.execution_providers:
        raise ConfigError(f"{where}: field 'tensorrt' is set but 'execution_providers' lacks TensorrtExecutionProvider")
    if not target.platform_tag.endswith(target.cpu.arch):
        raise ConfigError(
            f"{where}: field 'platform_tag' {target.platform_tag!r} does not match cpu.arch {target.cpu.arch!r}"
        )


def load_target_file(path: Path) -> Target:
    raw = path.read_bytes() if path.is_file() else b""
    data = load_toml(path)
    return parse_target(data, source=str(path), digest=hashlib.sha256(raw).hexdigest())


_CATALOG: Catalog[Target] = Catalog(
    kind="target",
    search_dirs=lambda: [paths.user_targets_dir(), paths.shipped_targets_dir()],
    load_file=load_target_file,
)


def list_targets() -> list[Target]:
    """Every known target, user directory first; a name found twice keeps the user's."""
    return _CATALOG.all()


def load_target(name_or_path: str) -> Target:
    """A target by name (user dir, then shipped) or by path to a .toml file."""
    return _CATALOG.get(name_or_path)
