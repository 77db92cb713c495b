"""The encoder side of encoder–decoder models: run each request's encoder once, keep its cross-attention state.

A request's encoder runs in the first step that schedules it; the keys and values every decoder layer's
cross-attention needs are computed from its output right away and kept here, one tensor per request,
until the engine releases the request (finished, aborted or preempted: a preempted request is encoded
again when it is scheduled again). The decoder's own self-attention uses the paged KV cache.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tokenloom.engine.request import Request
from tokenloom.models.layers.seq2seq import CrossAttentionMetadata


class EncoderCache:
    """Per-request cross-attention keys and values, [layers, 2, heads, encoder_len, head_dim] each."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.states: dict[str, torch.Tensor] = {}
        self.num_encoded = 0  # requests encoded so far (a preempted one counts again)

    @property
    def num_bytes(self) -> int:
        """Memory held by the kept states."""
        return sum(s.numel() * s.element_size() for s in self.states.values())

    def prepare(self, requests: list[Request], num_rows: list[int]) -> CrossAttentionMetadata:
        """Encode the requests seen for the first time, then describe the step's cross-attention
        (`requests` and their row counts in the packed batch's order)."""
        new = [r for r in requests if r.request_id not in self.states]
        if new:
            self._encode(new)
        return CrossAttentionMetadata(num_rows, [self.states[r.request_id] for r in requests])

    def _encode(self, requests: list[Request]) -> None:
        """One packed encoder pass over the requests' inputs."""
        lens = [r.num_encoder_tokens for r in requests]
        ids = torch.tensor([t for r in requests for t in r.encoder_token_ids], dtype=torch.long, device=self.device)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).to(self.device)
        hidden = self.model.encode(ids, positions, lens)
        for request, state in zip(requests, self.model.cross_key_values(hidden, lens), strict=True):
            self.states[request.request_id] = state
        self.num_encoded += len(requests)

    def release(self, request_ids: list[str]) -> None:
        """Drop the states of requests that no longer run."""
        for request_id in request_ids:
            self.states.pop(request_id, None)
