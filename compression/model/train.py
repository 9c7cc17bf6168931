"""Training loop: the loss of `[train] loss` at every position (full-softmax cross-entropy,
"SASRec+", by default; sampled losses for large catalogues: `compression.model.losses`).

Speed choices measured on the 2-core CPU (../shared/DESIGN.md §8 and benchmarks/):
batches of similar length padded to their own maximum; the positions x items logit matrix
is never stored (cross-entropy runs in row chunks, recomputed in backward); bf16 autocast.
`torch.compile` was slower than eager here and is not used.
"""

from __future__ import annotations

import copy
import ctypes
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from compression.configs import ModelConfig, TrainConfig
from compression.data.sequences import Split, pad_left
from compression.evaluate.metrics import evaluate_model
from compression.model.catch_up_adam import CatchUpAdam
from compression.model.losses import LossFn, cloze_loss, sasrec_loss
from compression.model.resume import (
    ResumeAt,
    fingerprint,
    load_state,
    numpy_state,
    save_state,
    set_numpy_state,
    state_path,
)
from compression.model.sasrec import SASRec
from model_store.checkpoint import stored_names
from model_store.store import CHECKPOINT_FILE, LEGACY_CHECKPOINTS

# lr multiplier when validation stalls (with TrainConfig.max_lr_decays).
LR_DECAY_FACTOR = 0.3

# safetensors with the config in its header; "recsys-sasrec/1" was a pickled dict (torch.save).
CHECKPOINT_FORMAT = "recsys-sasrec/2"


