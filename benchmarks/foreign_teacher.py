"""A teacher from outside the project, for issue 26's acceptance: a causal Transformer built
from plain PyTorch modules (none of the project's model code; the project gives only the
plumbing: its bf16 check and its resumable run-state file), trained by its own loop on the
training part of a sequence file (each user's last two items held out, as the project's
leave-one-out split does), with its own item order (the data's string ids sorted as text),
exported by `torch.onnx.export`.

    python benchmarks/foreign_teacher.py ../shared/data/ml-1m/ml-1m.txt \
        --out benchmarks/results/foreign-teacher --epochs 40 --hidden 128 --max-len 200

Writes OUT/teacher.onnx (int64 `history [batch, length]` of its ids -> `logits [batch,
n + 1]`), OUT/teacher-items.txt (its ids in column order) and OUT/train.json (settings, loss
per epoch, seconds). Then the family: `recsys build --recipe
recipes/experiments/ml1m-external.toml` (imported teacher, its INT8, a distilled student).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compression.model.resume import load_state, save_state
from compression.model.train import fast_bf16


class Block(nn.Module):
    """Pre-norm self-attention + GELU feed-forward, written out (PyTorch's
    `nn.MultiheadAttention` exports with the example's batch size baked into a reshape)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        split = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*split, attn_mask=bias)
        x = x + self.drop(self.proj(y.transpose(1, 2).flatten(2)))
        return x + self.drop(self.ff(self.norm2(x)))


class ForeignTransformer(nn.Module):
    """Item + position embeddings, causal pre-norm blocks (padding keys hidden, the diagonal
    always open), scores tied to the item embeddings."""

    def __init__(self, n_items: int, hidden: int, blocks: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.items = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.scale = hidden**0.5
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def hidden_states(self, ids: Tensor) -> Tensor:
        ids = ids[:, -self.max_len :]
        idx = torch.arange(ids.shape[1], device=ids.device)
        x = self.items(ids) * self.scale + self.positions(idx)
        visible = (idx[None, :] <= idx[:, None])[None] & (ids > 0)[:, None, :]
        visible = visible | (idx[None, :] == idx[:, None])[None]
        bias = torch.where(visible, 0.0, -1e9)[:, None]  # [batch, 1, queries, keys]
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)

    def forward(self, ids: Tensor) -> Tensor:
        """Scores of every item (column 0: padding) after the last position."""
        return self.hidden_states(ids)[:, -1] @ self.items.weight.T


def read_sequences(path: Path) -> list[list[str]]:
    with path.open() as f:
        return [line.split()[1:] for line in f if line.split()[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="sequence file: user item item ...")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/foreign-teacher"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    sequences = read_sequences(args.data)
    ids = sorted({item for seq in sequences for item in seq})  # its own order: as text
    column = {item: c + 1 for c, item in enumerate(ids)}
    # Training part only: the last two items of each user are validation and test.
    train = [np.array([column[i] for i in seq[:-2]]) for seq in sequences if len(seq) > 3]
    model = ForeignTransformer(len(ids), args.hidden, args.blocks, args.heads, args.max_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    window = args.max_len + 1
    bf16 = fast_bf16(torch.device("cpu"))  # emulated bf16 would be slower than fp32
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "checkpoint.safetensors"  # a killed run resumes from it
    history: list[dict[str, float]] = []
    state = load_state(checkpoint, print)
    if state is not None:  # dropout draws then differ from an uninterrupted run's
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        print(f"resumed after epoch {len(history)}", flush=True)
    for epoch in range(len(history) + 1, args.epochs + 1):
        model.train()
        started, total, count = time.perf_counter(), 0.0, 0
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
        for start in range(0, len(order), args.batch_size):
            rows = [train[r][-window:] for r in order[start : start + args.batch_size]]
            batch = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
            for b, r in enumerate(rows):
                batch[b, -len(r) :] = r
            x, y = torch.from_numpy(batch[:, :-1]), torch.from_numpy(batch[:, 1:])
            keep = y > 0
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # Scores only where there is a next item: padding is a third of ML-1M's rows.
                logits = model.hidden_states(x)[keep] @ model.items.weight.T
            loss = F.cross_entropy(logits.float(), y[keep])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = int(keep.sum())
            total, count = total + loss.item() * n, count + n
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "loss": total / count, "seconds": seconds})
        print(f"epoch {epoch} loss {total / count:.4f} {seconds:.0f} s", flush=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        save_state(checkpoint, {**state, "history": history})
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randint(1, len(ids) + 1, (2, 7)),), str(args.out / "teacher.onnx"),
            input_names=["history"], output_names=["logits"], opset_version=17, dynamo=False,
            dynamic_axes={"history": {0: "batch", 1: "length"}, "logits": {0: "batch"}},
        )  # fmt: skip
    (args.out / "teacher-items.txt").write_text("\n".join(ids) + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "train.json").write_text(
        json.dumps({"settings": settings, "bf16": bf16, "history": history})
    )
    checkpoint.unlink()


if __name__ == "__main__":
    main()
