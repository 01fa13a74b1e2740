"""r1 pull / list / show / rm against a fake Hub on 127.0.0.1 (tests/hf_server.py). Never touches huggingface.co.

CLI tests run `python -m r1cli` in a subprocess: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once,
at import. In-process tests patch huggingface_hub.constants instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_server import GOOD_TOKEN, INVALID_TOKEN, TINY_QWEN2_CONFIG, FakeHub, Repo, tiny_qwen2_repo, tiny_qwen2_tensors

from r1cli import hub as r1hub
from r1cli.errors import ModelNotFoundError, R1Error, UsageError
from r1cli.models.layers import kv_cache_dtype
from r1cli.registry import resolve_name

SRC = Path(__file__).resolve().parents[1] / "src"
from paths import HUB_CONFIGS, R1_TOKENIZER  # noqa: E402
from helpers import r1_env, run_r1  # noqa: E402
ALIAS, ALIAS_REPO = "deepseek-r1:1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
TINY = tiny_qwen2_repo()
RUN_FILES = {n for n in TINY if r1hub.is_run_file(n)}
SKIPPED_FILES = set(TINY) - RUN_FILES
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub().start()
    # Same files, hence the same commit hash in both: `r1 rm` of one must leave the other alone.
    hub.add(ALIAS_REPO, Repo(dict(TINY)))
    hub.add("test/tiny", Repo(dict(TINY)))
    hub.add("test/gated", Repo(dict(TINY), gated=True))
    shard_names = [n for n in TINY if n.endswith(".safetensors") and "/" not in n]
    hub.add("test/big", Repo(dict(TINY), claimed_sizes={n: 1_500_000_000 for n in shard_names}))
    hub.add("test/huge", Repo(dict(TINY), claimed_sizes={shard_names[0]: 10**16}))
    # Larger than huggingface_hub's 10 MiB download chunk, so a transfer cut half-way has bytes on disk to resume from.
    hub.add("test/bigfile", Repo({"config.json": TINY["config.json"], "model.safetensors": os.urandom(24 * 2**20)}))
    hub.add("test/no-weights", Repo({"config.json": TINY["config.json"], "pytorch_model.bin": b"\0" * 100}))
    gpt2 = {**TINY, "config.json": json.dumps({"architectures": ["GPT2LMHeadModel"]}).encode()}
    hub.add("test/unsupported", Repo(gpt2))
    yield hub
    hub.release.set()
    hub.stop()


@pytest.fixture
def fake(fake_hub):
    fake_hub.requests.clear()
    fake_hub.drop_once.clear()
    fake_hub.stall.clear()
    fake_hub.release.clear()
    yield fake_hub
    fake_hub.release.set()  # never leave a stalled handler behind


@pytest.fixture
def env(fake, tmp_path):
    """Environment for a CLI subprocess: the fake Hub, an empty HF_HOME, none of the caller's HF settings."""
    return r1_env(tmp_path, HF_ENDPOINT=fake.url)


def r1(env, *args, **kw) -> subprocess.CompletedProcess:
    return run_r1(*args, env=env, **kw)


def cache(env) -> Path:
    return Path(env["HF_HOME"]) / "hub"


def snapshot(env, repo: str) -> Path:
    [folder] = (cache(env) / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return folder


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("r1: ")]
    assert len(errors) == 1 and p.stderr.rstrip().endswith(errors[0]), p.stderr
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


# -- pull ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pull_downloads_only_the_files_that_run_the_model(fake, env):
    p = r1(env, "pull", ALIAS)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines()[0] == f"{ALIAS} -> {ALIAS_REPO} (Qwen2.5-Math-1.5B distilled from R1)"
    assert "7 files, 220.0 KB; free disk:" in p.stderr
    folder = Path(p.stdout.strip())
    assert folder == snapshot(env, ALIAS_REPO) and folder.name == fake.repos[ALIAS_REPO].sha
    assert {f.name for f in folder.iterdir()} == RUN_FILES
    for name in RUN_FILES:
        assert (folder / name).read_bytes() == TINY[name], name
    fetched = {r["path"] for r in fake.requests if r["method"] == "GET"}
    assert not any(path.endswith(tuple(SKIPPED_FILES)) for path in fetched)
    # The metadata call that sized the download asked for file sizes.
    assert any(r["path"] == f"/api/models/{ALIAS_REPO}" and "blobs=" in r["query"] for r in fake.requests)


