"""Jobs composed from the pieces: train a teacher, evaluate it, publish it to the store."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.configs import DataSpec, ModelConfig, StudentRecipe, TeacherRecipe
from compression.data.load import load_dataset
from compression.data.sequences import SequenceDataset, Split, leave_one_out
from compression.evaluate.metrics import evaluate_model, evaluate_popularity
from compression.model.resume import ResumeAt, remove_states
from model_store.manifest import DatasetInfo, Manifest
from model_store.store import CHECKPOINT_FILE, ModelStore

if TYPE_CHECKING:
    from compression.model.sasrec import SASRec

METRIC_KEYS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")
PARITY_SEQUENCES = 512


def load_from_spec(spec: DataSpec) -> SequenceDataset:
    kwargs: dict[str, Any] = {}
    if Path(spec.path).suffix.lower() in {".dat", ".csv", ".parquet"}:
        kwargs = {
            "fmt": spec.fmt,
            "user_col": spec.user_col,
            "item_col": spec.item_col,
            "time_col": spec.time_col,
            "min_user_count": spec.min_user_count,
            "min_item_count": spec.min_item_count,
        }
    return load_dataset(spec.path, **kwargs)


def load_model_data(manifest: Manifest, path: str | None = None) -> SequenceDataset:
    """The data a stored model was trained on (optionally read from another path),
    refused when its bytes differ: item ids would no longer line up with the model's."""
    spec = DataSpec(**manifest.recipe.get("data", {}))
    if path is not None:
        spec = spec.model_copy(update={"path": path})
    data = load_from_spec(spec)
    if data.sha256 != manifest.dataset.sha256:
        raise ValueError(
            f"{spec.path}: sha256 {data.sha256[:12]}… differs from the data "
            f"{manifest.name}@{manifest.version} was trained on "
            f"({manifest.dataset.sha256[:12]}…); item ids would not line up"
        )
    return data


# The data sets a `recsys build` has loaded and split: every step of one build (teacher,
# students, variants, the report) reuses them instead of reading and splitting the file
# again. Keyed by the source file's sha256 and the sizes (two filterings of one file differ
# in them), and by data spec for steps that start from one. None outside a build, where each
# command loads what it needs once.
_SPLITS: ContextVar[dict[object, tuple[SequenceDataset, Split]] | None] = ContextVar(
    "splits", default=None
)


@contextmanager
def shared_splits() -> Iterator[None]:
    """Within this block, `model_split` loads each data set once (nested blocks share it)."""
    if _SPLITS.get() is not None:
        yield
        return
    token = _SPLITS.set({})
    try:
        yield
    finally:
        _SPLITS.reset(token)


def _data_key(sha256: str, users: int, items: int, interactions: int) -> object:
    return (sha256, users, items, interactions)


def _remember(data: SequenceDataset, split: Split, spec: DataSpec | None = None) -> None:
    cache = _SPLITS.get()
    if cache is not None:
        key = _data_key(data.sha256, data.n_users, data.n_items, data.n_interactions)
        cache[key] = (data, split)
        if spec is not None:
            cache[spec.model_dump_json()] = (data, split)


def model_split(manifest: Manifest) -> tuple[SequenceDataset, Split]:
    """The data a stored model was trained on and its leave-one-out split."""
    cache = _SPLITS.get()
    d = manifest.dataset
    key = _data_key(d.sha256, d.n_users, d.n_items, d.n_interactions)
    if cache is not None and key in cache:
        return cache[key]
    data = load_model_data(manifest)
    split = leave_one_out(data)
    _remember(data, split)
    return data, split


def spec_split(spec: DataSpec) -> tuple[SequenceDataset, Split]:
    """The data a spec names and its leave-one-out split (once per build)."""
    cache = _SPLITS.get()
    if cache is not None and spec.model_dump_json() in cache:
        return cache[spec.model_dump_json()]
    data = load_from_spec(spec)
    split = leave_one_out(data)
    _remember(data, split, spec)
    return data, split


def dataset_info(data: SequenceDataset) -> DatasetInfo:
    return DatasetInfo(
        name=data.name,
        sha256=data.sha256,
        n_users=data.n_users,
        n_items=data.n_items,
        n_interactions=data.n_interactions,
    )


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(metrics[k]) for k in METRIC_KEYS}


@dataclass
class TrainReport:
    """What a training job measured and where it was published."""

    manifest: Manifest
    test: dict[str, float]
    valid: dict[str, float]
    popularity_test: dict[str, float]
    params: int
    epochs: int
    best_epoch: int
    wall_s: float
    stopped_by: str


