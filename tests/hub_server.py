"""A stand-in for the Hugging Face Hub's file API on 127.0.0.1, enough for huggingface_hub.snapshot_download.

What huggingface_hub (0.34 to 0.36) asks, and what this answers:

  GET  /api/models/{repo}/revision/{rev}  {"id", "sha", "siblings": [{"rfilename"}]}             (repo_info)
  HEAD /{repo}/resolve/{rev}/{file}       200 with X-Repo-Commit, ETag (git blob sha1), Content-Length; for
                                          weights (LFS files on the real Hub) a 302 whose Location is /lfs/{sha256},
                                          with X-Linked-Etag and X-Linked-Size, as the Hub redirects to its CDN
  GET  /{repo}/resolve/{rev}/{file}       the bytes, or the same 302
  GET  /lfs/{sha256}                      the bytes of a weights file

Unknown repos, revisions and files get a 404 with the Hub's X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound). No X-Xet-* header is ever sent, so huggingface_hub never switches to Xet storage. Every request
is recorded, so tests can assert which files were (and were not) fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files the Hub stores in LFS (its default .gitattributes): served through a redirect, like the real CDN.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".onnx", ".gguf", ".h5")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    repo_id: str | None = None
    filename: str | None = None  # the repo file a resolve or LFS request is about


class HubError(Exception):
    def __init__(self, code: str, message: str, commit: str | None = None):
        super().__init__(message)
        self.code, self.message, self.commit = code, message, commit


def commit_for(repo_id: str, revision: str) -> str:
    """A fixed, 40-hex commit hash per repo and revision name."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Serves repos from local directories; each named revision (branch or tag) is one directory and one commit."""

    def __init__(self) -> None:
        self._refs: dict[str, dict[str, str]] = {}  # repo -> revision name -> commit
        self._trees: dict[str, dict[str, Path]] = {}  # repo -> commit -> directory
        self._blobs: dict[str, tuple[str, str, Path]] = {}  # sha256 -> (repo, filename, path)
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- setting up ---------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, revisions: Path | Mapping[str, Path]) -> dict[str, str]:
        """Serve `revisions` ({"main": dir, "v1": dir}; a bare directory means {"main": dir}); return name -> commit."""
        if isinstance(revisions, (str, Path)):
            revisions = {"main": Path(revisions)}
        refs = {name: commit_for(repo_id, name) for name in revisions}
        self._refs[repo_id] = refs
        self._trees[repo_id] = {refs[name]: Path(directory) for name, directory in revisions.items()}
        return refs

    def commit(self, repo_id: str, revision: str = "main") -> str:
        return self._refs[repo_id][revision]

    @property
    def url(self) -> str:
        assert self._server is not None, "the hub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def install(self, monkeypatch) -> None:
        """Point huggingface_hub at this server, here and in child processes, with its cache under $HF_HOME.

        huggingface_hub reads its environment once, at import, so the constants this process already
        loaded are patched as well as the environment that child processes inherit.
        """
        from huggingface_hub import constants
        from huggingface_hub.utils import reset_sessions

        cache = str(Path(os.environ["HF_HOME"]) / "hub")
        for name, value in {
            "HF_ENDPOINT": self.url,
            "HF_HUB_CACHE": cache,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {
            "HF_HUB_CACHE": cache,
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_XET": True,
        }.items():
            monkeypatch.setattr(constants, name, value)
        reset_sessions()  # sessions made while HF_HUB_OFFLINE was set refuse every request

    # -- what was asked -----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def files_requested(self, repo_id: str | None = None) -> set[str]:
        """Repo files that were asked about at all (metadata or content)."""
        return {r.filename for r in self.requests if r.filename and repo_id in (None, r.repo_id)}

    def files_downloaded(self, repo_id: str | None = None) -> set[str]:
        """Repo files whose bytes were sent."""
        return {r.filename for r in self.requests if r.method == "GET" and r.filename and repo_id in (None, r.repo_id)}

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    # -- answering ----------------------------------------------------------------------------------------

    def _commit_and_tree(self, repo_id: str, revision: str) -> tuple[str, Path]:
        if repo_id not in self._refs:
            raise HubError("RepoNotFound", f"Repository {repo_id} not found")
        commit = self._refs[repo_id].get(revision, revision)
        if commit not in self._trees[repo_id]:
            raise HubError("RevisionNotFound", f"Invalid rev id: {revision}")
        return commit, self._trees[repo_id][commit]

    def repo_info(self, repo_id: str, revision: str) -> dict:
        commit, tree = self._commit_and_tree(repo_id, revision)
        files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": False,
            "siblings": [{"rfilename": name} for name in files],
        }

    def resolve(self, repo_id: str, revision: str, filename: str) -> tuple[str, Path]:
        commit, tree = self._commit_and_tree(repo_id, revision)
        path = tree / filename
        if ".." in Path(filename).parts or not path.is_file():
            raise HubError("EntryNotFound", f"{filename} does not exist on {revision}", commit=commit)
        return commit, path

    def lfs_location(self, repo_id: str, filename: str, path: Path) -> tuple[str, str]:
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        with self._lock:
            self._blobs[sha256] = (repo_id, filename, path)
        return sha256, f"{self.url}/lfs/{sha256}"

    def blob(self, sha256: str) -> tuple[str, str, Path]:
        with self._lock:
            if sha256 not in self._blobs:
                raise HubError("EntryNotFound", f"no blob {sha256}")
            return self._blobs[sha256]

    # -- running ------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def _answer(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            if path.startswith("/api/models/"):
                self._api_models(path[len("/api/models/") :])
            elif path.startswith("/lfs/"):
                self._lfs(path[len("/lfs/") :], body=body)
            elif "/resolve/" in path:
                self._resolve(path, body=body)
            else:
                self._record()
                self._send(404, b"Not Found", {"Content-Type": "text/plain"}, body=body)
        except HubError as error:
            headers = {"Content-Type": "application/json", "X-Error-Code": error.code, "X-Error-Message": error.message}
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._send(404, json.dumps({"error": error.message}).encode(), headers, body=body)

    def _api_models(self, rest: str) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo_id, revision = unquote(repo_id), unquote(revision) or "main"
        self._record(repo_id)
        info = self.hub.repo_info(repo_id, revision)
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

    def _resolve(self, path: str, *, body: bool) -> None:
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo_id, revision, filename = unquote(repo_part), unquote(revision), unquote(filename)
        self._record(repo_id, filename)
        commit, file = self.hub.resolve(repo_id, revision, filename)
        if filename.endswith(LFS_SUFFIXES):
            sha256, location = self.hub.lfs_location(repo_id, filename, file)
            self._send(
                302,
                b"",
                {
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(file.stat().st_size),
                },
                body=body,
            )
            return
        data = file.read_bytes()
        self._send(
            200,
            data,
            {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"},
            body=body,
        )

    def _lfs(self, sha256: str, *, body: bool) -> None:
        try:
            repo_id, filename, file = self.hub.blob(sha256)
        except HubError:
            self._record()
            raise
        self._record(repo_id, filename)
        data = file.read_bytes()
        self._send(200, data, {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"}, body=body)

    def _record(self, repo_id: str | None = None, filename: str | None = None) -> None:
        self.hub._record(Request(self.command, unquote(urlsplit(self.path).path), repo_id, filename))

    def _send(self, status: int, data: bytes, headers: dict[str, str], *, body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
