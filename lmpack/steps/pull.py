"""Pull: turn a Hub repo, a local directory or a GGUF file into a clean Hugging Face directory."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
from pathlib import Path
from typing import Any

from lmpack.config import paths
from lmpack.errors import NotFoundError, SourceError, UnsafeModelError, UnsupportedModelError
from lmpack.fsio import file_sha256
from lmpack.pipeline.digest import json_sha256
from lmpack.pipeline.step import HF_MODEL, SOURCE, Artifact, Step, StepContext
from lmpack.steps.gguf_file import is_gguf, to_hf_directory
from lmpack.steps.model_files import (
    CONVERTIBLE_PATTERNS,
    REMOTE_CODE_PATTERNS,
    WANTED_PATTERNS,
    check_model_dir,
    is_convertible,
    is_pickle_checkpoint,
    read_config,
    read_license,
)

SOURCE_FILE = "lmpack-source.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class PullParams:
    allow_pickle: bool = False
    trust_remote_code: bool = False


def resolve_source(model: str, *, revision: str | None = None, params: PullParams = PullParams()) -> Artifact:
    """Find what `model` names and give it a stable identity: the pull step's input. Hub repos are downloaded
    (or read offline) here, only the files `params` allow."""
    allow_pickle, trust_remote_code = params.allow_pickle, params.trust_remote_code
    path = Path(model).expanduser()
    if path.is_dir():
        wanted = [
            p
            for p in _model_files(path)
            if _relpath_ok(p.relative_to(path).as_posix(), allow_pickle, trust_remote_code)
        ]
        entries = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in wanted]
        return Artifact(
            kind=SOURCE,
            path=path.resolve(),
            digest=json_sha256(["dir", entries]),
            info={"kind": "directory", "ref": str(path.resolve())},
        )
    if path.is_file():
        if not is_gguf(path):
            raise UnsupportedModelError(
                f"{path}: not a GGUF file (detected by content) and not a model directory",
                hint="pass a Hugging Face directory, a .gguf file or a Hub repo id",
            )
        sha = file_sha256(path)
        return Artifact(
            kind=SOURCE,
            path=path.resolve(),
            digest=f"gguf:{sha}",
            info={"kind": "gguf", "ref": str(path.resolve()), "sha256": sha},
        )
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or not _REPO_ID.match(model):
        raise NotFoundError(f"model path {model} does not exist")
    return _resolve_hub(model, revision=revision, patterns=_patterns(allow_pickle, trust_remote_code))


def _model_files(root: Path) -> list[Path]:
    """Files under a model directory, sorted; links to files count (a Hub cache snapshot is all links)."""
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _patterns(allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    return [
        *WANTED_PATTERNS,
        *(CONVERTIBLE_PATTERNS if allow_pickle else ()),
        *(REMOTE_CODE_PATTERNS if trust_remote_code else ()),
    ]


def _relpath_ok(relpath: str, allow_pickle: bool, trust_remote_code: bool) -> bool:
    return any(fnmatch.fnmatch(relpath, pattern) for pattern in _patterns(allow_pickle, trust_remote_code))


def _resolve_hub(repo_id: str, *, revision: str | None, patterns: list[str]) -> Artifact:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    try:
        # The token comes from the usual places (HF_TOKEN, the login cache). HF_ENDPOINT and HF_HUB_OFFLINE are
        # passed explicitly: huggingface_hub reads them only once, at import.
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                endpoint=paths.hub_endpoint(),
                local_files_only=paths.hub_offline(),
            )
        )
    except hub_errors.RevisionNotFoundError:
        raise NotFoundError(f"revision {revision!r} not found in Hub repo {repo_id}") from None
    except hub_errors.GatedRepoError:
        raise SourceError(f"Hub repo {repo_id} is gated", hint="accept its terms and set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise NotFoundError(
            f"Hub repo {repo_id} not found (or private without a token)",
            hint="check the name, or set HF_TOKEN for a private repo",
        ) from None
    except hub_errors.LocalEntryNotFoundError:
        if paths.hub_offline():
            raise SourceError(
                f"Hub repo {repo_id} is not in the local cache and HF_HUB_OFFLINE is set",
                hint="pull it once on a connected machine, or pass a local directory",
            ) from None
        raise SourceError(
            f"could not reach the Hub to download {repo_id}",
            hint="check the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the cache",
        ) from None
    except hub_errors.HfHubHTTPError as exc:
        raise SourceError(f"the Hub answered an error for {repo_id}: {exc}") from None
    commit = snapshot.name
    return Artifact(
        kind=SOURCE,
        path=snapshot,
        digest=f"hub:{repo_id}@{commit}",
        info={"kind": "hub", "ref": repo_id, "revision": revision or "main", "commit": commit},
    )


class PullStep(Step):
    name = "pull"
    consumes = SOURCE
    produces = HF_MODEL
    Params = PullParams
    tools = ("transformers", "gguf", "sentencepiece")

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        info = dict(source.info)
        trust_remote_code = self.params.trust_remote_code
        if info["kind"] == "gguf":
            info.update(to_hf_directory(source.path, out_dir))
        else:
            _copy_wanted(
                source.path, out_dir, allow_pickle=self.params.allow_pickle, trust_remote_code=trust_remote_code
            )
            # The config is checked (remote code included) before any weights are loaded for conversion.
            config = read_config(out_dir, trust_remote_code=trust_remote_code, shown=info["ref"])
            if not any(out_dir.rglob("*.safetensors")):
                _refuse_or_convert_pickle(source.path, out_dir, config, allow=self.params.allow_pickle)
        for pickle_file in [p for p in _model_files(out_dir) if is_convertible(p.relative_to(out_dir).as_posix())]:
            pickle_file.unlink()
        config = check_model_dir(out_dir, trust_remote_code=trust_remote_code, shown=info["ref"])
        info.setdefault("license", read_license(out_dir))
        info["architecture"] = (config.get("architectures") or ["unknown"])[0]
        info["model_type"] = config.get("model_type", "unknown")
        info["name"] = info.get("name") or model_name(info, config)
        (out_dir / SOURCE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return info


# Directory names that say where a model is kept, not what it is (a local "./model", a Hub cache snapshot)
_GENERIC_DIRS = re.compile(
    r"^(model|models|hf|checkpoint|checkpoints|weights|snapshot|snapshots|main|[0-9a-f]{40})$", re.IGNORECASE
)


def model_name(info: dict[str, Any], config: dict[str, Any]) -> str:
    """What the model is called, for the variant's name: the Hub repo's name, the name the checkpoint was saved
    from (config.json's `_name_or_path`, when it is a repo id), else the directory's own name, skipping names
    that only say where it is kept (./model, a Hub cache's snapshots/COMMIT). A GGUF names itself
    (general.name, read when it is pulled)."""
    if info["kind"] == "hub":
        return str(info["ref"]).split("/")[-1]
    saved_from = config.get("_name_or_path")
    if isinstance(saved_from, str) and _REPO_ID.match(saved_from) and not Path(saved_from).exists():
        return saved_from.split("/")[-1]
    path = Path(info["ref"])
    for part in (path, *path.parents):
        name = part.name.removeprefix("models--").split("--")[-1]  # a Hub cache's models--ORG--NAME
        if name and not _GENERIC_DIRS.match(name):
            return name
    return "model"


def _copy_wanted(src: Path, dst: Path, *, allow_pickle: bool, trust_remote_code: bool) -> None:
    for file in _model_files(src):
        rel = file.relative_to(src).as_posix()
        if _relpath_ok(rel, allow_pickle, trust_remote_code):
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)


def _refuse_or_convert_pickle(source: Path, directory: Path, config: dict, *, allow: bool) -> None:
    """`directory` (the copy of `source`) has no safetensors: refuse, or convert its pickle checkpoint if allowed."""
    if not allow:
        # A Hub download never fetches pickles it would refuse, so only a local source can name one here.
        pickles = [p.name for p in _model_files(source) if is_pickle_checkpoint(p.name)]
        raise UnsafeModelError(
            f"the model has no safetensors weights, only pickle checkpoints (found {pickles[0]})"
            if pickles
            else "the model has no safetensors weights",
            hint="lmpack never loads pickle at build or run time; pass --allow-pickle to convert "
            "it to safetensors once, with torch's weights-only loader",
        )
    if not any(is_convertible(p.relative_to(directory).as_posix()) for p in _model_files(directory)):
        raise UnsafeModelError("the model has no weights lmpack can read (no safetensors, no pytorch_model.bin)")
    # weights_only loading is what transformers uses for .bin files; the result is saved as safetensors.
    model = _model_class(config).from_pretrained(
        directory, use_safetensors=False, trust_remote_code=bool(config.get("auto_map"))
    )
    model.save_pretrained(directory, safe_serialization=True)


def _model_class(config: dict) -> Any:
    """The class config.json's `architectures` names (AutoModel would drop a head: LlamaForCausalLM -> LlamaModel).

    A PreTrainedModel subclass or the AutoModel factory: both have `from_pretrained`, no common base declares it.
    """
    import transformers

    name = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        return model_class
    return transformers.AutoModel
