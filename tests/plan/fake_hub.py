"""A Hugging Face hub on 127.0.0.1 for tests: the routes huggingface_hub 2.x downloads through, and a request log.

Served: ``GET /api/models/{repo}[/revision/{rev}]`` (model_info: ``sha`` and ``siblings``),
``GET /api/models/{repo}/tree/{rev}`` (the listing snapshot_download reads), and ``HEAD``/``GET
/{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and ``Range`` (206). Errors
carry the ``X-Error-Code`` header the real hub sends, from which huggingface_hub picks its exception class.
"""

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """A repo with one commit; ``refs`` maps branch or tag names to it."""

    files: dict[str, bytes]
    commit: str = "c0ffee" * 6 + "c0fe"
    refs: tuple[str, ...] = ("main",)
    refuse: int | None = None  # 401 (gated: X-Error-Code GatedRepo) or 403 on every file


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    # file name -> how many more GETs of it break off halfway (Content-Length says the whole file)
    cuts: dict[str, int] = field(default_factory=dict)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fetched(self) -> set[str]:
        """Every file name a HEAD or GET of a resolve URL asked for."""
        return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests if "/resolve/" in r.path}

    def _serve(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append(Request(handler.command, path, {k.lower(): v for k, v in handler.headers.items()}))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            repo_id, route, revision = api.groups()
            repo = self._repo(handler, repo_id, revision or "main")
            if repo is not None:
                self._api(handler, repo_id, repo, route == "tree")
        elif resolve:
            repo_id, revision, filename = resolve.groups()
            repo = self._repo(handler, repo_id, revision)
            if repo is not None:
                self._file(handler, repo, filename, body=body)
        else:
            _send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"})

    def _repo(self, handler, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            # As the real hub: 401 without a token for a repo that does not exist (or is private).
            _send(handler, 401, b"", {"X-Error-Code": "RepoNotFound"})
        elif revision not in repo.refs and revision != repo.commit:
            _send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"})
        else:
            return repo
        return None

    def _api(self, handler, repo_id: str, repo: Repo, tree: bool) -> None:
        if tree:
            data = [
                {"type": "file", "path": name, "size": len(blob), "oid": hashlib.sha1(blob).hexdigest()}
                for name, blob in repo.files.items()
            ]
        else:
            siblings = [{"rfilename": name, "size": len(blob)} for name, blob in repo.files.items()]
            data = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings, "private": False}
        _send(handler, 200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _file(self, handler, repo: Repo, filename: str, *, body: bool) -> None:
        if repo.refuse is not None:
            code = {"X-Error-Code": "GatedRepo"} if repo.refuse == 401 else {}
            _send(handler, repo.refuse, b"", code)
            return
        blob = repo.files.get(filename)
        if blob is None:
            _send(handler, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
            return
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(blob).hexdigest()}"'}
        headers["Accept-Ranges"] = "bytes"
        start = int(re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", "bytes=0-")).group(1))
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(blob) - 1}/{len(blob)}"
        part = blob[start:]
        if body and self.cuts.get(filename, 0) > 0:
            self.cuts[filename] -= 1
            _send(handler, status, part, headers, cut_at=len(part) // 2)
        else:
            _send(handler, status, part if body else b"", headers, length=len(part))


def _send(handler, status: int, body: bytes, headers: dict, *, length: int | None = None, cut_at=None) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    if cut_at is not None:
        # The whole length was promised; half of it arrives before the connection drops, as when a network fails.
        handler.wfile.write(body[:cut_at])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)
        handler.close_connection = True
        return
    handler.wfile.write(body)
