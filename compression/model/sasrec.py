"""SASRec-style causal Transformer for next-item prediction.

Inputs are internal item ids `[batch, length]`, left-padded with 0, oldest item first.
Positions count items from the start of the window (0 = oldest item the model reads), so
padding never changes a history's encoding, and a training position that has seen t items
looks exactly like an inference request with t items. (Counting back from the most recent
item instead, as the original SASRec code does, makes only the last training position
resemble inference: 6.4% lower test NDCG@10 on ML-1M, docs/training.md.)
Masks use `torch.where` instead of multiplying by a float mask so the graph converts to FP16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compression.configs import ModelConfig
from compression.model.successors import SuccessorTable


class FastDropout(nn.Module):
    """Dropout whose mask comes from random bytes: ~7x cheaper than `nn.Dropout` on CPU.

    The drop probability is rounded to a multiple of 1/256. Identity in eval mode, so it
    never appears in exported graphs.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = round(p * 256)
        self.scale = 256.0 / (256 - self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        n_words = -(-x.numel() // 8)
        noise = torch.randint(-(2**63), 2**63 - 1, (n_words,), dtype=torch.int64, device=x.device)
        keep = noise.view(torch.uint8)[: x.numel()].view(x.shape) >= self.threshold
        return torch.where(keep, x * self.scale, 0.0)


class CausalSelfAttention(nn.Module):
    # No dropout on attention weights: it doubled attention time on CPU; dropout stays on
    # embeddings, residual branches and FFN outputs.
    # q, k and v are `n_heads * head_dim` wide (`hidden` unless heads were pruned).
    def __init__(self, hidden: int, n_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim or hidden // n_heads
        inner = n_heads * self.head_dim
        self.qkv = nn.Linear(hidden, 3 * inner)
        self.proj = nn.Linear(inner, hidden)

    def forward(self, x: Tensor, attn_mask: Tensor, last_only: bool = False) -> Tensor:
        """Self-attention; with `last_only`, only the last position queries (inference)."""
        b, length = x.shape[:2]
        heads, dim = self.n_heads, self.head_dim
        h = heads * dim
        w, bias = self.qkv.weight, self.qkv.bias
        if last_only:
            q = F.linear(x[:, -1:], w[:h], bias[:h])
            k, v = F.linear(x, w[h:], bias[h:]).split(h, dim=-1)
            attn_mask = attn_mask[:, :, -1:]
        else:
            q, k, v = self.qkv(x).split(h, dim=-1)
        q = q.reshape(b, q.shape[1], heads, dim).transpose(1, 2)
        k, v = (t.reshape(b, length, heads, dim).transpose(1, 2) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, q.shape[2], h))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg.hidden, cfg.n_heads, cfg.head_dim)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.ffn_width),
            nn.GELU(),
            nn.Linear(cfg.ffn_width, cfg.hidden),
        )
        self.drop = FastDropout(cfg.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor, last_only: bool = False) -> Tensor:
        """With `last_only`, returns only the last position, `[batch, 1, hidden]`."""
        attended = self.attn(self.ln1(x), attn_mask, last_only)
        x = (x[:, -1:] if last_only else x) + self.drop(attended)
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        emb = cfg.emb_dim or cfg.hidden
        # The item matrix serves twice: input embeddings and the output scores (tied).
        self.item_emb = nn.Embedding(cfg.n_items + 1, emb, padding_idx=0)
        # Low-rank item matrix: project e -> hidden on the way in, hidden -> e on the way out.
        self.in_proj = nn.Linear(emb, cfg.hidden, bias=False) if emb != cfg.hidden else None
        self.out_proj = nn.Linear(cfg.hidden, emb, bias=False) if emb != cfg.hidden else None
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_drop = FastDropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.final_ln = nn.LayerNorm(cfg.hidden)
        self.successors = (
            SuccessorTable(cfg.n_items, cfg.successors, cfg.successor_lags)
            if cfg.successors
            else None
        )
        # BERT4Rec's [mask]: its own input vector, outside the item matrix, so the scores and
        # every item-matrix tool stay `n_items + 1` wide.
        self.mask_emb = nn.Parameter(torch.zeros(emb)) if cfg.bidirectional else None
        self.apply(self._init)
        if self.mask_emb is not None:
            nn.init.normal_(self.mask_emb, std=0.02)
        # Variance-preserving projections: with the generic std 0.02 on top of 0.02 item
        # vectors, the item signal entered ~50x weaker than the positions and ML-1M
        # students with emb_dim 16 stayed at popularity level for epochs.
        if self.in_proj is not None:
            nn.init.normal_(self.in_proj.weight, std=emb**-0.5)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, std=cfg.hidden**-0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def output_weight(self) -> Tensor:
        """`[n_items + 1, width]`: row i scores internal item i (row 0 is padding, never
        scored: training and ranking skip column 0)."""
        return self.item_emb.weight

    def query(self, hidden: Tensor) -> Tensor:
        """Map hidden states to the space of `output_weight` (identity unless factorized)."""
        return hidden if self.out_proj is None else self.out_proj(hidden)

    @property
    def mask_id(self) -> int:
        """The id of [mask] in a bidirectional model's inputs: one past the catalogue."""
        return self.cfg.n_items + 1

    def with_mask(self, seq: Tensor) -> Tensor:
        """What the model reads to predict the next item: the last `max_len` items, or for a
        bidirectional model the last `max_len - 1` and a [mask] in the next slot."""
        if not self.cfg.bidirectional:
            return seq[:, -self.cfg.max_len :]
        mask = torch.full((seq.shape[0], 1), self.mask_id, dtype=seq.dtype, device=seq.device)
        return torch.cat([seq[:, -(self.cfg.max_len - 1) :], mask], dim=1)

    def _embed(self, seq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input embeddings, validity mask `[batch, length]` and attention mask."""
        seq = seq[:, -self.cfg.max_len :]
        length = seq.shape[1]
        valid = seq > 0
        # int64 before CumSum: ONNX has no bool CumSum.
        positions = (valid.to(torch.int64).cumsum(dim=1) - 1).clamp(min=0)
        if self.mask_emb is None:
            x = self.item_emb(seq)
        else:
            masked = (seq == self.mask_id).unsqueeze(-1)
            x = self.item_emb(seq.clamp(max=self.cfg.n_items))
            x = torch.where(masked, self.mask_emb.to(x.dtype), x)
        if self.in_proj is not None:
            x = self.in_proj(x)
        x = x * math.sqrt(self.cfg.hidden) + self.pos_emb(positions)
        x = torch.where(valid.unsqueeze(-1), self.emb_drop(x), 0.0)
        # Causal, and padding keys hidden; the diagonal stays open so that padding queries
        # still have one key (their outputs are discarded) instead of producing NaN.
        # Built from index comparisons: ONNX Runtime has no bool Trilu/EyeLike kernels.
        idx = torch.arange(length, device=seq.device)
        diag = idx.unsqueeze(1) == idx.unsqueeze(0)
        keys = valid.unsqueeze(1)
        if not self.cfg.bidirectional:  # a bidirectional model sees every item
            keys = keys & (idx.unsqueeze(1) >= idx.unsqueeze(0))
        attn_mask = (keys | diag).unsqueeze(1)
        return x, valid, attn_mask

    def encode(self, seq: Tensor) -> Tensor:
        """Hidden state at every position, `[batch, length, hidden]` (padding rows are 0)."""
        x, valid, attn_mask = self._embed(seq)
        for block in self.blocks:
            x = torch.where(valid.unsqueeze(-1), block(x, attn_mask), 0.0)
        return self.final_ln(x)

    def user_vector(self, seq: Tensor) -> Tensor:
        """`[batch, width]`: what the item matrix is scored against after the last position
        (the two-stage contract's output).

        Computes only what inference needs: the last block runs attention and FFN for the
        last position alone (the other positions only serve as its keys and values).
        """
        x, valid, attn_mask = self._embed(self.with_mask(seq))
        for block in self.blocks[:-1]:
            x = torch.where(valid.unsqueeze(-1), block(x, attn_mask), 0.0)
        last = self.blocks[-1](x, attn_mask, last_only=True)[:, 0]
        return self.query(self.final_ln(last))

    def forward(self, seq: Tensor) -> Tensor:
        """Scores of every item after the last position, `[batch, n_items + 1]`."""
        # With a bias, F.linear exports as Gemm(transB=1) on the very initializer the input
        # Gather reads; `@ weight.T` (or no bias) made the exporter store a transposed second
        # copy of the item matrix, doubling the model file.
        weight = self.output_weight
        zero_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        scores = F.linear(self.user_vector(seq), weight, zero_bias)
        if self.successors is not None:
            scores = self.successors.add_to(scores, seq[:, -self.cfg.max_len :])
        return scores

    def successor_entries(self, seq: Tensor) -> tuple[Tensor, Tensor] | None:
        """Sparse score entries at every position of `seq` (`SuccessorTable.at_positions`),
        for losses over all positions; None without successor lists."""
        if self.successors is None:
            return None
        return self.successors.at_positions(seq[:, -self.cfg.max_len :])

    def num_parameters(self) -> int:
        """Trained values, plus one per stored id that is fixed but scores (successor ids)."""
        ids = self.successors.n_ids if self.successors is not None else 0
        return sum(p.numel() for p in self.parameters()) + ids