def signature(n_items: int) -> dict[str, Any]:
    return {
        "inputs": [{"name": "item_ids", "dtype": "int64", "shape": ["batch", "length"]}],
        "outputs": [{"name": "scores", "dtype": "float32", "shape": ["batch", n_items + 1]}],
    }


def evaluate_and_publish(
    store: ModelStore,
    name: str,
    result: Any,
    data: SequenceDataset,
    split: Split,
    *,
    kind: str,
    parent: str | None,
    recipe: dict[str, Any],
    wall_s: float,
    extra_metrics: dict[str, float] | None = None,
    resume: ResumeAt | None = None,
) -> TrainReport:
    """Test-set and popularity evaluation, then an atomic publish with checkpoint + mapping;
    the run's training state (`resume`) is dropped once it is published."""
    from compression.export.exporter import check_parity, export_onnx
    from compression.model.train import save_checkpoint

    test = evaluate_model(result.model, split, "test")
    popularity = evaluate_popularity(split, "test")
    params = result.model.num_parameters()
    metrics = {
        **prefixed("test", test),
        **prefixed("valid", result.best_valid),
        **prefixed("popularity_test", popularity),
        "params": float(params),
        "epochs": float(result.epochs_run),
        "best_epoch": float(result.best_epoch),
        "train_wall_s": round(wall_s, 1),
        **(extra_metrics or {}),
    }
    if metrics.get("teacher_test_ndcg@10"):
        metrics["ndcg_retention"] = test["ndcg@10"] / metrics["teacher_test_ndcg@10"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, items = Path(tmp) / CHECKPOINT_FILE, Path(tmp) / "items.json"
        onnx_path = Path(tmp) / "model.onnx"
        save_checkpoint(ckpt, result.model, extra={"dataset_sha256": data.sha256})
        data.save_item_mapping(items, split.item_counts())
        export_onnx(result.model, onnx_path)
        # Parity on real histories (the test inputs); raises before anything is published.
        parity_histories = split.eval_inputs("test")[0][:PARITY_SEQUENCES]
        metrics.update(check_parity(result.model, onnx_path, parity_histories).as_metrics())
        manifest = store.publish(
            name,
            {CHECKPOINT_FILE: ckpt, "model.onnx": onnx_path, "items.json": items},
            kind=kind,
            parent=parent,
            architecture=result.model.cfg.model_dump(),
            recipe={**recipe, "stopped_by": result.stopped_by},
            dataset=dataset_info(data),
            metrics=metrics,
            signature=signature(data.n_items),
        )
    if resume is not None:
        remove_states(resume.folder, resume.name)
    return TrainReport(
        manifest=manifest,
        test=test,
        valid=result.best_valid,
        popularity_test=popularity,
        params=params,
        epochs=result.epochs_run,
        best_epoch=result.best_epoch,
        wall_s=wall_s,
        stopped_by=result.stopped_by,
    )


def train_teacher(
    recipe: TeacherRecipe,
    store: ModelStore,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainReport:
    """Load data, train, evaluate (valid, test, popularity) and publish atomically."""
    from compression.model.train import train

    data, split = spec_split(recipe.data)
    model_cfg = recipe.model_config_for(data.n_items)
    log(f"data {json.dumps(data.summary())}")
    resume = resume_at(store, recipe.name, recipe.data.model_dump_json())
    result = train(model_cfg, recipe.train, split, progress=progress, log=log, resume=resume)
    return evaluate_and_publish(
        store,
        recipe.name,
        result,
        data,
        split,
        kind="teacher",
        parent=None,
        recipe=recipe.model_dump(),
        wall_s=result.wall_s,
        resume=resume,
    )


def resume_at(store: ModelStore, name: str, key: str) -> ResumeAt:
    """Where run `name` keeps its state until it is published: next to the store, so a rerun
    of the same command continues it (`compression.model.resume`)."""
    return ResumeAt(store.root.parent / ".train-state", name, key)


def warm_start(teacher: SASRec, cfg: ModelConfig, teacher_ref: str) -> SASRec:
    """A model of config `cfg` holding `teacher`'s weights: the same architecture reading at
    most the teacher's context, so only the position table is cut (to its first rows:
    positions count from the window start). Raises naming the first setting that differs."""
    from compression.model.sasrec import SASRec

    mine = cfg.model_dump(exclude={"max_len", "dropout"})
    theirs = teacher.cfg.model_dump(exclude={"max_len", "dropout"})
    differs = [k for k in mine if mine[k] != theirs[k]]
    if differs or cfg.max_len > teacher.cfg.max_len:
        what = (
            f"{differs[0]}={mine[differs[0]]!r} vs the teacher's {theirs[differs[0]]!r}"
            if differs
            else (f"max_len={cfg.max_len} > the teacher's {teacher.cfg.max_len}")
        )
        raise ValueError(
            f"init = 'teacher' needs the teacher's architecture ({teacher_ref}) with a context no "
            f"longer than its own: {what}"
        )
    model = SASRec(cfg)
    state = teacher.state_dict()
    state["pos_emb.weight"] = state["pos_emb.weight"][: cfg.max_len].clone()
    model.load_state_dict(state)
    return model


def distill_student(
    recipe: StudentRecipe,
    store: ModelStore,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainReport:
    """Train a student from a stored teacher on the teacher's own data, then publish it.

    With `recipe.distill = None` the same student learns from labels only: the control that
    distillation has to beat at equal architecture and budget.
    """
    from compression.distill.loss import DistillLoss
    from compression.model.train import load_checkpoint, stored_checkpoint, train

    teacher_manifest, folder = store.load(recipe.teacher)
    parent = f"{teacher_manifest.name}@{teacher_manifest.version}"
    checkpoint = stored_checkpoint(teacher_manifest, folder, "distil from")
    data, split = model_split(teacher_manifest)
    teacher = load_checkpoint(checkpoint)
    student_cfg = recipe.model_config_for(data.n_items)
    loss_fn, on_eval = None, None
    if recipe.distill is not None:
        teacher_ndcg = teacher_manifest.metrics.get("valid_ndcg@10", 0.0)
        targets_of = None
        if teacher.cfg.bidirectional:
            targets_of = _bidirectional_targets(teacher_manifest, folder, data.n_items, store)
        elif recipe.distill.top_k is not None:
            from compression.distill.targets_cache import stored_teacher_targets

            targets_of = stored_teacher_targets(
                teacher,
                teacher_manifest.artifacts[checkpoint.name].sha256,
                store.root.parent / ".teacher-cache",
            )
        distill_loss = DistillLoss(
            recipe.distill, None if teacher.cfg.bidirectional else teacher, teacher_ndcg,
            targets_of=targets_of, negatives=_negatives(recipe), seed=recipe.train.seed,
        )  # fmt: skip
        loss_fn, on_eval = distill_loss, distill_loss.on_eval
    init_model = warm_start(teacher, student_cfg, parent) if recipe.init == "teacher" else None
    log(
        f"student {student_cfg.model_dump()} from {parent}; "
        f"{'labels only' if loss_fn is None else recipe.distill.strategy}"
        f"{'; starting from the teacher' if init_model is not None else ''}"
    )
    # The teacher by its checkpoint's checksum: a retrained teacher may get the same name@1.
    teacher_sha = teacher_manifest.artifacts[checkpoint.name].sha256
    distill = "labels" if recipe.distill is None else recipe.distill.model_dump_json()
    resume = resume_at(store, recipe.name, f"{teacher_sha} {distill} init={recipe.init}")
    result = train(
        student_cfg,
        recipe.train,
        split,
        loss_fn=loss_fn,
        progress=progress,
        log=log,
        on_eval=on_eval,
        input_len=max(teacher.cfg.max_len, student_cfg.max_len),
        init_model=init_model,
        resume=resume,
    )
    teacher_params = teacher.num_parameters()
    extra = {
        "teacher_params": float(teacher_params),
        "params_ratio": result.model.num_parameters() / teacher_params,
    }
    if "test_ndcg@10" in teacher_manifest.metrics:
        extra["teacher_test_ndcg@10"] = teacher_manifest.metrics["test_ndcg@10"]
    # The teacher's data spec travels along, so the student can be evaluated on its own.
    recipe_dump: dict[str, Any] = {**recipe.model_dump(), "data": teacher_manifest.recipe["data"]}
    if recipe.distill is not None:
        recipe_dump["schedule_events"] = distill_loss.state.events
    return evaluate_and_publish(
        store,
        recipe.name,
        result,
        data,
        split,
        kind="student" if recipe.distill is not None else "student-labels-only",
        parent=parent,
        recipe=recipe_dump,
        wall_s=result.wall_s,
        extra_metrics=extra,
        resume=resume,
    )


def _bidirectional_targets(
    manifest: Manifest, folder: Path, n_items: int, store: ModelStore
) -> Callable[..., Any]:
    """A bidirectional teacher's targets: it predicts at a [mask] appended after each prefix,
    one pass per training position, so they are computed once from its ONNX graph and cached
    on disk like an external teacher's (`compression.distill.external_targets`)."""
    from functools import partial

    from compression.distill.external import ExternalTeacher, IdJoin
    from compression.distill.external_targets import external_targets

    ref = f"{manifest.name}@{manifest.version}"
    if "model.onnx" not in manifest.artifacts:
        raise ValueError(
            f"{ref}: a bidirectional teacher is distilled through its ONNX graph; run "
            f"`recsys export {ref}` first"
        )
    same_ids = IdJoin(np.arange(n_items + 1, dtype=np.int64), [], 0)
    teacher = ExternalTeacher(folder / "model.onnx", same_ids, n_items)
    context = int(manifest.architecture["max_len"])
    cache = store.root.parent / ".teacher-cache"
    return partial(external_targets, teacher, context=context, cache_dir=cache)


def _negatives(recipe: StudentRecipe) -> int | None:
    """A student trained with a sampled loss also samples its distillation normaliser."""
    return recipe.train.negatives if recipe.train.loss != "full" else None


def distill_from_external(
    recipe: StudentRecipe,
    data_spec: DataSpec,
    teacher_onnx: Path,
    teacher_items: Path,
    store: ModelStore,
    *,
    context: int = 200,
    progress: bool = True,
    log: Callable[[str], None] = print,
    parent: str | None = None,
) -> TrainReport:
    """Distil an ONNX teacher trained elsewhere (`compression.distill.external`) into the
    student of `recipe` on `data_spec`'s data. Its targets are cached on disk next to the
    store (`.teacher-cache/`) and reused by every student of the same teacher and data; the
    manifest names the teacher by its file's sha256."""
    from functools import partial

    import onnx

    from compression.distill.external import load_external_teacher, parameter_count
    from compression.distill.external_targets import external_targets
    from compression.distill.loss import DistillLoss
    from compression.evaluate.metrics import eval_batch_size, evaluate_scorer
    from compression.model.train import train

    if recipe.distill is None:
        raise ValueError("an external teacher is for distillation; drop --labels-only")
    data, split = spec_split(data_spec)
    teacher = load_external_teacher(teacher_onnx, teacher_items, data)
    log(f"teacher {teacher_onnx.name} (sha256 {teacher.sha256[:12]}…): {teacher.join.report()}")
    batch = eval_batch_size(data.n_items)
    t_valid = evaluate_scorer(teacher.scores, split, "valid", context, batch)
    t_test = evaluate_scorer(teacher.scores, split, "test", context, batch)
    log(f"teacher valid ndcg@10 {t_valid['ndcg@10']:.4f}, test {t_test['ndcg@10']:.4f}")
    cache = store.root.parent / ".teacher-cache"
    targets_of = partial(external_targets, teacher, context=context, cache_dir=cache)
    loss = DistillLoss(
        recipe.distill, None, t_valid["ndcg@10"], targets_of=targets_of,
        negatives=_negatives(recipe), seed=recipe.train.seed,
    )  # fmt: skip
    student_cfg = recipe.model_config_for(data.n_items)
    items_sha = hashlib.sha256(teacher_items.read_bytes()).hexdigest()
    what = [teacher.sha256, items_sha, str(context), data_spec.model_dump_json()]
    resume = resume_at(store, recipe.name, " ".join([*what, recipe.distill.model_dump_json()]))
    result = train(
        student_cfg, recipe.train, split, loss_fn=loss, progress=progress, log=log,
        on_eval=loss.on_eval, input_len=max(context, student_cfg.max_len), resume=resume,
    )  # fmt: skip
    teacher_params = parameter_count(onnx.load(str(teacher_onnx)))
    external = {
        "file": teacher_onnx.name,
        "sha256": teacher.sha256,
        "items_file": teacher_items.name,
        "items_sha256": items_sha,
        "context": context,
        "unknown_items": len(teacher.join.unknown_to_teacher),
    }
    return evaluate_and_publish(
        store, recipe.name, result, data, split, kind="student", parent=parent,
        recipe={**recipe.model_dump(), "teacher": "external", "external_teacher": external,
                "data": data_spec.model_dump(), "schedule_events": loss.state.events},
        wall_s=result.wall_s,
        resume=resume,
        extra_metrics={
            "teacher_test_ndcg@10": t_test["ndcg@10"],
            "teacher_valid_ndcg@10": t_valid["ndcg@10"],
            "teacher_params": float(teacher_params),
            "params_ratio": result.model.num_parameters() / max(teacher_params, 1),
        },
    )  # fmt: skip
