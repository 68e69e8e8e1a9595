"""A local stand-in for the Hugging Face Hub API, for push tests. Only ever listens on 127.0.0.1.

It answers the calls huggingface_hub makes for `create_repo`, `create_commit` / `upload_folder` and README
validation, `create_branch`, and records what arrives:

    from fake_hub import fake_hub

    with fake_hub(token="hf_test") as hub:          # hub.endpoint is "http://127.0.0.1:<port>"
        HfApi(endpoint=hub.endpoint, token="hf_test").upload_folder(...)
    hub.files("me/repo")      # {path: bytes} as committed (latest commit wins)
    hub.commits               # one dict per commit: repo_id, revision, create_pr, summary, description, files
    hub.created               # the create_repo payloads
    hub.requests              # (method, path, status) of every request, in order

Options: `token` (requests without `Authorization: Bearer <token>` get 401), `fail` ({"create": 500,
"preupload": 401, "commit": 500, "validate": 400}: answer that call with that status), `timeout_s` (the server
shuts itself down after that many seconds even if the test hangs). While the context is open, huggingface_hub's
offline switch (HF_HUB_OFFLINE, set by conftest) is lifted so that requests to the loopback server can be made.

Every file is declared a regular (non-LFS) file in the preupload answer, so contents arrive inline in the
commit payload; the LFS / Xet transfer of large files is not exercised here.
"""

import base64
import contextlib
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants


REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
ROUTES = [
    ("create", "POST", re.compile(r"^/api/repos/create$")),
    ("validate", "POST", re.compile(r"^/api/validate-yaml$")),
    ("preupload", "POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>.+)$")),
    ("commit", "POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>.+)$")),
    ("branch", "POST", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>.+)$")),
]


class FakeHub:
    def __init__(self, token=None, fail=None):
        self.token = token
        self.fail = dict(fail or {})
        self.endpoint = None
        self.repos = {}  # repo_id -> {"private": bool | None, "files": {path: bytes}}
        self.created = []
        self.commits = []
        self.validated = []
        self.branches = []  # (repo_id, branch) of create_branch calls
        self.requests = []
        self.lock = threading.Lock()

    def files(self, repo_id, revision="main"):
        """Files of `repo_id` after all commits to `revision` (pull-request commits are kept apart)."""
        merged = {}
        for commit in self.commits:
            if commit["repo_id"] == repo_id and commit["revision"] == revision and not commit["create_pr"]:
                merged.update(commit["files"])
        return merged

    # --------------------------------------------------------------------------------------- handlers

    def handle(self, kind, match, body, query):
        if kind == "create":
            payload = json.loads(body)
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            self.created.append(payload)
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            # huggingface_hub >= 1.8 sends "visibility"; older 1.x sends "private" (the Hub accepts both).
            private = payload.get("visibility") == "private" or payload.get("private") is True
            self.repos[repo_id] = {"private": private, "files": {}}
            return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}
        if kind == "validate":
            payload = json.loads(body)
            self.validated.append(payload["content"])
            return 200, {"errors": [], "warnings": []}
        repo_id = unquote(match["repo"])
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}, {"X-Error-Code": "RepoNotFound"}
        if kind == "branch":
            self.branches.append((repo_id, unquote(match["rev"])))
            return 200, {}
        if kind == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        # commit: one JSON object per line; a header, then the files
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        files = {}
        for item in lines[1:]:
            if item["key"] != "file":
                return 422, {"error": f"fake_hub only accepts regular files, got {item['key']!r}"}
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        create_pr = query.get("create_pr") == "1"
        oid = hashlib.sha1(body).hexdigest()
        revision = unquote(match["rev"])
        self.commits.append(
            dict(repo_id=repo_id, revision=revision, create_pr=create_pr, summary=header.get("summary"),
                 description=header.get("description"), files=files, oid=oid)
        )
        if not create_pr:
            self.repos[repo_id]["files"].update(files)
        pr_number = sum(c["create_pr"] for c in self.commits if c["repo_id"] == repo_id)
        return 200, {
            "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": f"{self.endpoint}/{repo_id}/discussions/{pr_number}" if create_pr else None,
        }

    def dispatch(self, method, raw_path, headers, body):
        url = urlsplit(raw_path)
        query = dict(part.split("=", 1) for part in url.query.split("&") if "=" in part)
        for kind, route_method, pattern in ROUTES:
            match = pattern.match(url.path)
            if match and method == route_method:
                break
        else:
            return 404, {"error": f"fake_hub does not implement {method} {url.path}"}, {}
        if kind in self.fail:
            status = self.fail[kind]
            return status, {"error": f"fake_hub: simulated {status} on {kind}"}, {}
        if kind != "validate" and self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        with self.lock:
            status, payload, *extra = self.handle(kind, match, body, query)
        return status, payload, (extra[0] if extra else {})


def _handler_class(hub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, payload, extra_headers = hub.dispatch(self.command, self.path, self.headers, body)
            except Exception as err:  # a malformed request is the client's bug: answer 500 and record it
                status, payload, extra_headers = 500, {"error": f"fake_hub: {type(err).__name__}: {err}"}, {}
            hub.requests.append((self.command, self.path, status))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra_headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args):  # keep test output clean
            pass

    return Handler


@contextlib.contextmanager
def fake_hub(token=None, fail=None, timeout_s=120):
    """Run a FakeHub on 127.0.0.1 (a free port) for the duration of the `with` block; yields the FakeHub."""
    hub = FakeHub(token=token, fail=fail)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(hub))
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    watchdog = threading.Timer(timeout_s, server.shutdown)
    watchdog.daemon = True
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    thread.start()
    watchdog.start()
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    try:
        yield hub
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
