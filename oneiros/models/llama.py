"""Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v biases), SmolLM2."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oneiros.attention.torch_ref import AttentionMetadata
from oneiros.models.base import DecoderModel
from oneiros.models.config import ModelConfig


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the scale, as the reference implementation does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1 frequency-dependent scaling.
    factor = s["factor"]
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaModel(DecoderModel):
    layer_prefix = "model.layers.{i}."
    resident_names = {
        "embed": "model.embed_tokens.weight",
        "norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(cfg, dtype, device)
        self.inv_freq = rope_inv_freq(cfg).to(device)
        if cfg.tie_word_embeddings:
            self.resident_names = {k: v for k, v in self.resident_names.items() if k != "lm_head"}

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        h, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        s: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }
        if c.qkv_bias:
            s |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        if c.o_bias:
            s["self_attn.o_proj.bias"] = (h,)
        if c.mlp_bias:
            s |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)}
        return s

    def resident_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        s = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            s["lm_head"] = (c.vocab_size, c.hidden_size)
        return s

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.resident["embed"])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.resident["norm"], self.cfg.norm_eps)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    def layer_forward(
        self, i: int, h: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        c, w = self.cfg, self.layers[i]
        assert w is not None, f"layer {i} is not resident"
        T = h.shape[0]
        x = rms_norm(h, w["input_layernorm.weight"], c.norm_eps)
        q = F.linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = F.linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = F.linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = q.view(T, c.num_heads, c.head_dim)  # [T, Hq, D]
        k = k.view(T, c.num_kv_heads, c.head_dim)  # [T, Hkv, D]
        v = v.view(T, c.num_kv_heads, c.head_dim)
        cos, sin = self._rope(positions)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.attention.write_kv(kv, k, v, meta)
        o = self.attention.attend(q, k, v, kv, meta).reshape(T, c.num_heads * c.head_dim)
        h = h + F.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        x = rms_norm(h, w["post_attention_layernorm.weight"], c.norm_eps)
        gate = F.linear(x, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))
        up = F.linear(x, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
        return h + F.linear(F.silu(gate) * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))
