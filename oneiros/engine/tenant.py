"""One served model ("tenant") and everything that belongs to it, torch-free: its parameter and KV
accounting, its scheduler and its metadata-store entry, plus what commit needs (tokenizer, stop ids,
context window). The model and its tensors live with the executor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oneiros.engine.scheduler import Scheduler
    from oneiros.engine.tenancy import TenantState
    from oneiros.memory.kv import KVPool
    from oneiros.memory.residency import LayerResidency


@dataclass
class Tenant:
    name: str
    residency: LayerResidency
    pool: KVPool
    scheduler: Scheduler
    state: TenantState
    max_model_len: int
    vocab_size: int
    tokenizer: Any = None  # engine.tokenizer.Tokenizer, or None (token ids only)
    eos_token_ids: frozenset[int] = frozenset()
    source: Any = None  # models.loader.ModelSource
    model: Any = None  # models.base.DecoderModel (the executor's; on the meta device in the sim)
    cold: bool = False  # its host copy is in the cold tier (a memory-mapped file), not pinned

    @property
    def num_layers(self) -> int:
        return self.residency.num_layers