@pytest.mark.slow
def test_pull_again_downloads_nothing(fake, env):
    assert r1(env, "pull", "test/tiny").returncode == 0
    fake.requests.clear()
    p = r1(env, "pull", "test/tiny")
    assert p.returncode == 0 and "(0 B left to download)" in p.stderr
    assert not [r for r in fake.requests if "/resolve/" in r["path"] or r["server"] == "cdn"]


@pytest.mark.slow
def test_dropped_connection_resumes_with_a_range_request(fake, env):
    fake.drop_once.add("model.safetensors")
    p = r1(env, "pull", "test/bigfile")
    assert p.returncode == 0, p.stderr
    gets = [r for r in fake.requests if r["server"] == "cdn"]
    assert len(gets) == 2 and "Range" not in gets[0]["headers"]
    start = int(gets[1]["headers"]["Range"].removeprefix("bytes=").split("-")[0])
    assert 0 < start < len(fake.repos["test/bigfile"].files["model.safetensors"])
    served = fake.repos["test/bigfile"].files["model.safetensors"]
    assert (snapshot(env, "test/bigfile") / "model.safetensors").read_bytes() == served


@pytest.mark.slow
def test_interrupted_pull_keeps_finished_files_and_a_rerun_completes_it(fake, env):
    fake.stall.add(SHARD2)
    proc = subprocess.Popen([sys.executable, "-m", "r1cli", "pull", "test/tiny"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # every other file finished, SHARD2 half sent and stalled
            snaps = list((cache(env) / "models--test--tiny" / "snapshots").glob("*/*"))
            if len(snaps) == len(RUN_FILES) - 1 and any(_serves(fake, r, SHARD2) for r in fake.requests):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the download never reached the stalled shard")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        fake.release.set()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.rstrip().endswith("r1: interrupted: finished files are kept, `r1 pull test/tiny` continues")
    assert not list((cache(env) / "models--test--tiny" / "blobs").glob("*.incomplete"))

    # (`r1 show` answers from config.json alone now, issue #17; running is what needs every file)
    assert_one_line_error(r1(env, "run", "test/tiny", "hi"), 3, "partly downloaded", SHARD2, "`r1 pull test/tiny`")
    listed = json.loads(r1(env, "list", "--json").stdout)
    assert [(m["repo"], m["complete"]) for m in listed] == [("test/tiny", False)]
    assert "(partial)" in r1(env, "list").stdout

    fake.stall.clear()
    fake.requests.clear()
    p = r1(env, "pull", "test/tiny")
    assert p.returncode == 0, p.stderr
    assert "left to download" in p.stderr
    downloaded = [r for r in fake.requests
                  if r["method"] == "GET" and (r["server"] == "cdn" or "/resolve/" in r["path"])]
    assert len(downloaded) == 1 and _serves(fake, downloaded[0], SHARD2)  # only the unfinished file
    assert (snapshot(env, "test/tiny") / SHARD2).read_bytes() == TINY[SHARD2]


def _serves(fake: FakeHub, request: dict, filename: str) -> bool:
    return request["path"] == f"/cdn/{hashlib.sha256(TINY[filename]).hexdigest()}"


@pytest.mark.slow
def test_gated_repo_downloads_with_a_token_from_env_or_flag(fake, env):
    assert r1({**env, "HF_TOKEN": GOOD_TOKEN}, "pull", "test/gated").returncode == 0
    shutil.rmtree(cache(env))
    assert r1(env, "pull", "test/gated", "--token", GOOD_TOKEN).returncode == 0
    assert {f.name for f in snapshot(env, "test/gated").iterdir()} == RUN_FILES


@pytest.mark.slow
def test_above_the_threshold_yes_skips_the_question(fake, env):
    if shutil.disk_usage(Path(env["HF_HOME"]).parent).free < 4 * 10**9:
        pytest.skip("needs 4 GB free: the fake repo claims 3 GB")
    p = r1(env, "pull", "test/big", "--yes")
    assert p.returncode == 0, p.stderr
    assert "3.0 GB" in p.stderr


@pytest.mark.slow
def test_a_terminal_is_asked_before_a_big_pull_and_before_rm(fake, env):
    pexpect = pytest.importorskip("pexpect")

    def run(*args, answer):
        child = pexpect.spawn(sys.executable, ["-m", "r1cli", *args], env=env, encoding="utf-8", timeout=60)
        child.expect(r"\? \[y/N\]: ")
        question = child.before.splitlines()[-1] + child.after
        child.sendline(answer)
        child.expect(pexpect.EOF)
        child.close()
        return question, child.exitstatus, child.before

    question, code, out = run("pull", "test/big", answer="n")
    assert question == "Download 3.0 GB of test/big? [y/N]: "
    assert code == 1 and "r1: download cancelled" in out
    assert not [r for r in fake.requests if "/resolve/" in r["path"]]

    assert r1(env, "pull", "test/tiny").returncode == 0
    question, code, out = run("rm", "test/tiny", answer="y")
    assert question == "Remove test/tiny (1 revision(s), 220.0 KB)? [y/N]: " and code == 0
    assert not (cache(env) / "models--test--tiny").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, extra_env, code, needles",
    [
        (["pull", "test/missing"], {}, 3, ["no model test/missing on the Hub", "HF_TOKEN"]),
        (["pull", "test/tiny@nope"], {}, 3, ["test/tiny has no revision 'nope'"]),
        (["pull", "test/tiny", "--revision", "nope"], {}, 3, ["no revision 'nope'"]),
        (["pull", "test/gated"], {}, 1, ["test/gated is gated", "HF_TOKEN", "--token"]),
        (["pull", "test/gated", "--token", "hf_someone_else"], {}, 1, ["your token has no access", "test/gated"]),
        (["pull", "test/tiny"], {"HF_TOKEN": INVALID_TOKEN}, 1, ["rejected your token"]),
        (["pull", "test/tiny"], {"HF_HUB_OFFLINE": "1"}, 1, ["offline mode", "HF_HUB_OFFLINE"]),
        (["pull", "test/tiny"], {"HF_ENDPOINT": "CLOSED"}, 1, ["cannot reach the Hub at http://127.0.0.1:"]),
        (["pull", "test/huge"], {}, 1, ["not enough disk space for test/huge", "10000.0 TB"]),
        (["pull", "test/big"], {}, 2, ["3.0 GB", "--yes"]),
        (["pull", "test/no-weights"], {}, 1, ["safetensors"]),
        (["pull", "src"], {}, 2, ["local folder"]),
        # (show answers before a download: from the config.json alone, issue #17; only a repo it cannot find fails)
        (["show", "test/missing"], {}, 3, ["no model test/missing on the Hub"]),
        (["show", "test/tiny"], {"HF_HUB_OFFLINE": "1"}, 3, ["test/tiny"]),
        (["rm", "test/tiny", "--yes"], {}, 3, ["not in the cache"]),
    ],
)
def test_errors_are_one_line_with_their_exit_code(fake, env, args, extra_env, code, needles):
    if extra_env.get("HF_ENDPOINT") == "CLOSED":
        with socket.socket() as s:  # a port nobody listens on: connection refused
            s.bind(("127.0.0.1", 0))
            extra_env = {"HF_ENDPOINT": f"http://127.0.0.1:{s.getsockname()[1]}"}
    p = r1({**env, **extra_env}, *args, cwd=SRC.parent)
    assert_one_line_error(p, code, *needles)
    assert not list(cache(env).glob("models--*/blobs/*"))  # refused before downloading anything


@pytest.mark.slow
def test_offline_mode_serves_what_is_cached(fake, env):
    assert r1(env, "pull", "test/tiny").returncode == 0
    fake.requests.clear()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    assert r1(offline, "show", "test/tiny").returncode == 0
    p = r1(offline, "pull", "test/tiny")  # complete already: nothing to do
    assert p.returncode == 0 and Path(p.stdout.strip()) == snapshot(env, "test/tiny")
    assert fake.requests == []


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(fake, env, tmp_path):
    """The Hub's sizes say 1 KB, the file is 24 MB, the disk 8 MB: ENOSPC mid-download (needs root for tmpfs)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fake.add("test/liar", Repo({"config.json": TINY["config.json"], "model.safetensors": os.urandom(24 * 2**20)},
                                   claimed_sizes={"model.safetensors": 1000}))
        p = r1({**env, "HF_HOME": str(mount)}, "pull", "test/liar")
        assert_one_line_error(p, 1, f"disk full while downloading test/liar into {mount}", "`r1 pull test/liar`")
        assert "UserWarning" not in p.stderr
        assert not list(mount.glob("hub/models--test--liar/blobs/*.incomplete"))  # the partial file is gone
    finally:
        subprocess.run(["umount", str(mount)])


# -- list, show, rm ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_list_show_rm_on_pulled_repos(fake, env):
    for name in (ALIAS, "test/tiny", "test/unsupported"):
        assert r1(env, "pull", name).returncode == 0
    run_bytes = sum(len(TINY[n]) for n in RUN_FILES)

    listed = json.loads(r1(env, "list", "--json").stdout)
    assert [(m["alias"], m["repo"], m["architecture"], m["size"], m["complete"]) for m in listed] == [
        (ALIAS, ALIAS_REPO, "Qwen2ForCausalLM", run_bytes, True),
        (None, "test/tiny", "Qwen2ForCausalLM", run_bytes, True),
    ]  # GPT2 is cached but not listed: r1 cannot run it
    assert listed[0]["revision"] == fake.repos[ALIAS_REPO].sha[:7] and listed[0]["refs"] == ["main"]
    table = r1(env, "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "REPO", "REVISION", "SIZE", "ARCHITECTURE"]
    assert table[1].split() == [ALIAS, ALIAS_REPO, listed[0]["revision"], "220.0", "KB", "Qwen2ForCausalLM"]

    p = r1(env, "show", ALIAS, "--json", "--ctx", "100")
    assert p.returncode == 0 and p.stderr.splitlines()[0].startswith(f"{ALIAS} -> {ALIAS_REPO}")
    info = json.loads(p.stdout)
    kv_per_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 kv heads, head_dim 16, bf16
    assert info["architecture"] == "Qwen2ForCausalLM" and info["context_length"] == 2048
    assert info["dtype"] == "bfloat16" and info["chat_template"] is True
    assert info["memory"]["kv_cache_per_token"] == kv_per_token and info["memory"]["kv_cache"] == 100 * kv_per_token
    assert info["size_on_disk"] == run_bytes and info["revision"] == listed[0]["revision"]
    # An R1 alias: DeepSeek's settings (sampling.generation_defaults), with the repo's generation_config.json agreeing.
    assert info["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 32768, "repeat_guard": True,
                                "source": "DeepSeek's R1 recommendations and generation_config.json"}
    assert_parameter_counts(info)

    # A CPU without bf16 math keeps a bf16 model's cache in float32 (kv_cache_dtype, what the loader uses): said.
    cpu_f32 = not torch.cuda.is_available() and kv_cache_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert info["memory"].get("kv_cache_here") == (200 * kv_per_token if cpu_f32 else None)

    text = r1(env, "show", "test/tiny").stdout
    assert "context length  2048 tokens" in text and "chat template   yes" in text
    assert ("on this CPU (float32)" in text) == cpu_f32
    assert "(generation_config.json)" in text  # not an R1 repo name: the repo's own defaults
    local = r1(env, "show", str(snapshot(env, "test/tiny")), "--json")
    assert local.returncode == 0 and json.loads(local.stdout)["architecture"] == "Qwen2ForCausalLM"

    assert_one_line_error(r1(env, "show", "test/unsupported"), 1, "unsupported architecture GPT2LMHeadModel")

    assert_one_line_error(r1(env, "rm", "test/tiny"), 2, "--yes")  # no terminal, no --yes
    blobs = list((cache(env) / "models--test--tiny" / "blobs").iterdir())
    p = r1(env, "rm", "test/tiny", "--yes")
    assert p.returncode == 0 and "freed 220.0 KB" in p.stderr
    assert not any(b.exists() for b in blobs) and not (cache(env) / "models--test--tiny").exists()
    assert [m["repo"] for m in json.loads(r1(env, "list", "--json").stdout)] == [ALIAS_REPO]
    # Not downloaded any more: show answers from the Hub's config.json and file list (tests/test_first_minutes.py)
    after = json.loads(r1(env, "show", "test/tiny", "--json").stdout)
    assert after["downloaded"] is False and after["download_size"] == run_bytes
    assert after["parameters"] == info["parameters"] and after["memory"]["kv_cache"] == 4096 * kv_per_token
    assert after["memory"]["weights"] == info["memory"]["weights"]


def assert_parameter_counts(info: dict) -> None:
    expected = sum(t.numel() for t in tiny_qwen2_tensors().values())
    assert info["parameters"] == {"total": expected, "activated": expected}
    assert info["memory"]["weights"] == 2 * expected  # bf16


# -- in process: confirmation, disk full, revisions ---------------------------------------------------------------


@pytest.fixture
def in_process(fake, tmp_path, monkeypatch):
    """Point the already-imported huggingface_hub at the fake Hub and an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return fake


@pytest.mark.slow
def test_pull_asks_above_the_threshold_and_respects_no(in_process):
    ref, asked = resolve_name("test/tiny"), []

    def no(question):
        asked.append(question)
        return False

    with pytest.raises(R1Error, match="cancelled"):
        r1hub.pull(ref, confirm=no, confirm_above=1000)
    assert asked == ["Download 220.0 KB of test/tiny?"]
    assert not [r for r in in_process.requests if "/resolve/" in r["path"]]
    with pytest.raises(UsageError, match="--yes"):
        r1hub.pull(ref, confirm=None, confirm_above=1000)

    folder = r1hub.pull(ref, confirm=lambda q: True, confirm_above=1000)
    assert r1hub.local_path(ref) == folder
    assert r1hub.pull(ref, confirm=None, confirm_above=1000) == folder  # nothing left to download: no question


@pytest.mark.slow
def test_disk_full_during_download_is_one_clear_error(in_process, monkeypatch):
    import huggingface_hub.file_download as fd

    def full_disk(url, temp_file, **kwargs):
        temp_file.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fd, "http_get", full_disk)
    with pytest.raises(R1Error) as e:
        r1hub.pull(resolve_name("test/tiny"), yes=True)
    assert str(e.value).startswith("disk full while downloading test/tiny into ")
    assert "`r1 pull test/tiny`" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_revisions_and_short_commits(in_process):
    sha = in_process.repos["test/tiny"].sha
    r1hub.pull(resolve_name(f"test/tiny@{sha}"), yes=True)
    assert r1hub.local_path(resolve_name(f"test/tiny@{sha[:7]}")).name == sha
    assert r1hub.local_path(resolve_name(f"test/tiny@{sha}")).name == sha
    with pytest.raises(ModelNotFoundError, match="r1 pull test/tiny"):
        r1hub.local_path(resolve_name("test/tiny"))  # pulled by commit: no `main` ref was recorded
    with pytest.raises(ModelNotFoundError, match="no cached revision 'v9'"):
        r1hub.remove(resolve_name("test/tiny@v9"), yes=True)
    assert r1hub.remove(resolve_name(f"test/tiny@{sha[:7]}"), yes=True)["revisions"] == [sha]
    assert r1hub.list_models() == []


