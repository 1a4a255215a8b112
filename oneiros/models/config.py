"""Model geometry, normalised from a Hugging Face config.json (transformers 4 or 5 spelling)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneiros.core import ConfigError

LLAMA_TYPES = {"llama", "mistral", "qwen2"}
OPT_TYPES = {"opt"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (Llama/Mistral/Qwen2/SmolLM2) or "opt"
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type", "")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if mt in LLAMA_TYPES:
            heads = d["num_attention_heads"]
            rope = d.get("rope_parameters") or {}
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling") or (
                rope if rope.get("rope_type", "default") != "default" else None
            )
            if scaling is not None:
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind not in ("default", "llama3"):
                    raise ConfigError(f"rope scaling {kind!r} is not supported")
                if kind == "default":
                    scaling = None
            bias = bool(d.get("attention_bias", False))
            act = d.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise ConfigError(f"hidden_act {act!r} is not supported for {mt} (only silu)")
            max_pos = d.get("max_position_embeddings", 2048)
            window = d.get("sliding_window")
            if window and (mt != "qwen2" or d.get("use_sliding_window")) and window < max_pos:
                # No sliding-window attention here: serve only contexts the window fully covers,
                # where full attention is exact.
                max_pos = window
            return ModelConfig(
                arch="llama",
                model_type=mt,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                max_position_embeddings=max_pos,
                norm_eps=d.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=bias or mt == "qwen2",
                o_bias=bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                eos_token_ids=eos_ids,
                bos_token_id=d.get("bos_token_id"),
                raw=d,
            )
        if mt in OPT_TYPES:
            if not d.get("do_layer_norm_before", True):
                raise ConfigError("OPT with post-layer-norm (opt-350m) is not supported")
            if d.get("word_embed_proj_dim", d["hidden_size"]) != d["hidden_size"]:
                raise ConfigError("OPT with project_in/project_out (opt-350m) is not supported")
            heads = d["num_attention_heads"]
            bias = bool(d.get("enable_bias", True))
            act = d.get("activation_function", "relu")
            if act != "relu":
                raise ConfigError(f"OPT activation {act!r} is not supported (only relu)")
            return ModelConfig(
                arch="opt",
                model_type=mt,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["ffn_dim"],
                num_layers=d["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=d["hidden_size"] // heads,
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                norm_eps=1e-5,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                qkv_bias=bias,
                o_bias=bias,
                mlp_bias=bias,
                eos_token_ids=eos_ids,
                bos_token_id=d.get("bos_token_id"),
                raw=d,
            )
        raise ConfigError(
            f"model_type {mt!r} is not supported (supported: {sorted(LLAMA_TYPES | OPT_TYPES)})"
        )

    @staticmethod
    def from_file(path: str | Path) -> ModelConfig:
        return ModelConfig.from_dict(json.loads(Path(path).read_text()))

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + (3 if self.arch == "llama" else 2) * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb
