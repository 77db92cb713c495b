"""Rotary position embeddings (default, linear and llama3 scaling), looked up by absolute position."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE settings of `config` (transformers 5 `rope_parameters`, or the older
    `rope_theta` + `rope_scaling` fields), for one layer type where they differ per type."""
    params = getattr(config, "rope_parameters", None)
    if params and layer_type in params:
        params = params[layer_type]
    if not params or "rope_theta" not in params:
        legacy = dict(getattr(config, "rope_scaling", None) or {})
        legacy.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        params = {**legacy, **(params or {})}
    return dict(params)


def inverse_frequencies(params: dict[str, Any], rotary_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies, after the checkpoint's scaling rule."""
    base = float(params["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu") / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, params)
    elif kind != "default":
        raise NotImplementedError(f"rope_type {kind!r} is not supported yet")
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE with a cos/sin table indexed by position.

    The table is a plain attribute built on first use on the positions' device, so that building the
    model on the meta device and casting its weights leave it untouched; layers that share RoPE
    settings share one instance (and one table).
    """

    def __init__(self, rotary_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.inv_freq = inverse_frequencies(params, rotary_dim)
        self.max_positions = max_positions
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[max_positions, dim] tables [cos | cos] and [-sin | sin] in `dtype`, built once per device and dtype."""
        key = (device, dtype)
        if key not in self._cache:
            positions = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
            freqs = torch.outer(positions, self.inv_freq)
            # [cos | cos] and [-sin | sin], so rotating is x * cos + swap_halves(x) * sin.
            cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
            sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
            self._cache[key] = (cos.to(device, dtype), sin.to(device, dtype))
        return self._cache[key]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate q [tokens, heads, dim] and k [tokens, kv_heads, dim] by their positions.

        Computed in the activations' dtype with tables cast to it, as transformers does."""
        cos, sin = self.tables(positions.device, q.dtype)
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)
