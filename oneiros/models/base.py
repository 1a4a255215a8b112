"""What every model implementation provides: weight shapes per layer, and a forward pass that reads
each layer's weights from views bound by the memory layer (so the weights can move between pages)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from oneiros.attention import torch_ref
from oneiros.attention.torch_ref import AttentionMetadata
from oneiros.models.config import ModelConfig

Weights = dict[str, torch.Tensor]


class DecoderModel(ABC):
    """A decoder-only transformer whose parameters live outside it.

    `bind_resident` / `bind_layer` hand it views into the arena; `forward` runs the decoder stack on a
    flat batch of tokens of several sequences (no padding) and returns the final hidden states.
    """

    layer_prefix: str  # Hugging Face name prefix of layer i, with "{i}"
    resident_names: dict[str, str]  # our resident tensor name -> Hugging Face name

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.resident: Weights = {}
        self.layers: list[Weights | None] = [None] * cfg.num_layers
        self.attention = torch_ref  # the attention backend (oneiros.attention.load)

    @abstractmethod
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one decoder layer's tensors, keyed by their Hugging Face name inside the layer."""

    @abstractmethod
    def resident_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the always-resident tensors (embeddings, final norm, untied lm_head)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[T] ids, [T] positions -> [T, hidden]."""

    @abstractmethod
    def layer_forward(
        self,
        i: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """One decoder layer: [T, hidden] -> [T, hidden], writing this step's K/V into kv."""

    @abstractmethod
    def final_norm(self, h: torch.Tensor) -> torch.Tensor: ...

    def bind_resident(self, views: Weights) -> None:
        self.resident = views

    def bind_layer(self, i: int, views: Weights | None) -> None:
        self.layers[i] = views

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits."""
        w = self.resident.get("lm_head", self.resident["embed"])
        return torch.nn.functional.linear(h, w).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_layers: Callable[[int], torch.Tensor],
        meta: AttentionMetadata,
        before_layer: Callable[[int], None] | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run the stack. The transfer engine's hooks make layer i's weights ready just before it
        (`before_layer`) and start copies into memory that layer i no longer needs (`after_layer`)."""
        h = self.embed(input_ids, positions)
        for i in range(self.cfg.num_layers):
            if before_layer is not None:
                before_layer(i)
            h = self.layer_forward(i, h, positions, kv_layers(i), meta)
            if after_layer is not None:
                after_layer(i)
        return self.final_norm(h)
