"""A small GPT-style causal language model over bytes: the model the main job trains."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

VOCAB = 256  # byte-level: every byte is a token, so any file is text to it


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each on a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, context: int, sparse_tokens: bool = False) -> None:
        super().__init__()
        # sparse_tokens: the token embedding's gradient holds only the rows of the batch's tokens (SparseAdam's).
        self.tokens = nn.Embedding(VOCAB, width, sparse=sparse_tokens)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        # Not tied to the token embedding: a parameter shared by two modules is one more thing to get right
        # in every user's job, and this model is also what users copy. (Tied, a sparse token embedding
        # would get the head's dense gradient too, which SparseAdam refuses.)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """The mean next-byte cross-entropy, computed in fp32 whatever the parameters' dtype."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.blocks(self.tokens(tokens) + self.positions(positions))
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))
