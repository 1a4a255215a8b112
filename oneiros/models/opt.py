"""OPT (pre-layer-norm variants: 125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oneiros.attention.torch_ref import AttentionMetadata
from oneiros.models.base import DecoderModel

_POS_OFFSET = 2  # OPT's learned positions are stored shifted by two


class OPTModel(DecoderModel):
    layer_prefix = "model.decoder.layers.{i}."
    resident_names = {
        "embed": "model.decoder.embed_tokens.weight",
        "pos": "model.decoder.embed_positions.weight",
        "norm.weight": "model.decoder.final_layer_norm.weight",
        "norm.bias": "model.decoder.final_layer_norm.bias",
    }

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        h, f = c.hidden_size, c.intermediate_size
        s: dict[str, tuple[int, ...]] = {
            "self_attn_layer_norm.weight": (h,),
            "self_attn_layer_norm.bias": (h,),
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (h, h),
            "self_attn.v_proj.weight": (h, h),
            "self_attn.out_proj.weight": (h, h),
            "final_layer_norm.weight": (h,),
            "final_layer_norm.bias": (h,),
            "fc1.weight": (f, h),
            "fc2.weight": (h, f),
        }
        if c.qkv_bias:
            s |= {
                "self_attn.q_proj.bias": (h,),
                "self_attn.k_proj.bias": (h,),
                "self_attn.v_proj.bias": (h,),
                "self_attn.out_proj.bias": (h,),
                "fc1.bias": (f,),
                "fc2.bias": (h,),
            }
        return s

    def resident_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        return {
            "embed": (c.vocab_size, c.hidden_size),
            "pos": (c.max_position_embeddings + _POS_OFFSET, c.hidden_size),
            "norm.weight": (c.hidden_size,),
            "norm.bias": (c.hidden_size,),
        }

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        r = self.resident
        return F.embedding(input_ids, r["embed"]) + F.embedding(positions + _POS_OFFSET, r["pos"])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        r = self.resident
        return F.layer_norm(h, (h.shape[-1],), r["norm.weight"], r["norm.bias"], self.cfg.norm_eps)

    def layer_forward(
        self, i: int, h: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        c, w = self.cfg, self.layers[i]
        assert w is not None, f"layer {i} is not resident"
        T, H = h.shape
        x = F.layer_norm(h, (H,), w["self_attn_layer_norm.weight"], w["self_attn_layer_norm.bias"], c.norm_eps)
        q = F.linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = F.linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = F.linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = q.view(T, c.num_heads, c.head_dim)
        k = k.view(T, c.num_kv_heads, c.head_dim)
        v = v.view(T, c.num_kv_heads, c.head_dim)
        self.attention.write_kv(kv, k, v, meta)
        o = self.attention.attend(q, k, v, kv, meta).reshape(T, H)
        h = h + F.linear(o, w["self_attn.out_proj.weight"], w.get("self_attn.out_proj.bias"))
        x = F.layer_norm(h, (H,), w["final_layer_norm.weight"], w["final_layer_norm.bias"], c.norm_eps)
        x = F.relu(F.linear(x, w["fc1.weight"], w.get("fc1.bias")))
        return h + F.linear(x, w["fc2.weight"], w.get("fc2.bias"))
