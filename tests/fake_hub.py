"""A small Hugging Face Hub on 127.0.0.1 for the push_to_hub tests (stdlib http.server in a thread).

It answers the routes huggingface_hub 2.4 uses to create a repo, commit files (small ones inline in the ndjson
commit, large ones through the git-LFS batch/upload/verify routes: set HF_HUB_DISABLE_XET=1) and download them
again (repo info, tree listing, resolve with HEAD/GET). Model repos and the `main` branch only.

It keeps each repo's files and commits so tests can assert on them, and can be told to refuse every token
(`refuse = 401`), refuse writes (`refuse = 403`) or fail the next N uploads (`fail_uploads = N`, answered 500).
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

USER = "tester"
REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Repo:
    private: bool
    files: dict = field(default_factory=dict)  # path -> bytes
    commits: list = field(default_factory=list)  # {"message", "added", "deleted", "oid"}

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class FakeHub:
    def __init__(self, token: str = "hf_fake_token", lfs_threshold: int = 10_000):
        self.token, self.lfs_threshold = token, lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.refuse = None  # None, 401 (bad token) or 403 (no write access)
        self.fail_uploads = 0  # answer the next N commit requests with 500
        self.failed = 0  # how many were answered 500
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict:
        """Environment for a script run as a subprocess against this server."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}

    def commit(self, repo_id: str, message: str, lines: list):
        repo = self.repos[repo_id]
        added, deleted = [], []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"])
                added.append(value["path"])
            elif key == "lfsFile":
                repo.files[value["path"]] = self.lfs[value["oid"]]
                added.append(value["path"])
            elif key == "deletedFile":
                repo.files.pop(value["path"], None)
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in repo.files if p.startswith(prefix)]:
                    del repo.files[path]
                deleted.append(value["path"])
        oid = hashlib.sha1(f"{repo_id} {len(repo.commits)} {message}".encode()).hexdigest()
        repo.commits.append({"message": message, "added": added, "deleted": deleted, "oid": oid})
        return oid


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def reply(self, status: int, body=None, headers=None, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def authorized(self, write: bool) -> bool:
            """Answers 401/403 (and returns False) for a wrong token or a refusing server."""
            if hub.refuse == 401 or self.headers.get("Authorization") != f"Bearer {hub.token}":
                self.reply(401, {"error": "Invalid credentials in Authorization header"},
                           {"X-Error-Message": "Invalid credentials in Authorization header"})
                return False
            if write and hub.refuse == 403:
                self.reply(403, {"error": "You don't have the rights to write to this repo"},
                           {"X-Error-Message": "You don't have the rights to write to this repo"})
                return False
            return True

        def route(self, pattern: str):
            return re.fullmatch(pattern, unquote(urlparse(self.path).path))

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            if self.route("/api/whoami-v2"):
                if self.authorized(write=False):
                    self.reply(200, {"type": "user", "name": USER, "orgs": [],
                                     "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            elif m := self.route(rf"/api/models/{REPO}/auth-check(?P<write>/write)?"):
                if self.authorized(write=bool(m["write"])) and self.known(m["repo"]):
                    self.reply(200, {})
            elif m := self.route(rf"/api/models/{REPO}/revision/(?P<rev>.+)"):
                if self.authorized(write=False) and self.known(m["repo"]):
                    repo = hub.repos[m["repo"]]
                    self.reply(200, {"id": m["repo"], "sha": repo.sha, "private": repo.private,
                                     "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
            elif m := self.route(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?P<under>/.*)?"):
                if self.authorized(write=False) and self.known(m["repo"]):
                    under = (m["under"] or "").strip("/")
                    entries = [{"type": "file", "path": p, "size": len(c), "oid": _git_blob_id(c)}
                               for p, c in sorted(hub.repos[m["repo"]].files.items())
                               if not under or p.startswith(under + "/")]
                    self.reply(200, entries)
            elif m := self.route(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"):
                repo = hub.repos.get(m["repo"])
                if not self.authorized(write=False):
                    return
                if repo is None or m["path"] not in repo.files:
                    self.reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                content = repo.files[m["path"]]
                self.reply(200, content, {"X-Repo-Commit": repo.sha, "ETag": f'"{_git_blob_id(content)}"'},
                           content_type="application/octet-stream")
            else:
                self.reply(404, {"error": f"Fake Hub: no route GET {self.path}"})

        def known(self, repo_id: str) -> bool:
            if repo_id in hub.repos:
                return True
            self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return False

        def do_POST(self):
            data = self.body()
            if self.route("/api/repos/create"):
                if not self.authorized(write=True):
                    return
                request = json.loads(data)
                repo_id = f"{request.get('organization') or USER}/{request['name']}"
                with hub.lock:
                    if repo_id in hub.repos:
                        self.reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                        return
                    hub.repos[repo_id] = Repo(private=request.get("visibility") == "private"
                                              or bool(request.get("private")))
                self.reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            elif self.route("/api/validate-yaml"):
                self.reply(*self.validate_yaml(json.loads(data)["content"]))
            elif m := self.route(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"):
                if self.authorized(write=True) and self.known(m["repo"]):
                    files = json.loads(data)["files"]
                    self.reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["size"] >= hub.lfs_threshold else "regular",
                         "shouldIgnore": False, "oid": None} for f in files]})
            elif m := self.route(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"):
                if not (self.authorized(write=True) and self.known(m["repo"])):
                    return
                with hub.lock:
                    if hub.fail_uploads > 0:
                        hub.fail_uploads -= 1
                        hub.failed += 1
                        self.reply(500, {"error": "Fake Hub: internal error (as asked)"})
                        return
                    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    missing = [line["value"]["oid"] for line in lines
                               if line["key"] == "lfsFile" and line["value"]["oid"] not in hub.lfs]
                    if missing:
                        self.reply(400, {"error": f"LFS objects were never uploaded: {missing}"})
                        return
                    oid = hub.commit(m["repo"], header["summary"], lines)
                self.reply(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{m['repo']}/commit/{oid}"})
            elif m := self.route(rf"/{REPO}\.git/info/lfs/objects/batch"):
                if not self.authorized(write=True):
                    return
                objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}", "header": {}},
                                        "verify": {"href": f"{hub.url}/lfs-verify", "header": {}}}}
                           for o in json.loads(data)["objects"]]
                self.reply(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")
            elif self.route("/lfs-verify"):
                request = json.loads(data)
                ok = request["oid"] in hub.lfs and len(hub.lfs[request["oid"]]) == request["size"]
                self.reply(200 if ok else 404, {} if ok else {"error": "object not uploaded"})
            else:
                self.reply(404, {"error": f"Fake Hub: no route POST {self.path}"})

        def do_PUT(self):
            data = self.body()
            if m := self.route("/lfs-upload/(?P<oid>[0-9a-f]{64})"):
                if hashlib.sha256(data).hexdigest() != m["oid"]:
                    self.reply(400, {"error": "sha256 mismatch"})
                    return
                hub.lfs[m["oid"]] = data
                self.reply(200, {})
            else:
                self.reply(404, {"error": f"Fake Hub: no route PUT {self.path}"})

        def validate_yaml(self, content: str):
            """Checks what the real Hub checks first: README.md metadata is a YAML mapping."""
            import yaml

            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                metadata = yaml.safe_load(match[1]) if match else None
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}
            if not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "no YAML metadata block"}], "warnings": []}
            return 200, {"errors": [], "warnings": []}

    return Handler
