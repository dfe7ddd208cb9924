"""The uncached reference mode: a model that leaves the KV cache unused and runs the whole
sequence from the first token on every pass. Slow, and only there to check the cached path
against (an Engine runs it unchanged: tests/test_engine.py)."""

from __future__ import annotations

import torch
from torch import nn

from ..kv_cache import Cache


class UncachedModel(nn.Module):
    """``model`` seen by the engine as any model, except that each pass reads the ids
    before ``start`` from the cache's committed tokens and runs them again with the new
    ones, without a cache. Text prompts only: a picture's layout passes more than ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.device = model.device
        self.new_cache = model.new_cache
        self.prompt_layout = model.prompt_layout
        self.step_order_rows = model.step_order_rows

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Cache,
        start: int = 0,
        all_logits: bool = False,
        **extra,
    ) -> torch.Tensor:
        if extra:
            raise ValueError("the uncached reference runs text prompts only")
        before = torch.tensor([cache.tokens[:start]], dtype=tokens.dtype, device=tokens.device)
        logits = self.model(torch.cat([before, tokens], dim=1), all_logits=all_logits)
        return logits[:, start:] if all_logits else logits
