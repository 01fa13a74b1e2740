"""Model files and the cache as attack surface (issue #14): malformed configs, indexes, safetensors and GGUF headers,
planted links in the Hugging Face cache, a damaged or unwritable quantized cache.

The table runs each malformed input through the real CLI (`r1 show`, `r1 run`, `r1 pull`) in its own process, under
an address-space limit and a timeout, and asserts one `r1: ...` line with the documented exit code. The GGUF and
safetensors files are written byte by byte here, following the formats' specifications (GGUF v3: little-endian
counts, typed key-values, tensor infos, aligned data; safetensors: an 8-byte header length, a JSON header, data),
and every builder's valid output is run first as a control that must succeed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, r1_env, run_r1
from paths import R1_TOKENIZER

# --- builders ------------------------------------------------------------------------------------------------------

VOCAB, DIM, FFN, HEADS = 16, 8, 16, 2
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": DIM, "intermediate_size": FFN,
    "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32",
}


def qwen2_tensors(layers: int = 1) -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [VOCAB, DIM], "model.norm.weight": [DIM], "lm_head.weight": [VOCAB, DIM]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": [DIM], p + "post_attention_layernorm.weight": [DIM],
            **{p + f"self_attn.{x}_proj.weight": [DIM, DIM] for x in "qkvo"},
            **{p + f"self_attn.{x}_proj.bias": [DIM] for x in "qkv"},
            p + "mlp.gate_proj.weight": [FFN, DIM], p + "mlp.up_proj.weight": [FFN, DIM], p + "mlp.down_proj.weight": [DIM, FFN],
        })
    return shapes


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """An 8-byte little-endian header length, the JSON header (any JSON value, for hostile rows), then the data."""
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text)) + text + data


def valid_safetensors(shapes: dict[str, list[int]]) -> bytes:
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors_bytes(header, b"\0" * offset)


def model_folder(root: Path, config=None, st: bytes | None = None, index=None) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN2 if config is None else config))
    (folder / "model.safetensors").write_bytes(valid_safetensors(qwen2_tensors()) if st is None else st)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# GGUF value types
U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(value) -> tuple[int, bytes]:
    """(type, bytes) of a metadata value: an int as uint32, a float as float32, a str, or (type, raw bytes)."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, bool):
        return BOOL, struct.pack("<?", value)
    if isinstance(value, int):
        return U32, struct.pack("<I", value)
    if isinstance(value, float):
        return F32, struct.pack("<f", value)
    return STR, gguf_string(value)


LLAMA_META = {
    "general.architecture": "llama", "llama.block_count": 1, "llama.context_length": 64,
    "llama.embedding_length": DIM, "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
    "llama.attention.head_count_kv": HEADS, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 10000.0,
}
LLAMA_TENSORS = [("token_embd.weight", [VOCAB, DIM]), ("output_norm.weight", [DIM]), ("blk.0.attn_norm.weight", [DIM])]


def gguf_bytes(meta: dict | None = None, tensors=None, offsets: list[int] | None = None, align: int = 32,
               raw_dims: dict[str, list[int]] | None = None, extra_kv: tuple = ()) -> bytes:
    """A GGUF v3 file of F32 tensors (shapes in torch order, rows first), packed in order at `align` unless
    `offsets` are given; `raw_dims`: the dims written for a tensor as they are (innermost first); `extra_kv`:
    more (key, value) pairs after `meta`'s."""
    pairs = [*(LLAMA_META if meta is None else meta).items(), *extra_kv]
    kv = b"".join(gguf_string(k) + struct.pack("<I", t) + v for k, (t, v) in ((k, gguf_value(v)) for k, v in pairs))
    tensors = LLAMA_TENSORS if tensors is None else tensors
    infos, pos = b"", 0
    for i, (name, shape) in enumerate(tensors):
        size = math.prod(shape) * 4
        offset = offsets[i] if offsets is not None else pos
        dims = (raw_dims or {}).get(name, list(reversed(shape)))
        infos += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", 0, offset)  # type 0: F32
        pos = max(pos, offset + size)
        pos += -pos % align
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(pairs)) + kv + infos
    head += b"\0" * (-len(head) % (align if isinstance(align, int) and align > 0 else 32))
    return head + b"\0" * pos


