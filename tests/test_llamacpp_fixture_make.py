"""The committed llama.cpp fixture (tests/fixtures/llamacpp/) is still what llama.cpp writes and computes: its
make.py run again into a scratch folder gives the same tensors and tokens, and llama.cpp's logits on the committed
files are the recorded ones.

Needs llama-cpp-python (a source build of llama.cpp): skipped without it. A failure after upgrading llama.cpp means
its quantizer or forward changed: rerun make.py (see the fixture's README) and look at what moved.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from paths import FIXTURES
from safetensors.torch import load_file

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

FOLDER = FIXTURES / "llamacpp"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text(encoding="utf-8"))
COMMITTED = [name for name, entry in MANIFEST["files"].items() if entry["committed"]]
# llama.cpp on the machine that made the fixture reproduces its logits bit for bit; another CPU takes other SIMD
# paths (summation order), and its 8-bit rounding of activations can then land one step apart here and there.
KL_LIMIT = 1e-4


def _make():
    spec = importlib.util.spec_from_file_location("llamacpp_fixture_make", FOLDER / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def remade(tmp_path_factory):
    """make.py run again, into a scratch folder."""
    out = tmp_path_factory.mktemp("llamacpp-remade")
    make = _make()
    manifest = make.make(out / "fixture", out)
    return make, out / "fixture", manifest


def test_llama_cpp_gives_the_recorded_logits_on_the_committed_files():
    make = _make()
    recorded = load_file(str(FOLDER / "llamacpp.safetensors"))
    for key in COMMITTED:
        tokens = recorded[f"{key.split('-', 1)[0]}.tokens"].tolist()
        again = torch.from_numpy(make.llama_cpp_logits(FOLDER / f"{key}.gguf", tokens))
        assert kl(recorded[f"{key}.logits"], again) < KL_LIMIT, key


def test_make_py_remakes_the_committed_fixture(remade):
    make, folder, manifest = remade
    if manifest["llama_cpp_python"] != MANIFEST["llama_cpp_python"]:
        print(f"fixture made with llama-cpp-python {MANIFEST['llama_cpp_python']}, "
              f"remade with {manifest['llama_cpp_python']}")
    assert manifest["text"] == MANIFEST["text"]
    assert set(manifest["files"]) == set(MANIFEST["files"])
    for key, entry in manifest["files"].items():
        if not entry["committed"]:  # the F16 files llama.cpp quantized from: the same tensors
            assert entry["tensors_sha256"] == MANIFEST["files"][key]["tensors_sha256"], key
            continue
        # The same recipe (type per tensor) and the same blocks, whatever else the header holds.
        assert entry["types"] == MANIFEST["files"][key]["types"], key
        assert entry["ftype"] == MANIFEST["files"][key]["ftype"], key
        assert make.tensors_sha256(folder / f"{key}.gguf") == make.tensors_sha256(FOLDER / f"{key}.gguf"), key
    committed, fresh = load_file(str(FOLDER / "llamacpp.safetensors")), load_file(str(folder / "llamacpp.safetensors"))
    assert set(committed) == set(fresh)
    for name, values in committed.items():
        if name.endswith("tokens"):
            assert torch.equal(values, fresh[name]), name
        else:
            assert kl(values, fresh[name]) < KL_LIMIT, name
