"""Bidirectional attention over a packed batch of independent sequences (encoders: no KV cache).

The batch is `[tokens]` with sequences laid end to end; a token attends to every token of its own
sequence and to nothing else. The sequences are gathered into a padded `[seqs, heads, max_len, dim]`
block and run through one SDPA call with a key-padding mask; the engine's pooling runs sort inputs by
length, so the padding stays small (faster than one SDPA call per sequence for many short inputs, as fast
for a few long ones, and far faster than one call with a block-diagonal mask: docs/benchmarks.md,
"Kernel design notes").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenloom.models.layers.attention import VirtualKV


@dataclass(slots=True)
class EncoderMetadata:
    """Where each sequence of a packed batch starts and ends, and the padded view attention uses."""

    seq_lens: list[int]
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int64: sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    gather_index: torch.Tensor  # [num_seqs, max_len] int64: packed row of each padded slot (0 for padding)
    valid: torch.Tensor  # [num_seqs, max_len] bool: which padded slots hold a real token
    virtual_kv: VirtualKV | None = None  # prefix adapters' keys and values for their virtual tokens

    @classmethod
    def from_lens(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> EncoderMetadata:
        """Metadata for sequences of the given lengths, packed in that order."""
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"every sequence needs at least one token; got lengths {seq_lens}")
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        cu = F.pad(lens.cumsum(0), (1, 0))
        cols = torch.arange(max(seq_lens)).unsqueeze(0)
        valid = cols < lens.unsqueeze(1)
        index = torch.where(valid, cu[:-1].unsqueeze(1) + cols, 0)
        return cls(list(seq_lens), cu.to(device), index.to(device), valid.to(device))

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        """Number of packed tokens."""
        return sum(self.seq_lens)

    def first_rows(self) -> torch.Tensor:
        """[num_seqs] packed row of each sequence's first token ([CLS] / <s>)."""
        return self.cu_seqlens[:-1]

    def last_rows(self) -> torch.Tensor:
        """[num_seqs] packed row of each sequence's last token."""
        return self.cu_seqlens[1:] - 1

    def seq_ids(self) -> torch.Tensor:
        """[num_tokens] index of the sequence each packed token belongs to."""
        lens = torch.tensor(self.seq_lens, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=lens.device), lens)


def encoder_attention(qkv: torch.Tensor, meta: EncoderMetadata, num_heads: int, scale: float) -> torch.Tensor:
    """A fused q|k|v projection [tokens, 3 * hidden] → [tokens, hidden], each sequence attending only to itself."""
    tokens = qkv.shape[0]
    x = qkv.view(tokens, 3, num_heads, -1)
    if meta.num_seqs == 1:  # nothing to mask
        q, k, v = x.permute(1, 2, 0, 3).unbind(0)  # [heads, tokens, dim] each
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1).reshape(tokens, -1)
    # One gather into [seqs, max_len, 3, heads, dim]. Padded query rows see the real keys (only keys are
    # masked), so they hold finite junk that is dropped on the way back.
    q, k, v = x[meta.gather_index].permute(2, 0, 3, 1, 4).unbind(0)  # [seqs, heads, max_len, dim] each
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[meta.valid].reshape(tokens, -1)