# -- show on the real configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype, kv_per_token, context, total, activated",
    [
        # MLA caches the latent and the shared rope key; counts from shared/fixtures/README.md (no MTP layer).
        ("DeepSeek-R1", "fp8", 61 * (512 + 64) * 2, 163840, 671_026_419_200, 37_552_282_624),
        ("DeepSeek-V2-Lite", "bfloat16", 27 * (512 + 64) * 2, 163840, 15_706_484_224, 2_661_150_208),
        ("DeepSeek-R1-Distill-Qwen-7B", "bfloat16", 2 * 28 * 4 * 128 * 2, 131072, 7_615_616_512, 7_615_616_512),
        ("DeepSeek-R1-Distill-Llama-8B", "bfloat16", 2 * 32 * 8 * 128 * 2, 131072, 8_030_261_248, 8_030_261_248),
    ],
)
def test_show_on_local_folders_with_hub_configs(tmp_path, name, dtype, kv_per_token, context, total, activated):
    config = HUB_CONFIGS / name / "config.json"
    if not config.is_file():
        pytest.skip(f"{config} not available")
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(config, folder / "config.json")
    # show reads no weights, only which layers the checkpoint has: an index naming one tensor per layer.
    n_layers = json.loads(config.read_text())["num_hidden_layers"]
    weight_map = {f"model.layers.{i}.input_layernorm.weight": "model.safetensors" for i in range(n_layers)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if "R1" in name:  # R1's tokenizer and template (the distills'), which make a folder an R1 model
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(R1_TOKENIZER / file, folder / file)
    info = r1hub.show(resolve_name(str(folder)), ctx=1000)
    assert info["dtype"] == dtype and info["context_length"] == context
    assert info["memory"]["kv_cache_per_token"] == kv_per_token
    assert info["memory"]["kv_cache"] == 1000 * kv_per_token
    assert info["parameters"] == {"total": total, "activated": activated}
    assert info["memory"]["weights"] == total * (1 if dtype == "fp8" else 2)
    assert info["chat_template"] is ("R1" in name) and info["revision"] is None
    r1_family = "R1" in name
    assert (info["sampling"].get("temperature") == 0.6) is r1_family


def test_missing_weights_follows_the_index(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_QWEN2_CONFIG))
    (folder / "model.safetensors.index.json").write_bytes(TINY["model.safetensors.index.json"])
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert r1hub.missing_weights(folder) == [SHARD2]
    assert r1hub.local_path(resolve_name(str(folder))) == folder  # a folder is used as is: the loader names what lacks
    (folder / "config.json").unlink()
    assert r1hub.missing_weights(folder) == ["config.json"]


def test_an_alias_takes_a_revision_too():
    ref = resolve_name(f"{ALIAS}@v2")
    assert (ref.repo, ref.revision, ref.alias.name) == (ALIAS_REPO, "v2", ALIAS)
    assert ref.identity == f"{ALIAS}@v2 -> {ALIAS_REPO}@v2 (Qwen2.5-Math-1.5B distilled from R1)"


def test_run_files_and_sizes():
    assert RUN_FILES == {
        "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "model-00001-of-00002.safetensors", SHARD2,
    }
    assert not any(r1hub.is_run_file(n) for n in ("pytorch_model.bin", "x.pth", "modeling.py", "sub/model.safetensors"))
    assert [r1hub.format_size(n) for n in (0, 999, 1000, 219994, 3 * 10**9, 10**16)] == [
        "0 B", "999 B", "1.0 KB", "220.0 KB", "3.0 GB", "10000.0 TB",
    ]