def nested_arrays(depth: int) -> tuple[int, bytes]:
    """An array of one array of ... `depth` deep, ending in an empty array of uint32."""
    return ARR, struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", U32, 0)


# --- the table -----------------------------------------------------------------------------------------------------


def _write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def _config(**changes):
    return {**QWEN2, **changes}


def _replace_config(folder: Path, make) -> Path:
    (folder / "config.json").unlink()
    make(folder / "config.json")
    return folder


def _deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _overlap_header():
    shapes = qwen2_tensors()
    header = json.loads(valid_safetensors(shapes)[8:].split(b"\0")[0].rstrip())
    first, second = list(header)[:2]
    begin, end = header[second]["data_offsets"]
    start = header[first]["data_offsets"][0] + 4  # the second inside the first, at its own size
    header[second]["data_offsets"] = [start, start + end - begin]
    size = max(e["data_offsets"][1] for e in header.values())
    return safetensors_bytes(header, b"\0" * size)


def _st_header(mutate):
    header = json.loads(valid_safetensors(qwen2_tensors())[8:].split(b"\0")[0].rstrip())
    size = max(e["data_offsets"][1] for e in header.values())
    mutate(header)
    return safetensors_bytes(header, b"\0" * size)


def _set_offsets(value):
    def mutate(header):
        header["model.norm.weight"]["data_offsets"] = value
    return mutate


def _gguf_overlap():
    sizes = [math.prod(s) * 4 for _, s in LLAMA_TENSORS]
    return gguf_bytes(offsets=[0, sizes[0] - 32, sizes[0] + sizes[1]])


def _gguf_meta(**changes):
    meta = {**LLAMA_META}
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            meta.pop(key)
        else:
            meta[key] = v
    return gguf_bytes(meta)