def tune_allocator() -> None:
    """Keep freed chunks (logit blocks of ~30 MB) in the heap instead of returning them.

    glibc's default hands large blocks back to the kernel at once, and every reallocation
    then pays page faults: ~10% of a training step's time here (measured at hidden 64).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 4 * 1024 * 1024 * 1024 - 1)


def fast_bf16(device: torch.device) -> bool:
    """True where bf16 autocast speeds training up: CUDA, or a CPU with native bf16 math.

    On an AVX2-only CPU (AMD EPYC here) PyTorch emulates bf16: an ML-1M teacher epoch took
    1,436 s instead of ~50 s in fp32.
    """
    if device.type == "cuda":
        return True
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check is not None and check()) or (amx is not None and amx()))


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def training_pairs(
    train: list[np.ndarray], max_len: int, all_windows: bool = False, stride: int | None = None
) -> tuple[list[np.ndarray], ...]:
    """(input, target) pairs: predict item t+1 from items <= t.

    One pair per user covers the last `max_len` steps. With `all_windows`, histories longer
    than that are cut into consecutive `max_len`-step windows back to the first item, so every
    training interaction is a target exactly once (on ML-1M: 988k targets instead of 652k).
    `stride` < `max_len` makes a window end every `stride` steps instead: for a model that
    reads only the last `stride` positions of `max_len`-step inputs (a short-context student
    under a long-context teacher), every step is then one of those positions exactly once.
    """
    step = stride or max_len
    if not 1 <= step <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    inputs, targets = [], []
    for seq in train:
        steps = len(seq) - 1
        ends = range(steps, 0, -step) if all_windows else [steps] * (steps > 0)
        for end in ends:
            start = max(0, end - max_len)
            inputs.append(seq[start:end])
            targets.append(seq[start + 1 : end + 1])
    return inputs, targets


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, chunk_batches: int = 50
) -> Iterator[np.ndarray]:
    """Shuffle, sort each chunk of `chunk_batches` batches by length, yield shuffled batches.

    Padding each batch to its own maximum then costs little, while order stays random.
    """
    perm = rng.permutation(len(lengths))
    batches = []
    chunk = batch_size * chunk_batches
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    for i in rng.permutation(len(batches)):
        yield batches[i]


def batches_per_epoch(n_pairs: int, batch_size: int, chunk_batches: int = 50) -> int:
    """How many batches `length_bucketed_batches` yields for `n_pairs` pairs."""
    chunk = batch_size * chunk_batches
    full, rest = divmod(n_pairs, chunk)
    return full * chunk_batches + -(-rest // batch_size)


@dataclass
class TrainResult:
    model: SASRec
    best_epoch: int
    epochs_run: int
    wall_s: float
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by: str = "max_epochs"


# (model, inputs, targets, rows=None): `rows` are the batch's indices into the training
# pairs, for losses that cached something per pair in an optional `prepare(inputs, targets,
# width)` hook that `train` calls once (compression.distill.loss).
EvalHook = Callable[[int, dict[str, float]], None]


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    split: Split,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_eval: EvalHook | None = None,
    input_len: int | None = None,
    init_model: SASRec | None = None,
    resume: ResumeAt | None = None,
) -> TrainResult:
    """Train from scratch (or from a copy of `init_model`, e.g. a pruned model to fine-tune;
    its config must equal `model_cfg`); return the model with the best validation NDCG@10.

    `loss_fn(model, inputs, targets)` replaces the label cross-entropy (distillation);
    `on_eval(epoch, valid_metrics)` runs after every validation (adaptive schedules);
    `input_len` feeds longer windows than the model reads (a teacher may need them);
    `resume` keeps the run's state after every epoch and continues a run that was cut
    short (`compression.model.resume`; the caller removes the state once it published).
    """
    tune_allocator()
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    rng = seed_everything(train_cfg.seed)
    device = torch.device(train_cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={train_cfg.device!r} but torch sees no CUDA GPU; use 'cpu'")
    use_bf16 = fast_bf16(device)
    if not use_bf16:
        log("bf16 autocast off: this CPU has no native bf16 (AVX-512 BF16 / AMX); fp32")
    if init_model is not None and init_model.cfg != model_cfg:
        raise ValueError("init_model.cfg differs from model_cfg")
    model = SASRec(model_cfg) if init_model is None else copy.deepcopy(init_model)
    # Also for a given start model that has none yet; a pruned or copied model keeps the
    # lists it was trained with.
    if model.successors is not None and not bool(model.successors.succ.any()):
        model.successors.fit(split.train)
    model = model.to(device)
    if loss_fn is None and model_cfg.bidirectional:
        if train_cfg.loss != "full":
            raise ValueError(
                f"loss={train_cfg.loss!r} with a bidirectional model: it trains by cloze "
                "over the full softmax; set loss = 'full'"
            )
        loss_fn = cloze_loss(train_cfg.mask_prob, train_cfg.seed)
    if loss_fn is None:
        loss_fn = sasrec_loss(
            train_cfg.loss, model_cfg.n_items, train_cfg.negatives, split.item_counts(),
            train_cfg.seed,
        )  # fmt: skip
    # Sampled losses read a few rows of the item matrix per step: sparse gradients and an
    # Adam that updates only the rows read keep a step's cost independent of the catalogue.
    sparse = bool(getattr(loss_fn, "sparse_embeddings", False))
    model.item_emb.sparse = sparse
    # Windows as long as the teacher reads, one every `max_len` steps: the model is trained
    # on the last `max_len` positions of each, so every step once (without the stride, a
    # 50-item student under a 200-item teacher saw only a quarter of the steps).
    window = max(input_len or 0, model_cfg.max_len)
    inputs, targets = training_pairs(
        split.train, window, train_cfg.windows == "all", stride=model_cfg.max_len
    )
    if not inputs:
        raise ValueError("no user has 2+ training items; nothing to train on")
    lengths = np.array([len(x) for x in inputs])
    started = time.perf_counter()  # the teacher's targets count in the run's time
    prepare = getattr(loss_fn, "prepare", None)
    if prepare is not None:
        started_prepare = time.perf_counter()
        prepare(inputs, targets, model_cfg.max_len)
        log(f"loss prepared in {time.perf_counter() - started_prepare:.1f} s")
    optimizers = _optimizers(model, train_cfg.lr, sparse)
    ema = weight_average(model, train_cfg.ema_epochs, len(inputs), train_cfg.batch_size)
    # What is validated, kept and returned: the moving average when there is one.
    scored = model if ema is None else ema.module
    best_state = copy.deepcopy(model.state_dict())
    best_ndcg, best_epoch, best_valid, bad_evals, lr_decays = -1.0, 0, {}, 0, 0
    history: list[dict[str, float]] = []
    stopped_by, epoch = "max_epochs", 0
    state_file, saved, first_epoch = None, None, 1
    if resume is not None:
        key = fingerprint(model_cfg, train_cfg, len(inputs), resume.key, init_model)
        state_file = state_path(resume.folder, resume.name, key)
        saved = load_state(state_file, log)
    if saved is not None:
        _restore(saved, state_file, model, ema, optimizers, loss_fn, rng, device)
        best_state, best_ndcg = saved["best_state"], saved["best_ndcg"]
        best_epoch, best_valid = saved["best_epoch"], saved["best_valid"]
        bad_evals, lr_decays = saved["bad_evals"], saved["lr_decays"]
        history, first_epoch = saved["history"], saved["epoch"] + 1
        started -= saved["elapsed_s"]
        epoch = first_epoch - 1
        log(f"resuming after epoch {epoch} of {train_cfg.max_epochs} from {state_file}")
        now = {"threads": torch.get_num_threads(), "bf16": use_bf16}
        before = {k: saved.get(k) for k in now}
        if now != before:
            log(
                f"resumed with {now} where the run had {before}: it continues, but its "
                "weights will not be bit-identical to an uninterrupted run's"
            )

    def keep_state(stopped: str | None) -> None:
        if state_file is None:
            return
        save_state(state_file, {
            "epoch": epoch, "stopped_by": stopped, "model": model.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers],
            "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
            "numpy_rng": numpy_state(rng), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "bf16": use_bf16,
            "best_state": best_state, "best_ndcg": best_ndcg, "best_epoch": best_epoch,
            "best_valid": best_valid, "bad_evals": bad_evals, "lr_decays": lr_decays,
            "history": history, "elapsed_s": time.perf_counter() - started,
        })  # fmt: skip

    finished = saved is not None and saved["stopped_by"] is not None
    if finished:
        stopped_by = saved["stopped_by"]
    for epoch in range(first_epoch, 0 if finished else train_cfg.max_epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum, positions = 0.0, 0
        batches = list(length_bucketed_batches(lengths, train_cfg.batch_size, rng))
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False)
        for idx in bar:
            x = torch.from_numpy(pad_left([inputs[i] for i in idx], window)).to(device)
            y = torch.from_numpy(pad_left([targets[i] for i in idx], window)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model, x, y, rows=idx)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            if ema is not None:
                ema.update_parameters(model)
            n = int(lengths[idx].sum())
            loss_sum += float(loss.detach()) * n
            positions += n
            rate = positions / (time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{loss_sum / positions:.4f}", pos_per_s=f"{rate:,.0f}")
        for opt in optimizers:
            if isinstance(opt, CatchUpAdam):
                opt.flush()  # every row up to date before the weights are read
        epoch_s = time.perf_counter() - epoch_start
        record: dict[str, float] = {
            "epoch": epoch,
            "loss": loss_sum / positions,
            "epoch_s": epoch_s,
            "lr": optimizers[0].param_groups[0]["lr"],
        }
        # Every epoch is validated, so a run the time limit stops ends on a validation.
        valid = evaluate_model(scored, split, "valid")
        record.update({f"valid_{k}": v for k, v in valid.items() if k != "users"})
        if on_eval is not None:
            on_eval(epoch, valid)
        if valid["ndcg@10"] > best_ndcg:
            best_ndcg, best_epoch, best_valid, bad_evals = valid["ndcg@10"], epoch, valid, 0
            best_state = copy.deepcopy(scored.state_dict())
        else:
            bad_evals += 1
        history.append(record)
        elapsed = time.perf_counter() - started
        log(
            f"epoch {epoch:3d}  loss {record['loss']:.4f}  {epoch_s:5.1f}s  "
            f"valid ndcg@10 {record.get('valid_ndcg@10', float('nan')):.4f}  "
            f"best {best_ndcg:.4f} @ {best_epoch}  lr {record['lr']:.2e}  "
            f"elapsed {elapsed / 60:.1f} min"
        )
        if bad_evals >= train_cfg.lr_decay_patience and lr_decays < train_cfg.max_lr_decays:
            # Plateau: go back to the best weights and continue with a smaller step.
            lr_decays += 1
            bad_evals = 0
            model.load_state_dict(best_state)
            if ema is not None:
                ema.module.load_state_dict(best_state)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] *= LR_DECAY_FACTOR
            log(
                f"validation stalled: back to epoch {best_epoch}, lr -> "
                f"{optimizers[0].param_groups[0]['lr']:.2e}"
            )
        elif bad_evals >= train_cfg.patience:
            stopped_by = "early_stopping"
            break
        if train_cfg.time_limit_s and elapsed >= train_cfg.time_limit_s:
            stopped_by = "time_limit"
            break
        keep_state(None)
    if not finished:
        # Also the finished run: publishing can still fail, and a rerun then only publishes.
        keep_state(stopped_by)
    model.load_state_dict(best_state)
    model.item_emb.sparse = False
    model.to("cpu").eval()
    return TrainResult(
        model=model,
        best_epoch=best_epoch,
        epochs_run=epoch,
        wall_s=time.perf_counter() - started,
        best_valid=best_valid,
        history=history,
        stopped_by=stopped_by,
    )


def _restore(
    saved: dict[str, Any],
    path: Path | None,
    model: SASRec,
    ema: AveragedModel | None,
    optimizers: list[torch.optim.Optimizer],
    loss_fn: Any,
    rng: np.random.Generator,
    device: torch.device,
) -> None:
    """Put a saved run's weights, optimizers, loss schedule and generators back in place."""
    try:
        model.load_state_dict(saved["model"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        for opt, opt_state in zip(optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if hasattr(loss_fn, "load_state_dict"):
            loss_fn.load_state_dict(saved["loss"])
        set_numpy_state(rng, saved["numpy_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        why = " ".join(str(exc).split())[:200]  # one line
        raise ValueError(
            f"training state {path} does not fit this run ({why}); delete it to start the run over"
        ) from None


def _optimizers(model: SASRec, lr: float, sparse: bool) -> list[torch.optim.Optimizer]:
    """Adam; with sparse item gradients, Adam for all but the item matrix and `CatchUpAdam`
    for it (dense Adam's trajectory, a row updated only when read: lazy `SparseAdam` trained
    rarely read rows too little, compression/model/catch_up_adam.py)."""
    betas = (0.9, 0.98)
    if not sparse:
        return [torch.optim.Adam(model.parameters(), lr=lr, betas=betas)]
    items = model.item_emb.weight
    dense = [p for p in model.parameters() if p is not items]
    return [
        torch.optim.Adam(dense, lr=lr, betas=betas),
        CatchUpAdam([items], lr=lr, betas=betas),
    ]


def weight_average(
    model: SASRec, ema_epochs: float | None, n_pairs: int, batch_size: int
) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights spanning ~`ema_epochs` epochs.

    Why: a small model's validation NDCG@10 swings by ~2% between consecutive epochs at a
    constant lr (the noise of the last steps); the average of recent weights sits near the
    centre of those swings. Buffers (successor ids, bucket maps) never change in training,
    so the average keeps the copies made here.
    """
    if ema_epochs is None:
        return None
    steps = ema_epochs * batches_per_epoch(n_pairs, batch_size)
    decay = 1.0 - 1.0 / max(1.0, steps)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def save_checkpoint(path: Path, model: SASRec, extra: dict[str, Any] | None = None) -> None:
    """Write `model` as safetensors: the tensors, and in the header's metadata (JSON strings)
    the format tag, the model config and `extra`, so loading needs nothing else and never
    unpickles. A tensor the model lists under several names (`shared_blocks`: one block
    listed n_blocks times) is stored once, under its first name."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tensors: dict[str, Tensor] = {
        name: state[name].detach().cpu().contiguous()
        for name, owner in stored_names(state).items()
        if owner == name
    }
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(model.cfg.model_dump()),
        "extra": json.dumps(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _read_checkpoint(path: Path) -> SASRec:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # a pickle, a truncated file, a bad header: never executed
        raise ValueError(f"not a safetensors file ({exc})") from exc
    tag = metadata.get("format")
    if tag != CHECKPOINT_FORMAT:
        raise ValueError(
            f"unknown format tag {tag!r} in its header, expected {CHECKPOINT_FORMAT!r}"
        )
    try:
        config = json.loads(metadata["config"])
        model = SASRec(ModelConfig.from_stored(config))
    except Exception as exc:  # missing, not JSON, not a mapping, or refused by ModelConfig
        raise ValueError(f"bad model config in its header ({exc})") from exc
    expected = model.state_dict()
    stored_as = stored_names(expected)
    stored = {n: t for n, t in expected.items() if stored_as[n] == n}  # one name per tensor
    missing, extra = sorted(stored.keys() - tensors.keys()), sorted(tensors.keys() - stored.keys())
    if missing or extra:
        raise ValueError(f"tensors do not match its config: missing {missing}, unexpected {extra}")
    for name, want in stored.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"tensor {name!r} is {got.dtype} {list(got.shape)}, its config needs "
                f"{want.dtype} {list(want.shape)}"
            )
    state = {name: tensors[stored_as[name]] for name in expected}
    model.load_state_dict(state, strict=True)
    return model


def load_checkpoint(path: Path) -> SASRec:
    """Load a checkpoint written by `save_checkpoint`, in eval mode.

    Never unpickles (artifacts may come from anyone who can write the store): safetensors
    holds raw tensors and a JSON header. Every problem is a ValueError naming the file."""
    try:
        model = _read_checkpoint(path)
    except Exception as exc:  # any corruption surfaces as one clear message
        raise ValueError(f"{path}: not a usable model checkpoint: {exc}") from exc
    model.eval()
    return model


def stored_checkpoint(manifest: Any, folder: Path, purpose: str) -> Path:
    """Path of a stored version's checkpoint (`model_store.store.CHECKPOINT_FILE`), or a
    ValueError saying why there is none: a version holding only the pickle-based `model.pt`
    of earlier releases is refused before anything reads it."""
    ref = f"{manifest.name}@{manifest.version}"
    if CHECKPOINT_FILE in manifest.artifacts:
        return folder / CHECKPOINT_FILE
    legacy = [name for name in LEGACY_CHECKPOINTS if name in manifest.artifacts]
    if legacy:
        raise ValueError(
            f"{ref}: holds only {legacy[0]}, a pickle-based checkpoint this version never loads "
            f"(pickle can run code); re-publish it with {CHECKPOINT_FILE} by re-running the "
            "recipe that made it"
        )
    raise ValueError(f"{ref}: has no PyTorch checkpoint ({CHECKPOINT_FILE}) to {purpose}")
