"""A loopback stand-in for the Hugging Face Hub: enough HTTP for the real HfApi to create a
repo, upload a folder in one commit, and for hf_hub_download / DiffusionPipeline to read it
back. Standard library only; binds 127.0.0.1 on port 0; repositories live in memory.

Visibility as the Hub answers it: ``POST /api/repos/create`` with ``visibility`` "private" or
"public" (huggingface_hub 1+; older clients sent ``private``: true/false) sets it, and with
neither the new repo gets the namespace's default (``FakeHub(private_by_default=True)``: an
organisation whose new repos are private); ``GET /api/models/{id}`` reports ``private``;
``PUT /api/models/{id}/settings`` (``update_repo_settings``) changes it. Every request's
method, path and body are recorded in ``hub.bodies``."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.branches: dict[str, str] = {}
        self.snapshots: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.new_commit("main", {}, "initial commit")

    def new_commit(self, branch: str, files: dict[str, bytes], summary: str) -> str:
        digest = hashlib.sha1(json.dumps([summary, len(self.commits), sorted((k, hashlib.sha1(v).hexdigest())
                                                                                 for k, v in files.items())]).encode())
        sha = digest.hexdigest()
        self.snapshots[sha] = files
        self.branches[branch] = sha
        self.commits.append({"sha": sha, "branch": branch, "summary": summary, "files": sorted(files)})
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        return self.branches.get(revision) or (revision if revision in self.snapshots else None)


class FakeHub:
    """``with FakeHub() as hub:`` → ``hub.endpoint``; ``hub.repos``, ``hub.requests``, ``hub.bodies``
    (method, path, the body: parsed JSON where it is JSON, else bytes) to inspect; ``hub.existing(repo_id,
    private)`` makes a repo as if created before."""

    def __init__(self, private_by_default: bool = False):
        self.private_by_default = private_by_default
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, object]] = []
        self.create_payloads: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, payload, headers: dict | None = None):
                self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _body(self) -> bytes:
                body = self._read_body()
                try:
                    parsed: object = json.loads(body) if body else None
                except ValueError:  # the commit's NDJSON, or bytes
                    parsed = body
                hub.bodies.append((self.command, urlparse(self.path).path, parsed))
                return body

            def _read_body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    return self.rfile.read(length)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return b""

            def do_POST(self):
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                hub.requests.append(("POST", url.path))
                body = self._body()
                if parts[:3] == ["api", "repos", "create"]:
                    payload = json.loads(body or b"{}")
                    hub.create_payloads.append(payload)
                    repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    url_ = f"{hub.endpoint}/{repo_id}"
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo", "url": url_})
                    hub.repos[repo_id] = Repo(repo_id, hub.visibility(payload, hub.private_by_default))
                    return self._json(200, {"url": url_, "name": repo_id, "id": repo_id})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._json(200, {"errors": [], "warnings": []})
                if parts[0] == "api" and parts[1] == "models" and len(parts) >= 6:
                    repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if action == "preupload":
                        files = json.loads(body).get("files", [])
                        return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        return self._commit(repo, revision, body, parse_qs(url.query))
                return self._json(404, {"error": f"no route POST {url.path}"})

            def _commit(self, repo: Repo, revision: str, body: bytes, query: dict):
                base = repo.resolve(revision) or repo.branches["main"]
                files = dict(repo.snapshots[base])
                summary = ""
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "header":
                        summary = value.get("summary", "")
                    elif item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
                branch = f"refs/pr/{len(repo.commits)}" if create_pr else unquote(revision)
                sha = repo.new_commit(branch, files, summary)
                pr = f"{hub.endpoint}/{repo.repo_id}/discussions/{len(repo.commits)}" if create_pr else None
                return self._json(200, {"commitOid": sha, "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{sha}",
                                        "pullRequestUrl": pr, "success": True})

            def _info(self, repo: Repo, revision: str, head: bool):
                sha = repo.resolve(revision)
                if sha is None:
                    return self._json(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                files = repo.snapshots[sha]
                return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                                        "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())],
                                        "tags": [], "downloads": 0, "likes": 0, "lastModified": "2026-11-28T00:00:00.000Z"})

            def _tree(self, repo: Repo, revision: str, prefix: str):
                sha = repo.resolve(revision)
                if sha is None:
                    return self._json(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                entries, folders = [], set()
                for name, data in sorted(repo.snapshots[sha].items()):
                    if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                        continue
                    parents = name.split("/")[:-1]
                    for i in range(1, len(parents) + 1):
                        folders.add("/".join(parents[:i]))
                    entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
                entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
                return self._json(200, entries)

            def _get(self, head: bool):
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                hub.requests.append(("HEAD" if head else "GET", url.path))
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if len(parts) >= 6 and parts[4] == "tree":
                        return self._tree(repo, parts[5], "/".join(parts[6:]))
                    revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                    return self._info(repo, revision, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    sha = repo.resolve(parts[3])
                    path = "/".join(parts[4:])
                    if sha is None or path not in repo.snapshots[sha]:
                        return self._json(404, {"error": "Entry not found"},
                                          {"X-Error-Code": "EntryNotFound" if sha else "RevisionNotFound",
                                           **({"X-Repo-Commit": sha} if sha else {})})
                    data = repo.snapshots[sha][path]
                    etag = hashlib.sha1(data).hexdigest()
                    return self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": sha,
                                                  "Content-Type": "application/octet-stream"}, head=head)
                return self._json(404, {"error": f"no route GET {url.path}"})

            def do_PUT(self):
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                hub.requests.append(("PUT", url.path))
                payload = json.loads(self._body() or b"{}")
                if parts[:2] == ["api", "models"] and len(parts) == 5 and parts[4] == "settings":
                    repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    repo.private = hub.visibility(payload, repo.private)
                    return self._json(200, {})
                return self._json(404, {"error": f"no route PUT {url.path}"})

            def do_GET(self):
                self._get(head=False)

            def do_HEAD(self):
                self._get(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def visibility(payload: dict, default: bool) -> bool:
        """private from a create or settings payload: ``visibility``, else ``private``, else ``default``."""
        if payload.get("visibility") in ("private", "public"):
            return payload["visibility"] == "private"
        if isinstance(payload.get("private"), bool):
            return payload["private"]
        return default

    def existing(self, repo_id: str, private: bool) -> Repo:
        """A repo made before the test, as on a real Hub."""
        self.repos[repo_id] = Repo(repo_id, private)
        return self.repos[repo_id]

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
