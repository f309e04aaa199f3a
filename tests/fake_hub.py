"""A small in-memory stand-in for the Hugging Face Hub HTTP API, enough for huggingface_hub's
create_repo, create_branch, upload_folder (regular files in the commit body, and large files through
the git-LFS batch API with the basic transfer: batch, PUT, verify), repo_info, hf_hub_download /
snapshot_download and the safetensors header reads (HTTP range requests).

Point huggingface_hub at it with HF_ENDPOINT=hub.url (read at import: set it in a subprocess's
environment, or patch huggingface_hub.constants.ENDPOINT in-process).

Not implemented: the Xet storage protocol. huggingface_hub uploads LFS-mode files through Xet when
hf_xet is installed, so tests that want the LFS path set HF_HUB_DISABLE_XET=1; with Xet enabled,
the server answers preupload with uploadMode "regular" for every file (lfs_threshold=None).
"""

import base64
import hashlib
import inspect
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    def __init__(self, token: str | None = "hf_test_token", lfs_threshold: int | None = None):
        self.token = token  # None: every request is accepted
        self.lfs_threshold = lfs_threshold  # files of at least this size are asked for through LFS
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.commits: list[dict] = []  # {"repo", "branch", "summary", "regular": [...], "lfs": [...]}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.fail: dict[str, int] = {}  # request path fragment -> HTTP status to answer instead (fault injection)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id]["branches"][branch])

    def commit_sha(self, repo_id: str, branch: str = "main") -> str:
        files = self.repos[repo_id]["branches"][branch]
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        return digest.hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # ------------------------------------------------------------ plumbing

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body=b"", headers: dict | None = None, head_only: bool = False):
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head_only=self.command == "HEAD")  # HEAD: no body

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        def _route(self, method: str):
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((method, path))
            body = self._body() if method in ("POST", "PUT") else b""
            if path.startswith("/lfs-upload/"):  # pre-signed storage URL: no Hub token, like S3
                return self._lfs_put(path.rsplit("/", 1)[1], body)
            if not self._authorized():
                return
            for fragment, status in hub.fail.items():
                if fragment in path:
                    return self._error(status, f"fake hub: injected failure for {path}")
            routes = [
                ("POST", r"/api/repos/create", self._create_repo),
                ("POST", r"/api/validate-yaml", lambda: self._send(200, {"errors": [], "warnings": []})),
                ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
                ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self._commit),
                ("POST", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)", self._create_branch),
                ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
                ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)", self._tree),
                ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
                ("POST", r"/lfs-verify", self._lfs_verify),
                ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
                ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ]
            for verb, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "rev" in args and "repo" in args:
                        args["rev"] = self._branch_of(args["repo"], args["rev"])
                    return handler(body=body, **args) if "body" in inspect.signature(handler).parameters else handler(**args)
            self._error(404, f"fake hub: no route for {method} {path}")

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # ------------------------------------------------------------ repos

        def _branch_of(self, repo: str, rev: str) -> str:
            """Clients pin a revision to the commit it resolved to: map a commit id back to its branch."""
            branches = hub.repos.get(repo, {}).get("branches", {})
            if rev in branches or not re.fullmatch(r"[0-9a-f]{40}", rev):
                return rev
            return next((name for name in branches if hub.commit_sha(repo, name) == rev), rev)

        def _repo(self, repo: str, rev: str | None = "main"):
            entry = hub.repos.get(repo)
            if entry is None:
                self._error(404, f"Repository not found: {repo}", "RepoNotFound")
                return None
            if rev is not None and rev not in entry["branches"]:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return None
            return entry

        def _create_repo(self, body):
            payload = json.loads(body)
            repo = f"{payload.get('organization')}/{payload['name']}"
            with hub.lock:
                if repo in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                private = payload.get("private", payload.get("visibility") == "private")
                hub.repos[repo] = {"private": bool(private), "branches": {"main": {}}}
            self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})

        def _create_branch(self, repo, rev, body):
            entry = self._repo(repo)
            if entry is None:
                return
            with hub.lock:
                if rev in entry["branches"]:
                    return self._send(409, {"error": f"Reference already exists: refs/heads/{rev}"})
                entry["branches"][rev] = dict(entry["branches"]["main"])
            self._send(200, {})

        def _repo_info(self, repo, rev="main"):
            entry = self._repo(repo, rev)
            if entry is None:
                return
            files = entry["branches"][rev]
            self._send(200, {
                "id": repo, "modelId": repo, "private": entry["private"], "sha": hub.commit_sha(repo, rev),
                "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0, "likes": 0,
            })

        def _tree(self, repo, rev):
            entry = self._repo(repo, rev)
            if entry is None:
                return
            self._send(200, [
                {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                for path, content in sorted(entry["branches"][rev].items())
            ])

        # ------------------------------------------------------------ uploads

        def _preupload(self, repo, rev, body):
            if self._repo(repo, rev) is None:
                return
            files = json.loads(body)["files"]
            for f in files:
                base64.b64decode(f["sample"])  # must be valid base64
            threshold = hub.lfs_threshold
            self._send(200, {"files": [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if threshold is not None and f["size"] >= threshold and f["size"] > 0 else "regular"}
                for f in files
            ]})

        def _lfs_batch(self, repo, body):
            if self._repo(repo, None) is None:
                return
            payload = json.loads(body)
            assert payload["operation"] == "upload" and payload.get("hash_algo", "sha256") == "sha256"
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-verify"},
                    }
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid, body):
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "sha256 of the uploaded content does not match the oid")
            with hub.lock:
                hub.lfs_objects[oid] = body
            self._send(200, b"")

        def _lfs_verify(self, body):
            payload = json.loads(body)
            stored = hub.lfs_objects.get(payload["oid"])
            if stored is None or len(stored) != payload["size"]:
                return self._error(404, "LFS object not found or of the wrong size")
            self._send(200, {})

        def _commit(self, repo, rev, body):
            entry = self._repo(repo, rev)
            if entry is None:
                return
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self._error(400, "commit payload must start with a header line")
            changes, record = {}, {"repo": repo, "branch": rev, "summary": lines[0]["value"]["summary"],
                                   "regular": [], "lfs": [], "deleted": []}
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    assert value["encoding"] == "base64"
                    changes[value["path"]] = base64.b64decode(value["content"])
                    record["regular"].append(value["path"])
                elif key == "lfsFile":
                    content = hub.lfs_objects.get(value["oid"])
                    if content is None or len(content) != value["size"]:
                        return self._error(422, f"LFS object of {value['path']} was never uploaded")
                    changes[value["path"]] = content
                    record["lfs"].append(value["path"])
                elif key in ("deletedFile", "deletedFolder"):
                    changes[value["path"]] = None
                    record["deleted"].append(value["path"])
                else:
                    return self._error(400, f"unknown commit operation {key}")
            with hub.lock:
                files = entry["branches"][rev]
                for path, content in changes.items():
                    if content is None:
                        files.pop(path, None)
                    else:
                        files[path] = content
                hub.commits.append(record)
                sha = hub.commit_sha(repo, rev)
            self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None, "success": True})

        # ------------------------------------------------------------ downloads

        def _resolve(self, repo, rev, file):
            entry = self._repo(repo, rev)
            if entry is None:
                return
            content = entry["branches"][rev].get(file)
            if content is None:
                return self._error(404, f"Entry not found: {file}", "EntryNotFound")
            headers = {"X-Repo-Commit": hub.commit_sha(repo, rev),
                       "ETag": f'"{hashlib.sha256(content).hexdigest()}"', "Accept-Ranges": "bytes"}
            status, body = 200, content
            wanted = self.headers.get("Range")
            if wanted and self.command == "GET":
                start, _, end = wanted.removeprefix("bytes=").partition("-")
                start, end = int(start), min(int(end) if end else len(content) - 1, len(content) - 1)
                status, body = 206, content[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            if self.command == "HEAD":
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                return
            self._send(status, body, headers)

    return Handler
