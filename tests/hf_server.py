"""A small fake Hugging Face Hub on 127.0.0.1, speaking the endpoints huggingface_hub 2.4 calls.

- `GET /api/models/{repo}[/revision/{rev}]` (model_info; `?blobs=True` adds sizes, blob ids and LFS data),
- `GET /api/models/{repo}/tree/{rev}` (list_repo_tree, used by snapshot_download),
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: plain files answer directly with ETag, X-Repo-Commit and Content-Length;
  LFS files (*.safetensors, *.gguf) answer 302 to a second "CDN" server on another port, with X-Linked-Etag/-Size, like the Hub,
- `GET /cdn/{sha256}` on the CDN server, with Range support.

Errors carry the X-Error-Code header huggingface_hub maps to its exceptions (RepoNotFound, RevisionNotFound,
GatedRepo, EntryNotFound). `drop_once` makes the next full GET of a file send half its bytes and hang up. Every request
is logged in `requests` so tests can check what the client asked for (e.g. a Range header on resume). `stall` keeps
a transfer half done until `release` is set, so a test can interrupt the client mid-file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

GOOD_TOKEN = "hf_good_token"  # the one token with access to gated repos
INVALID_TOKEN = "hf_invalid_token"  # rejected outright, like a revoked token


@functools.lru_cache(maxsize=None)  # bytes keep their hash: a 100 MB file is hashed once, not per request
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=None)
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""  # commit hash; derived from the contents when empty
    gated: bool = False
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # sizes model_info reports instead of the real ones
    refs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + self.files[name])
            self.sha = digest.hexdigest()
        self.refs.setdefault("main", self.sha)

    def commit(self, rev: str) -> str | None:
        return self.refs.get(rev) or (self.sha if rev == self.sha else None)

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith((".safetensors", ".bin", ".pth", ".gguf"))


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []  # {"server", "method", "path", "headers"}
        self.drop_once: set[str] = set()  # file paths to cut off half-way on their next full GET
        self.stall: set[str] = set()  # file paths whose full GETs send half, then wait for `release`, then hang up
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        for role in ("hub", "cdn"):
            server = _QuietServer(("127.0.0.1", 0), _make_handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def add(self, repo_id: str, repo: Repo) -> Repo:
        self.repos[repo_id] = repo
        return repo

    def log(self, **entry) -> None:
        with self._lock:
            self.requests.append(entry)

    def blob_by_sha256(self, sha256: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for path, data in repo.files.items():
                if sha256_hex(data) == sha256:
                    return path, data
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up are expected
            super().handle_error(request, client_address)


def _make_handler(hub: FakeHub, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        # -- responses -------------------------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, head=False):
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

        def _error(self, status: int, code: str | None, message: str, head=False, headers: dict | None = None):
            h = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
            if code:
                h["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), h, head)

        def _body(self, data: bytes, headers: dict, head: bool, drop_key: str):
            """Serve `data`, honouring `Range: bytes=N-` and a pending drop_once."""
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[len("bytes=") :].split("-")[0])
            if start:
                headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            headers = {**headers, "Content-Length": len(data) - start, "Accept-Ranges": "bytes"}
            status = 206 if start else 200
            stall = drop_key in hub.stall
            if not head and not start and (stall or drop_key in hub.drop_once):
                hub.drop_once.discard(drop_key)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if stall:
                    hub.release.wait(60)
                self.connection.shutdown(socket.SHUT_RDWR)  # hang up mid-body
                self.close_connection = True
                return
            self._send(status, data[start:], headers, head)

        # -- routing ---------------------------------------------------------------------------------------------
        def _route(self, head: bool):
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log(server=role, method=self.command, path=path, query=url.query, headers=dict(self.headers))
            parts = path.strip("/").split("/")
            if role == "cdn":
                found = hub.blob_by_sha256(parts[-1]) if parts[0] == "cdn" else None
                if found is None:
                    return self._error(404, None, "no such blob", head)
                return self._body(found[1], {"ETag": f'"{parts[-1]}"'}, head, drop_key=found[0])

            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                repo = self._repo_or_error(repo_id, head)
                if repo is None:
                    return
                if not rest:
                    return self._info(repo_id, repo, "main", url.query, head)
                if rest[0] == "revision" and len(rest) == 2:
                    return self._info(repo_id, repo, rest[1], url.query, head)
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo, rest[1], head)
            elif len(parts) >= 5 and parts[2] == "resolve":
                repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = self._repo_or_error(repo_id, head)
                if repo is not None:
                    self._resolve(repo_id, repo, rev, filename, head)
                return
            self._error(404, None, "not found", head)

        def _repo_or_error(self, repo_id: str, head: bool) -> Repo | None:
            auth = self.headers.get("Authorization", "")
            if auth == f"Bearer {INVALID_TOKEN}":
                self._error(401, None, "Invalid credentials in Authorization header", head)
                return None
            repo = hub.repos.get(repo_id)
            if repo is None:
                # The Hub answers 401 for a missing repo when unauthenticated (it could be private).
                self._error(
                    401 if not auth else 404,
                    "RepoNotFound",
                    "Repository not found",
                    head,
                )
            return repo

        def _info(self, repo_id: str, repo: Repo, rev: str, query: str, head: bool):
            sha = repo.commit(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            siblings = []
            for name, data in sorted(repo.files.items()):
                s = {"rfilename": name}
                if "blobs=" in query:
                    size = repo.claimed_sizes.get(name, len(data))
                    s.update(size=size, blobId=git_blob_sha1(data))
                    if Repo.is_lfs(name):
                        s["lfs"] = {"size": size, "sha256": sha256_hex(data), "pointerSize": 134}
                siblings.append(s)
            self._json(
                {"id": repo_id, "sha": sha, "private": False, "gated": "manual" if repo.gated else False,
                 "siblings": siblings},
                head,
            )

        def _tree(self, repo: Repo, rev: str, head: bool):
            if repo.commit(rev) is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            entries = []
            for name, data in sorted(repo.files.items()):
                e = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                if Repo.is_lfs(name):
                    e["lfs"] = {"oid": sha256_hex(data), "size": len(data), "pointerSize": 134}
                entries.append(e)
            self._json(entries, head)

        def _resolve(self, repo_id: str, repo: Repo, rev: str, filename: str, head: bool):
            sha = repo.commit(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if repo.gated:
                auth = self.headers.get("Authorization")
                if auth is None:
                    return self._error(
                        401, "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                        head,
                    )
                if auth != f"Bearer {GOOD_TOKEN}":
                    return self._error(
                        403, "GatedRepo",
                        f"Access to model {repo_id} is restricted and you are not in the authorized list.", head,
                    )
            data = repo.files.get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist", head, {"X-Repo-Commit": sha})
            if Repo.is_lfs(filename):
                sha256 = sha256_hex(data)
                return self._send(
                    302, b"",
                    {"Location": f"{hub.cdn_url}/cdn/{sha256}", "X-Repo-Commit": sha, "X-Linked-Etag": f'"{sha256}"',
                     "X-Linked-Size": len(data), "ETag": f'"{git_blob_sha1(data)}"'},
                    head,
                )
            self._body(data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha}, head, drop_key=filename)

    return Handler


# -- a tiny runnable repo ------------------------------------------------------------------------------------------

TINY_QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_qwen2_tensors(seed: int = 0) -> dict:
    """Random bf16 weights with the tensor names and shapes of a Qwen2 checkpoint for TINY_QWEN2_CONFIG."""
    import torch

    c = TINY_QWEN2_CONFIG
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


def tiny_qwen2_repo() -> dict[str, bytes]:
    """Files of a two-shard tiny Qwen2 repo, plus files `r1 pull` must skip (.bin, .pth, .py, README, a subfolder)."""
    from safetensors.torch import save

    tensors = tiny_qwen2_tensors()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": [n for n in names if "layers.1." not in n and "lm_head" not in n],
        "model-00002-of-00002.safetensors": [n for n in names if "layers.1." in n or "lm_head" in n],
    }
    files = {fname: save({n: tensors[n] for n in ns}, metadata={"format": "pt"}) for fname, ns in shards.items()}
    weight_map = {n: fname for fname, ns in shards.items() for n in ns}
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
        "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
    )
    files.update({
        "config.json": json.dumps(TINY_QWEN2_CONFIG, indent=2).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": True,
                                              "temperature": 0.6, "top_p": 0.95}).encode(),
        "model.safetensors.index.json": json.dumps({"metadata": {"total_size": total_bytes},
                                                    "weight_map": weight_map}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode(),
        "tokenizer_config.json": json.dumps({"bos_token": "<｜begin▁of▁sentence｜>",
                                             "eos_token": "<｜end▁of▁sentence｜>",
                                             "chat_template": chat_template}).encode(),
        # Files r1 never downloads:
        "README.md": b"# tiny\n",
        "pytorch_model.bin": b"\0" * 1000,
        "modeling_tiny.py": b"print('never run me')\n",
        "original/consolidated.00.pth": b"\0" * 1000,
        "extra/model.safetensors": b"\0" * 100,
    })
    return files
