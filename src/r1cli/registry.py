"""Model names: ollama-style aliases -> Hugging Face repos, plus `org/name[@revision]`, GGUF files in a repo
(`org/name:Q4_K_M`) and local folders or `.gguf` files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "deepseek-r1:1.5b"


@dataclass(frozen=True)
class Alias:
    name: str
    repo: str
    description: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("deepseek-r1:1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen2.5-Math-1.5B distilled from R1"),
        Alias("deepseek-r1:7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen2.5-Math-7B distilled from R1"),
        Alias("deepseek-r1:8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "Llama-3.1-8B distilled from R1"),
        Alias("deepseek-r1:14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "Qwen2.5-14B distilled from R1"),
        Alias("deepseek-r1:32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen2.5-32B distilled from R1"),
        Alias("deepseek-r1:70b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "Llama-3.3-70B-Instruct distilled from R1"),
        Alias("deepseek-r1:671b", "deepseek-ai/DeepSeek-R1", "the full 671B MoE model, FP8"),
        Alias("deepseek-r1-zero", "deepseek-ai/DeepSeek-R1-Zero", "R1-Zero, RL without SFT, 671B MoE, FP8"),
        Alias("deepseek-v3", "deepseek-ai/DeepSeek-V3", "DeepSeek-V3 base chat model, 671B MoE, FP8"),
        Alias("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite, 16B MoE"),
    ]
}
# ollama also answers to the bare family name.
ALIASES["deepseek-r1"] = ALIASES[DEFAULT_MODEL]


@dataclass(frozen=True)
class ModelRef:
    """What a user-typed model name points at: a local folder, or a Hub repo at a revision."""

    name: str  # as typed
    repo: str | None = None  # Hub repo id, when not a local folder
    revision: str | None = None
    path: Path | None = None  # local folder or .gguf file
    alias: Alias | None = None
    gguf: str | None = None  # the quant type naming one GGUF file of the repo (`org/name:Q4_K_M`)

    @property
    def identity(self) -> str:
        """`deepseek-r1:7b -> deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B distilled from R1)`."""
        if self.path is not None:
            return str(self.path)
        rev = f"@{self.revision}" if self.revision else ""
        if self.alias is not None:
            return f"{self.name} -> {self.repo}{rev} ({self.alias.description})"
        return f"{self.repo}{':' + self.gguf if self.gguf else ''}{rev}"


def resolve_name(name: str | None) -> ModelRef:
    """Parse a model name without touching the network or the cache."""
    from .errors import UsageError

    name = (name or DEFAULT_MODEL).strip()
    if not name:
        raise UsageError("empty model name: give an alias such as deepseek-r1:7b, a repo id org/name, or a folder")
    p = Path(name).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix.lower() == ".gguf"):
        return ModelRef(name=name, path=p.resolve())
    if name.startswith((".", "/", "~")):  # a path, never a Hub name (`./x` would otherwise parse as the repo "./x")
        if p.exists():
            raise UsageError(f"{name} is a file, not a model: give a model folder or a .gguf file")
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(f"no such file or folder: {name}")
    if name in ALIASES:
        a = ALIASES[name]
        return ModelRef(name=name, repo=a.repo, alias=a)
    repo, _, revision = name.partition("@")
    if revision and repo in ALIASES:  # deepseek-r1:7b@<branch, tag or commit>
        a = ALIASES[repo]
        return ModelRef(name=name, repo=a.repo, revision=revision, alias=a)
    repo = repo.removeprefix("hf.co/")  # as ollama spells Hub GGUF repos
    repo, colon, tag = repo.partition(":")
    if colon and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise UsageError(f"bad GGUF quant type '{tag}' in {name}: use org/name:TYPE, e.g. org/name:Q4_K_M")
    if repo.count("/") == 1 and all(repo.split("/")):
        return ModelRef(name=name, repo=repo, revision=revision or None, alias=alias_for_repo(repo), gguf=tag or None)
    if p.suffix.lower() == ".gguf":
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(f"no such file or folder: {name}")
    if p.suffix:
        raise UsageError(f"no such folder or .gguf file: {name}")
    known = ", ".join(sorted(k for k in ALIASES if k != "deepseek-r1"))
    raise UsageError(f"unknown model '{name}': use one of {known}, a Hub repo id org/name[@revision], or a folder")


def alias_for_repo(repo: str) -> Alias | None:
    for key, a in ALIASES.items():
        if key != "deepseek-r1" and a.repo.lower() == repo.lower():
            return a
    return None