# (id, kind, content, command, exit code, words the error line holds). kind: "config" (config.json content or a
# callable making it), "st" (model.safetensors bytes), "index" (the index's content), "gguf" (the file's bytes),
# "args" (a command line of its own). command: "show" or "run".
ROWS = [
    ("config-list", "config", [1, 2], "show", 1, ["JSON object"]),
    ("config-string", "config", "qwen2", "run", 1, ["JSON object"]),
    ("config-folder", "config", lambda p: p.mkdir(), "show", 1, ["folder"]),
    ("config-fifo", "config", lambda p: os.mkfifo(p), "show", 1, ["FIFO"]),
    ("config-dev-zero", "config", lambda p: p.symlink_to("/dev/zero"), "run", 1, ["regular file"]),
    ("config-deep-json", "config", _deep_json(200_000), "show", 1, ["nested too deeply"]),
    ("config-million-layers", "config", _config(num_hidden_layers=1_000_000), "show", 1, ["num_hidden_layers"]),
    ("config-million-layers-run", "config", _config(num_hidden_layers=1_000_000), "run", 1, ["num_hidden_layers"]),
    ("config-layers-not-in-checkpoint", "config", _config(num_hidden_layers=500), "show", 1, ["no tensors for layer 1"]),
    ("config-negative-size", "config", _config(hidden_size=-8), "show", 1, ["hidden_size"]),
    ("config-string-size", "config", _config(vocab_size="16"), "run", 1, ["vocab_size"]),
    ("config-zero-heads", "config", _config(num_attention_heads=0), "show", 1, ["num_attention_heads"]),
    ("config-yarn-without-original", "config", _config(rope_scaling={"type": "yarn", "factor": 4.0}), "show", 1,
     ["original_max_position_embeddings"]),
    ("config-eps-string", "config", _config(rms_norm_eps="tiny"), "show", 1, ["rms_norm_eps"]),
    ("config-rope-nan", "config", json.dumps(_config(rope_theta=float("nan"))).encode(), "run", 1, ["rope_theta"]),
    ("config-rope-inf", "config", json.dumps(_config(rope_theta=float("inf"))).encode(), "show", 1, ["rope_theta"]),
    ("config-rope-zero", "config", _config(rope_theta=0), "show", 1, ["RoPE base"]),
    ("config-rope-negative", "config", _config(rope_theta=-10000.0), "run", 1, ["RoPE base"]),
    ("tokenizer-past-the-embedding", "config", _config(), "run", 1, ["does not belong to this model"]),
    ("index-list", "index", [["model.norm.weight", "model.safetensors"]], "show", 1, ["JSON array"]),
    ("index-absolute-shard", "index", {"weight_map": {"model.norm.weight": "/etc/passwd"}}, "show", 1, ["/etc/passwd"]),
    ("index-dotdot-shard", "index", {"weight_map": {"model.norm.weight": "../model/model.safetensors"}}, "run", 1,
     ["../model/model.safetensors"]),
    ("index-weight-map-list", "index", {"weight_map": ["model.safetensors"]}, "show", 1, ["weight_map"]),
    ("st-header-list", "st", safetensors_bytes([1, 2, 3]), "show", 1, ["corrupt"]),
    ("st-header-string", "st", safetensors_bytes("model"), "run", 1, ["corrupt"]),
    ("st-header-deep", "st", safetensors_bytes(_deep_json(200_000)), "show", 1, ["corrupt"]),
    ("st-header-length-past-end", "st", struct.pack("<Q", 2**60) + b"{}", "show", 1, ["corrupt"]),
    ("st-negative-offsets", "st", _st_header(_set_offsets([-32, 0])), "show", 1, ["model.norm.weight"]),
    ("st-string-offsets", "st", _st_header(_set_offsets(["0", "32"])), "run", 1, ["model.norm.weight"]),
    ("st-overlapping-offsets", "st", _overlap_header(), "show", 1, ["overlap"]),
    ("st-fifo", "st", None, "show", 1, ["FIFO"]),
    ("gguf-alignment-zero", "gguf", _gguf_meta(general__alignment=0), "show", 1, ["general.alignment"]),
    ("gguf-alignment-string", "gguf", _gguf_meta(general__alignment="32"), "show", 1, ["general.alignment"]),
    ("gguf-nested-arrays", "gguf", _gguf_meta(general__tags=nested_arrays(200_000)), "show", 1, ["nested"]),
    ("gguf-array-count-huge", "gguf", _gguf_meta(general__tags=(ARR, struct.pack("<IQ", STR, 2**62))), "show", 1,
     ["cannot fit"]),
    ("gguf-dimension-2^63", "gguf", gguf_bytes(raw_dims={"token_embd.weight": [DIM, 2**63]}), "show", 1,
     ["token_embd.weight"]),
    ("gguf-many-dimensions", "gguf", gguf_bytes(raw_dims={"output_norm.weight": [1] * 100_000}), "show", 1,
     ["dimensions"]),
    ("gguf-head-count-zero", "gguf", _gguf_meta(llama__attention__head_count=0), "show", 1, ["head_count"]),
    ("gguf-string-hyperparameter", "gguf", _gguf_meta(llama__embedding_length="8"), "show", 1, ["embedding_length"]),
    ("gguf-string-eps", "gguf", _gguf_meta(llama__attention__layer_norm_rms_epsilon="1e-5"), "show", 1,
     ["layer_norm_rms_epsilon"]),
    ("gguf-string-rope-base", "gguf", _gguf_meta(llama__rope__freq_base="10000"), "show", 1, ["freq_base"]),
    ("gguf-rope-base-nan", "gguf", _gguf_meta(llama__rope__freq_base=float("nan")), "show", 1, ["RoPE base"]),
    ("gguf-rope-base-negative", "gguf", _gguf_meta(llama__rope__freq_base=-1.0), "show", 1, ["RoPE base"]),
    ("gguf-million-blocks", "gguf", _gguf_meta(llama__block_count=1_000_000), "show", 1, ["block_count"]),
    ("gguf-overlapping-offsets", "gguf", _gguf_overlap(), "show", 1, ["overlap"]),
    ("gguf-tensor-count-huge", "gguf", b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "show", 1, ["cannot fit"]),
    ("gguf-duplicate-key", "gguf", gguf_bytes(extra_kv=[("llama.block_count", 1)]), "show", 1, ["twice"]),
    ("pull-dotdot", "args", ["pull", "org/.."], None, 2, ["not a Hub repo id"]),
    ("pull-dot", "args", ["pull", "org/."], None, 2, ["not a Hub repo id"]),
    ("pull-odd-characters", "args", ["pull", "org/na%me"], None, 2, ["not a Hub repo id"]),
    ("pull-dotdot-in-name", "args", ["pull", "org/a..b"], None, 2, ["not a Hub repo id"]),
    ("pull-revision-dotdot", "args", ["pull", "org/name@../../x"], None, 2, ["not a revision"]),
    ("run-dotdot", "args", ["run", "org/..", "hi"], None, 2, ["not a Hub repo id"]),
    ("rm-dotdot", "args", ["rm", "org/..", "--yes"], None, 2, ["not a Hub repo id"]),
]

