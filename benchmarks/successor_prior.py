"""How much do next-item transition counts add to a trained model? (no retraining)

For the data of a stored model: a first-order Markov chain alone (training transition counts
from the last item, or the last three at weights 1, 1/2, 1/4), then each given model's
log-softmax plus `lam * log(p_markov + 1e-3)` (p_markov: the lag-weighted transition
frequencies), with the full count table and with each item's top-k successors only
(`compression.model.successors.top_successors`, the lists a `successors = k` model stores).
Full ranking, history masked, validation and test (leave-one-out).

    python benchmarks/successor_prior.py ml1m-teacher-windows-40min@1 ml1m-student-ctx50-d0@1

writes benchmarks/results/successor-prior-<first model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from compression.data.sequences import Split, leave_one_out
from compression.evaluate.metrics import Scorer, evaluate_scorer
from compression.model.sasrec import SASRec
from compression.model.successors import top_successors
from compression.model.train import load_checkpoint
from compression.pipeline import load_model_data
from model_store.store import CHECKPOINT_FILE, ModelStore

LAGS = (1.0, 0.5, 0.25)
LAMBDAS = (0.1, 0.2, 0.4)


def transition_counts(split: Split) -> sp.csr_matrix:
    n = split.n_items + 1
    seqs = [np.asarray(s) for s in split.train if len(s) > 1]
    src = np.concatenate([s[:-1] for s in seqs])
    dst = np.concatenate([s[1:] for s in seqs])
    counts = sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(n, n))
    counts.sum_duplicates()
    return counts


def keep_top(counts: sp.csr_matrix, split: Split, k: int) -> sp.csr_matrix:
    """The counts of each item's top-k successors only (the lists a model stores)."""
    lists = top_successors(split.train, split.n_items, k)
    rows = np.repeat(np.arange(counts.shape[0]), k)
    cols = lists.ravel()
    keep = cols > 0
    values = np.asarray(counts[rows[keep], cols[keep]]).ravel()
    return sp.csr_matrix((values, (rows[keep], cols[keep])), shape=counts.shape)


def markov(counts: sp.csr_matrix, lags: tuple[float, ...]) -> Scorer:
    totals = np.asarray(counts.sum(axis=1)).ravel() + 1.0

    def probs(batch: np.ndarray) -> np.ndarray:
        out = np.zeros((batch.shape[0], counts.shape[1]), np.float32)
        for lag, w in enumerate(lags):
            last = batch[:, -1 - lag] if batch.shape[1] > lag else np.zeros(len(batch), int)
            out += w * counts[last].toarray() / totals[last][:, None]
        return out

    return probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME@VERSION of stored models with a checkpoint")
    ap.add_argument("--store", default="model_store/models")
    ap.add_argument("--top-k", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.store)
    manifest, _ = store.load(args.models[0])
    split = leave_one_out(load_model_data(manifest))
    counts = transition_counts(split)
    rows: list[dict[str, object]] = []

    def record(model: str, table: str, lam: float | None, scorer: Scorer, max_len: int) -> None:
        row: dict[str, object] = {"model": model, "table": table, "lambda": lam}
        for stage in ("valid", "test"):
            m = evaluate_scorer(scorer, split, stage, max_len=max_len)
            row[f"{stage}_ndcg@10"], row[f"{stage}_hr@10"] = m["ndcg@10"], m["hr@10"]
        rows.append(row)
        print(row, flush=True)

    for name, lags in (("last item", (1.0,)), ("last 3 items", LAGS)):
        probs = markov(counts, lags)
        record("markov chain alone", name, None, lambda b, p=probs: p(b) + 1e-6, 10)
    tables = {"full": counts, **{f"top-{k}": keep_top(counts, split, k) for k in args.top_k}}
    for ref in args.models:
        _, folder = store.load(ref)
        model = load_checkpoint(folder / CHECKPOINT_FILE)
        cache: dict[bytes, np.ndarray] = {}

        def base(batch: np.ndarray, model: SASRec = model, cache: dict = cache) -> np.ndarray:
            key = batch.tobytes()
            if key not in cache:
                with torch.inference_mode():
                    logits = model(torch.from_numpy(batch)).float()
                cache[key] = torch.log_softmax(logits, -1).numpy()
            return cache[key]

        record(ref, "none", 0.0, base, model.cfg.max_len)
        for table, matrix in tables.items():
            probs = markov(matrix, LAGS)
            for lam in LAMBDAS:
                scorer = lambda b, p=probs, lam=lam: base(b) + lam * np.log(p(b) + 1e-3)  # noqa: E731
                record(ref, table, lam, scorer, model.cfg.max_len)

    out = Path(args.out)
    stem = f"successor-prior-{args.models[0].replace('@', '-')}"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| model | transition table | λ | valid NDCG@10 | test NDCG@10 | test HR@10 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lam = "-" if r["lambda"] is None else r["lambda"]
        lines.append(
            f"| {r['model']} | {r['table']} | {lam} | {r['valid_ndcg@10']:.4f} | "
            f"{r['test_ndcg@10']:.4f} | {r['test_hr@10']:.4f} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json|.md")


if __name__ == "__main__":
    main()