MEMORY_LIMIT = 3 * 2**30  # address space: importing torch takes about 0.7 GB of it; a million layers would not fit
TIMEOUT_S = 60  # a row takes a few seconds (starting Python and torch); the limit catches one that spins or blocks


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _env(tmp_path: Path) -> dict[str, str]:
    # No GPU: a CUDA context reserves far more address space than the limit, and no row needs one.
    return r1_env(tmp_path, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def build(row, tmp_path: Path) -> list[str]:
    """The command line for a row, with its files written under tmp_path."""
    _, kind, content, command, _, _ = row
    if kind == "args":
        return list(content)
    if kind == "gguf":
        target = _write(tmp_path / "model.gguf", content)
    else:
        target = model_folder(tmp_path)
        if command == "run":  # the real R1 tokenizer: a run gets as far as the model's files let it
            for f in R1_TOKENIZER.iterdir():
                shutil.copy(f, target / f.name)
        if kind == "config":
            _replace_config(target, content if callable(content) else lambda p: _write(p, content))
        elif kind == "st":
            (target / "model.safetensors").unlink()
            if content is None:
                os.mkfifo(target / "model.safetensors")
            else:
                _write(target / "model.safetensors", content)
        elif kind == "index":
            _write(target / "model.safetensors.index.json", content)
    return [command, str(target)] + (["hi", "--max-tokens", "1"] if command == "run" else [])


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_malformed_input_is_one_line_error(row, tmp_path):
    args = build(row, tmp_path)
    p = run_r1(*args, env=_env(tmp_path), timeout=TIMEOUT_S, preexec_fn=_limit_memory)
    line = one_line_error(p, row[4])
    for word in row[5]:
        assert word in line, line
    assert "delete" not in line or row[1] == "st", line  # an index never makes r1 advise deleting a file elsewhere


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_the_builders_valid_files_are_accepted(kind, tmp_path):
    """The control: the table's files differ from these only by the row's damage."""
    target = model_folder(tmp_path) if kind == "folder" else _write(tmp_path / "model.gguf", gguf_bytes())
    p = run_r1("show", target, "--json", env=_env(tmp_path), timeout=TIMEOUT_S, preexec_fn=_limit_memory)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["architecture"] == ("Qwen2ForCausalLM" if kind == "folder" else "LlamaForCausalLM")


# --- files.py: what is read, and how much -----------------------------------------------------------------------


def test_json_reads_are_bounded_and_typed(tmp_path):
    from r1cli import files
    from r1cli.errors import CheckpointError

    path = _write(tmp_path / "x.json", {"a": 1})
    assert files.read_json(path) == {"a": 1} and files.read_json(tmp_path / "absent.json") is None
    with pytest.raises(CheckpointError, match="more than the 4 bytes"):
        files.read_json(path, max_bytes=4)
    with pytest.raises(CheckpointError, match="JSON array where r1 expects a JSON object"):
        files.read_json(_write(tmp_path / "l.json", [1]))
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(CheckpointError, match="FIFO"):  # refused at once: opening it never waits for a writer
        files.read_json(tmp_path / "fifo.json")


NO_MERGES = (ARR, struct.pack("<IQ", STR, 0))


@pytest.mark.parametrize("tokenizer", [
    {"tokenizer.ggml.tokens": 7, "tokenizer.ggml.merges": NO_MERGES},
    {"tokenizer.ggml.tokens": (ARR, struct.pack("<IQI", U32, 1, 5)), "tokenizer.ggml.merges": NO_MERGES},
    {"tokenizer.ggml.tokens": "abc", "tokenizer.ggml.merges": "a b"},
], ids=["tokens-a-number", "tokens-numbers", "strings-not-arrays"])
def test_malformed_gguf_tokenizer_metadata_is_a_checkpoint_error(tokenizer, tmp_path):
    from r1cli import gguf
    from r1cli.errors import CheckpointError

    meta = {**LLAMA_META, "tokenizer.ggml.model": "gpt2", **tokenizer}
    f = gguf.GGUFFile(_write(tmp_path / "m.gguf", gguf_bytes(meta)))
    with pytest.raises(CheckpointError, match="malformed tokenizer metadata"):
        gguf.tokenizer(f)


# --- r1 rm: the cache may hold links that lead out of it ------------------------------------------------------------

SHA_A, SHA_B, SHA_C = "abcd1" + "0" * 35, "abcd2" + "0" * 35, "ef012" + "0" * 35


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache for in-process hub calls, and a folder outside it holding a victim file and folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    outside = tmp_path / "outside"
    (outside / SHA_A).mkdir(parents=True)
    (outside / "victim.txt").write_text("keep me")
    (outside / SHA_A / "int8.safetensors").write_text("keep me too")
    return tmp_path / "hub", outside


def cached_repo(hub: Path, revisions: list[str], refs: dict[str, str] | None = None) -> Path:
    """models--test--evil with one snapshot per revision: config.json and model.safetensors linking to their blobs,
    as huggingface_hub lays them out."""
    repo = hub / "models--test--evil"
    (repo / "blobs").mkdir(parents=True)
    for rev in revisions:
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for name, content in (("config.json", json.dumps(QWEN2).encode()), ("model.safetensors", b"")):
            blob = repo / "blobs" / f"{name}-{rev}"
            blob.write_bytes(content)
            (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    for ref, rev in (refs or {}).items():
        (repo / "refs" / ref).write_text(rev)
    return repo


@pytest.mark.parametrize("whole", [True, False], ids=["every-revision", "one-revision"])
def test_rm_deletes_links_never_their_targets_outside_the_cache(hub_cache, whole):
    from r1cli import hub as r1hub
    from r1cli.registry import resolve_name

    hub, outside = hub_cache
    repo = cached_repo(hub, [SHA_A, SHA_B], {"main": SHA_B})
    (repo / "snapshots" / SHA_A / "evil.safetensors").symlink_to(outside / "victim.txt")
    (repo / "r1-quant").symlink_to(outside)  # r1-quant/<SHA_A> is then the folder outside
    done = r1hub.remove(resolve_name("test/evil" if whole else f"test/evil@{SHA_A[:6]}"), yes=True)
    assert (outside / "victim.txt").read_text() == "keep me"
    assert (outside / SHA_A / "int8.safetensors").read_text() == "keep me too"
    assert not (repo / "snapshots" / SHA_A).exists()
    if whole:
        assert not repo.exists() and not os.path.lexists(repo)
    else:
        assert (repo / "snapshots" / SHA_B / "config.json").is_file()  # the other revision is untouched
        assert str(outside / "victim.txt") in done["skipped"] or str(repo / "r1-quant" / SHA_A) in done["skipped"]


def test_rm_of_a_linked_snapshot_unlinks_it(hub_cache):
    from r1cli import hub as r1hub
    from r1cli.registry import resolve_name

    hub, outside = hub_cache
    repo = cached_repo(hub, [SHA_B], {"main": SHA_B})
    (outside / "snap").mkdir()
    (outside / "snap" / "config.json").write_text(json.dumps(QWEN2))
    (repo / "snapshots" / SHA_C).symlink_to(outside / "snap")  # a whole snapshot folder that is a link
    r1hub.remove(resolve_name(f"test/evil@{SHA_C[:5]}"), yes=True)
    assert not os.path.lexists(repo / "snapshots" / SHA_C)
    assert (outside / "snap" / "config.json").is_file()


def test_one_revision_rule_for_run_show_and_rm(hub_cache):
    """A ref recorded in the cache, a whole commit, or a unique prefix of 4+ hex digits; nothing shorter."""
    from r1cli import hub as r1hub
    from r1cli.errors import ModelNotFoundError, UsageError
    from r1cli.registry import resolve_name

    hub, _ = hub_cache
    repo = cached_repo(hub, [SHA_A, SHA_B, SHA_C], {"main": SHA_C})
    for short in ("a", "abc"):  # too short: no match, nothing removed
        with pytest.raises(ModelNotFoundError):
            r1hub.local_path(resolve_name(f"test/evil@{short}"))
        with pytest.raises(ModelNotFoundError, match=f"no cached revision '{short}'"):
            r1hub.remove(resolve_name(f"test/evil@{short}"), yes=True)
    with pytest.raises(UsageError, match="matches 2 cached commits"):
        r1hub.local_path(resolve_name("test/evil@abcd"))
    with pytest.raises(UsageError, match="matches 2 cached commits"):
        r1hub.remove(resolve_name("test/evil@abcd"), yes=True)
    assert all((repo / "snapshots" / s).is_dir() for s in (SHA_A, SHA_B, SHA_C))
    assert r1hub.local_path(resolve_name("test/evil@abcd2")).name == SHA_B
    assert r1hub.remove(resolve_name("test/evil@abcd2"), yes=True)["revisions"] == [SHA_B]
    assert r1hub.remove(resolve_name("test/evil@main"), yes=True)["revisions"] == [SHA_C]
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [SHA_A]


# --- the quantized disk cache -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    from tiny import qwen2_config, write_checkpoint

    folder = tmp_path_factory.mktemp("qwen2")
    write_checkpoint(qwen2_config(num_hidden_layers=1, hidden_size=128, intermediate_size=256), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_quant_cache_is_safetensors_with_checksums_and_rebuilt_when_zeroed(tiny_qwen2, tmp_path):
    from safetensors import safe_open

    from r1cli import quant as q
    from r1cli.loader import load_model

    folder = _copy(tiny_qwen2, tmp_path / "m")
    tokens = torch.arange(10).view(1, 10)
    first = load_model(folder, dtype="float32", quant="int8")
    with torch.no_grad():
        expected = first(tokens)
    path = q.cache_path(folder, "int8", 32)
    meta = json.loads(path.with_suffix(".json").read_text())
    with safe_open(path, framework="pt") as f:  # safetensors' own reader takes the file
        assert sorted(f.keys()) == sorted(meta["crc32"])
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    with open(path, "r+b") as f:  # zero every tensor's bytes, the header intact
        f.seek(8 + n)
        f.write(b"\0" * (path.stat().st_size - 8 - n))
    again = load_model(folder, dtype="float32", quant="int8")
    assert "cache" in again.quant_notice and "corrupt" in again.quant_notice and "checksum" in again.quant_notice
    with torch.no_grad():
        assert torch.equal(again(tokens), expected)
    assert any(path.read_bytes()[8 + n:])  # rewritten
    third = load_model(folder, dtype="float32", quant="int8")
    assert not third.quant_notice  # read from the rebuilt cache, its checksums good


@pytest.mark.slow
def test_quant_on_an_unwritable_folder_runs_with_one_notice(steered_dir, tmp_path):
    """Where the cache cannot be written (here a file stands where its folder goes; a read-only folder as any user
    but root), the run goes on without it and says so once."""
    import steered

    folder = _copy(steered_dir, tmp_path / "m")
    (folder / ".r1-quant").write_text("")
    p = run_r1("run", folder, "hi", "--quant", "int8", "--verbose", "--temperature", "0",
               env=r1_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=TIMEOUT_S)
    assert "unexpected error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("cannot write the quantized weights' cache") == 1, p.stderr
    assert p.returncode == 0 and steered.ANSWER in p.stdout, p.stderr


def test_a_planted_link_in_the_quant_cache_is_not_followed(tiny_qwen2, tmp_path):
    from r1cli import quant as q
    from r1cli.loader import load_model

    folder = _copy(tiny_qwen2, tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / ".r1-quant").symlink_to(elsewhere)
    model = load_model(folder, dtype="float32", quant="int8")
    assert "cannot write" in model.quant_notice and not any(elsewhere.iterdir())
    assert q.read_cache(q.cache_path(folder, "int8", 32), {}) is None


def test_list_shows_a_revision_with_a_broken_index_as_incomplete(hub_cache):
    from r1cli import hub as r1hub

    hub, _ = hub_cache
    repo = cached_repo(hub, [SHA_A], {"main": SHA_A})
    _write(repo / "snapshots" / SHA_A / "model.safetensors.index.json", {"weight_map": {"x": "/etc/passwd"}})
    [row] = r1hub.list_models()
    assert row["revision"] == SHA_A[:7] and row["complete"] is False
