"""`recsys`: the one composition root that reaches both offline and online code.

Imports are lazy so that commands which never train (`store`, later `serve`) never load
PyTorch. Every user mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, evaluate, store and serve Transformer recommenders.",
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect the model store.")
app.add_typer(store_app, name="store")

DEFAULT_STORE = "model_store/models"
StoreOpt = Annotated[
    Path,
    typer.Option(
        "--store", envvar="RECSYS_STORE", help="Model store root folder.", show_default=True
    ),
]
# A generic CSV/Parquet event log names its columns (DataSpec); other formats are detected.
UserColOpt = Annotated[str | None, typer.Option(help="Event log: user column.")]
ItemColOpt = Annotated[str | None, typer.Option(help="Event log: item column.")]
TimeColOpt = Annotated[str | None, typer.Option(help="Event log: timestamp column.")]


def _data_spec(path: str, user_col: str | None, item_col: str | None, time_col: str | None) -> Any:
    """The data section from `--data` and the column flags, validated (exit 2 on a bad one)."""
    from compression.configs import DataSpec

    cols = {"user_col": user_col, "item_col": item_col, "time_col": time_col}
    return _validated(DataSpec, {"path": path, **cols})


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output gets rich's 80-column default, which wraps the metric tables.
    return console if console.is_terminal else Console(width=120)


def _bars(progress: bool) -> bool:
    """Progress bars only on a terminal: redirected to a log file they print nothing useful
    (a build with bars logged nothing for its whole first hour), so log lines go there."""
    return progress and sys.stderr.isatty() and sys.stdout.isatty()


def _quiet(_message: str) -> None:
    """Per-epoch log sink for the demo: its tables say what matters."""


class UserError(Exception):
    """A problem the user can fix; shown as one line, exit code 2."""


def _store(path: Path) -> Any:
    from model_store.store import ModelStore

    return ModelStore(path)


def reports_dir(store: Path) -> Path:
    """Where `build` and `compare` write reports by default: `reports/` next to the store's
    root (model_store/models -> model_store/reports, ignored by git), never the source tree."""
    return Path(store).parent / "reports"


def _recipe_with_overrides(recipe_path: Path | None, **overrides: Any) -> Any:
    from compression.configs import TeacherRecipe, load_recipe

    base = load_recipe(str(recipe_path)) if recipe_path else TeacherRecipe()
    raw = base.model_dump()
    # Each flag belongs to one recipe section; `--data` is the data section's `path`.
    data_keys = {"user_col", "item_col", "time_col", "min_user_count", "min_item_count"}
    model_keys = {"max_len", "hidden", "n_blocks", "n_heads", "ffn", "dropout"}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "name":
            raw["name"] = value
        elif key == "data_path":
            raw["data"]["path"] = value
        elif key in data_keys:
            raw["data"][key] = value
        elif key in model_keys:
            raw["model"][key] = value
        else:
            raw["train"][key] = value
    return _validated(TeacherRecipe, raw)


def _validated(kind: Any, raw: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from compression.configs import validation_message

    try:
        return kind(**raw)
    except ValidationError as exc:
        raise UserError(validation_message(exc)) from None


def _metrics_table(title: str, rows: list[tuple[str, dict[str, float], str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR", "notes"):
        table.add_column(col, justify="left" if col in ("model", "notes") else "right")
    for label, m, notes in rows:
        table.add_row(
            label,
            *(f"{m[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")),
            notes,
        )
    _console().print(table)


def _report_model(report: Any, stage: str = "test") -> None:
    ref = f"{report.manifest.name}@{report.manifest.version}"
    _metrics_table(
        f"{stage} set, full ranking over {report.manifest.dataset.n_items:,} items, "
        f"history masked ({report.manifest.dataset.name})",
        [
            (
                ref,
                report.test,
                f"{report.params:,} params, {report.epochs} epochs (best {report.best_epoch}), "
                f"{report.wall_s:.0f} s",
            ),
            ("popularity", report.popularity_test, "baseline"),
        ],
    )


@app.command()
def train(
    recipe: Annotated[
        Path | None, typer.Option(help="TOML recipe (see recipes/); flags override it.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data file or 'synthetic[:users=..,items=..]'.")
    ] = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    time_col: TimeColOpt = None,
    min_user_count: Annotated[
        int | None, typer.Option(help="Event log: drop users with fewer events (k-core).")
    ] = None,
    min_item_count: Annotated[
        int | None, typer.Option(help="Event log: drop items with fewer events (k-core).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name in the store.")] = None,
    max_len: Annotated[int | None, typer.Option(help="Most recent items the model reads.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden size.")] = None,
    n_blocks: Annotated[int | None, typer.Option(help="Transformer blocks.")] = None,
    n_heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout rate.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Epoch limit.")] = None,
    time_limit_s: Annotated[float | None, typer.Option(help="Wall-time limit.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
    progress: Annotated[
        bool, typer.Option(help="Progress bars on a terminal (log lines elsewhere).")
    ] = True,
) -> None:
    """Train a SASRec teacher, evaluate it (full ranking) and publish it to the store."""
    from compression.pipeline import train_teacher

    cfg = _recipe_with_overrides(
        recipe,
        data_path=data,
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        min_user_count=min_user_count,
        min_item_count=min_item_count,
        name=name,
        max_len=max_len,
        hidden=hidden,
        n_blocks=n_blocks,
        n_heads=n_heads,
        dropout=dropout,
        max_epochs=max_epochs,
        time_limit_s=time_limit_s,
        seed=seed,
    )
    report = train_teacher(cfg, _store(store), progress=_bars(progress))
    _report_model(report)


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Stored model: NAME, NAME@VERSION or NAME@latest.")],
    data: Annotated[
        str | None, typer.Option(help="Data file; default: the data set in the manifest's recipe.")
    ] = None,
    stage: Annotated[str, typer.Option(help="'test' or 'valid'.")] = "test",
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Evaluate a stored model with full ranking, next to the popularity baseline."""
    if stage not in ("test", "valid"):
        raise UserError(f"--stage must be 'test' or 'valid', got {stage!r}")
    from compression.data.sequences import leave_one_out
    from compression.evaluate.metrics import evaluate_model, evaluate_popularity
    from compression.model.train import load_checkpoint, stored_checkpoint
    from compression.pipeline import load_model_data

    manifest, folder = _store(store).load(model)
    checkpoint = stored_checkpoint(manifest, folder, "evaluate")
    dataset = load_model_data(manifest, data)
    split = leave_one_out(dataset)
    net = load_checkpoint(checkpoint)
    _metrics_table(
        f"{stage} set, full ranking over {dataset.n_items:,} items, history masked "
        f"({dataset.name})",
        [
            (f"{manifest.name}@{manifest.version}", evaluate_model(net, split, stage), ""),
            ("popularity", evaluate_popularity(split, stage), "baseline"),
        ],
    )


@store_app.command("list")
def store_list(store: StoreOpt = Path(DEFAULT_STORE)) -> None:
    """List every stored model version with its headline metrics."""
    from rich.table import Table

    manifests = _store(store).list()
    if not manifests:
        typer.echo(f"no models in {store}")
        return
    table = Table(title=f"model store: {store}")
    for col in ("model", "kind", "parent", "data set", "params", "HR@10", "NDCG@10", "created"):
        table.add_column(col)
    for m in manifests:
        metrics = m.metrics
        table.add_row(
            f"{m.name}@{m.version}",
            m.kind,
            m.parent or "-",
            m.dataset.name,
            f"{int(metrics['params']):,}" if "params" in metrics else "-",
            f"{metrics['test_hr@10']:.4f}" if "test_hr@10" in metrics else "-",
            f"{metrics['test_ndcg@10']:.4f}" if "test_ndcg@10" in metrics else "-",
            m.created_at,
        )
    _console().print(table)


@store_app.command("show")
def store_show(
    model: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@latest.")],
    store: StoreOpt = Path(DEFAULT_STORE),
    verify: Annotated[bool, typer.Option(help="Check every artifact's sha256.")] = True,
) -> None:
    """Print a model's manifest (JSON), after verifying its artifacts."""
    s = _store(store)
    manifest, _ = s.load(model) if verify else s.resolve(model)
    typer.echo(manifest.to_json().rstrip())


@app.command()
def distill(
    recipe: Annotated[Path, typer.Option(help="Student TOML recipe (see recipes/).")],
    teacher: Annotated[
        str | None, typer.Option(help="Override the recipe's teacher: NAME@VERSION.")
    ] = None,
    labels_only: Annotated[
        bool, typer.Option(help="Train the same student from labels only (the control).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Override the student's store name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the recipe's random seed.")] = None,
    teacher_onnx: Annotated[
        Path | None,
        typer.Option(help="An ONNX teacher trained elsewhere (int64 history -> scores)."),
    ] = None,
    teacher_items: Annotated[
        Path | None, typer.Option(help="With --teacher-onnx: its item ids, in id order.")
    ] = None,
    teacher_context: Annotated[
        int, typer.Option(help="With --teacher-onnx: most recent items it reads.", min=1)
    ] = 200,
    data: Annotated[
        str | None, typer.Option(help="With --teacher-onnx: the data file to distil on.")
    ] = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    time_col: TimeColOpt = None,
    store: StoreOpt = Path(DEFAULT_STORE),
    progress: Annotated[
        bool, typer.Option(help="Progress bars on a terminal (log lines elsewhere).")
    ] = True,
) -> None:
    """Distil a teacher into a smaller student and publish it: a stored teacher (parent =
    teacher), or an ONNX teacher from elsewhere (--teacher-onnx, --teacher-items, --data)."""
    from compression.configs import StudentRecipe, load_recipe
    from compression.pipeline import distill_from_external, distill_student

    data_flags = {"--data": data, "--user-col": user_col, "--item-col": item_col,
                  "--time-col": time_col, "--teacher-items": teacher_items}  # fmt: skip
    stray = [flag for flag, value in data_flags.items() if value is not None]
    if teacher_onnx is None and stray:
        # A stored teacher brings its own data; silently ignoring these would mislead.
        raise UserError(f"{', '.join(stray)} only apply with --teacher-onnx MODEL.onnx")
    cfg = load_recipe(str(recipe), StudentRecipe)
    updates: dict[str, Any] = {}
    if teacher is not None:
        updates["teacher"] = teacher
    if labels_only:
        updates["distill"] = None
    if name is not None:
        updates["name"] = name
    if seed is not None:
        updates["train"] = {**cfg.train.model_dump(), "seed": seed}
    if updates:
        cfg = _validated(StudentRecipe, {**cfg.model_dump(), **updates})
    if teacher_onnx is not None:
        if teacher_items is None or data is None:
            raise UserError("--teacher-onnx needs --teacher-items FILE and --data PATH")
        spec = _data_spec(data, user_col, item_col, time_col)
        report = distill_from_external(
            cfg, spec, teacher_onnx, teacher_items, _store(store),
            context=teacher_context, progress=_bars(progress),
        )  # fmt: skip
    else:
        report = distill_student(cfg, _store(store), progress=_bars(progress))
    _report_model(report)
    typer.echo(
        f"published {report.manifest.name}@{report.manifest.version} "
        f"(parent {report.manifest.parent}, "
        f"{report.manifest.metrics['params_ratio']:.3f} of the teacher's parameters, "
        f"NDCG@10 retention {report.manifest.metrics.get('ndcg_retention', float('nan')):.1%})"
    )


@app.command()
def export(
    model: Annotated[
        str, typer.Argument(help="Stored model with a model.safetensors: NAME@VERSION.")
    ],
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Publish a new version that adds a parity-checked model.onnx and popularity counts."""
    from compression.variants import export_stored

    m = export_stored(_store(store), model)
    typer.echo(
        f"published {m.name}@{m.version} (parent {m.parent}); ONNX top-10 agreement with "
        f"PyTorch {m.metrics['parity_top10_agreement']:.4f}"
    )


@app.command("import-onnx")
def import_onnx(
    model: Annotated[Path, typer.Argument(help="ONNX model: int64 history -> item scores.")],
    items: Annotated[Path, typer.Option(help="Its item ids in id order (lines, or CSV item_id).")],
    data: Annotated[str, typer.Option(help="The data (event log or sequence file) to serve.")],
    name: Annotated[str, typer.Option(help="Store name of the imported model.")],
    context: Annotated[int, typer.Option(help="Most recent items it reads.", min=1)] = 200,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    time_col: TimeColOpt = None,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Import a recommender trained elsewhere (checked against the teacher contract, its ids
    joined to the data's) as a stored model: served, compared and compressed like ours."""
    from compression.external import import_external

    spec = _data_spec(data, user_col, item_col, time_col)
    m = import_external(_store(store), model, items, spec, name, context=context)
    typer.echo(
        f"published {m.name}@{m.version}: test NDCG@10 {m.metrics['test_ndcg@10']:.4f}, "
        f"{m.recipe['external_teacher']['unknown_items']} data items unknown to it"
    )


# A start for `--index`; the benchmark page (docs/results/*two-stage*) has the measured trade-offs.
DEFAULT_INDEXES = {
    "hnsw": {"type": "hnsw", "m": 32, "ef_construction": 100, "ef_search": 64},
    "ivf": {"type": "ivf", "nlist": 1024, "nprobe": 16, "encoding": "sq8"},
}


@app.command("two-stage")
def two_stage(
    model: Annotated[
        str, typer.Argument(help="Stored model with a model.safetensors: NAME@VERSION.")
    ],
    precision: Annotated[str, typer.Option(help="Item matrix: 'int8' or 'fp32'.")] = "int8",
    index: Annotated[
        str | None,
        typer.Option(help="Approximate index: 'hnsw', 'ivf' or a JSON object of its settings."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Store name of the variant.")] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Publish a two-stage variant (user vector + item matrix, optional FAISS index) for
    large catalogues, evaluated like every model."""
    import json

    from compression.two_stage import two_stage_variant
    from model_store.manifest import HnswParams, IvfParams

    if precision not in ("int8", "fp32"):
        raise UserError(f"--precision {precision!r}: expected 'int8' or 'fp32'")
    params: dict[str, Any] | None = None
    if index is not None:
        try:
            params = DEFAULT_INDEXES.get(index) or json.loads(index)
        except json.JSONDecodeError:
            params = None
        kinds = {"hnsw": HnswParams, "ivf": IvfParams}
        if not isinstance(params, dict) or params.get("type") not in kinds:
            raise UserError(
                f"--index {index!r}: expected 'hnsw', 'ivf' or a JSON object with "
                '"type": "hnsw" or "ivf" and its settings'
            )
        _validated(kinds[params["type"]], params)
    m = two_stage_variant(
        _store(store),
        model,
        precision=precision,
        index=params,
        name=name,  # type: ignore[arg-type]
    )
    recall = m.metrics.get("index_recall@10")
    typer.echo(
        f"published {m.name}@{m.version} (parent {m.parent}): test NDCG@10 "
        f"{m.metrics['test_ndcg@10']:.4f}"
        + (f", index recall@10 {recall:.4f}" if recall is not None else "")
    )


def parse_block_size(value: str) -> int | None:
    """`--block-size`: 'column' or one of MatMulNBits' block sizes; anything else exits 2."""
    from compression.quantize.int4 import BLOCK_SIZES

    if value == "column":
        return None
    if value.isdigit() and int(value) in BLOCK_SIZES:
        return int(value)
    sizes = "/".join(map(str, BLOCK_SIZES))
    raise typer.BadParameter(
        f"{value!r}: use 'column' or one of {sizes}", param_hint="--block-size"
    )


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Stored model with a model.onnx: NAME@VERSION.")],
    mode: Annotated[
        str, typer.Option(help="'dynamic', 'static' (INT8), 'int4' (4-bit weights) or 'fp16'.")
    ] = "dynamic",
    per_channel: Annotated[bool, typer.Option(help="One weight scale per column.")] = False,
    calibration: Annotated[
        str, typer.Option(help="Static: 'minmax', 'entropy' or 'percentile'.")
    ] = "minmax",
    adaptive: Annotated[
        bool, typer.Option(help="Keep the most harmful nodes in float until the budget holds.")
    ] = False,
    max_ndcg_loss: Annotated[
        float, typer.Option(help="Adaptive budget: relative validation NDCG@10 loss.")
    ] = 0.01,
    item_matrix: Annotated[
        bool, typer.Option(help="Store the item matrix as int8 with one scale per row first.")
    ] = False,
    block_size: Annotated[
        str,
        typer.Option(help="int4: 'column' (one scale per output column) or 16/32/64/128 inputs."),
    ] = "column",
    qat_epochs: Annotated[
        int,
        typer.Option(
            min=0,
            help="int4: first fine-tune this many epochs with fake int4 weights (needs the "
            "stored PyTorch checkpoint); 0 = post-training rounding only.",
        ),
    ] = 0,
    name: Annotated[str | None, typer.Option(help="Store name of the variant.")] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Publish an INT8, 4-bit or FP16 variant of a stored model, evaluated like every model."""
    from compression.variants import fp16_variant, int4_variant, qat_variant, quantize_variant

    s = _store(store)
    if (block_size != "column" or qat_epochs) and mode != "int4":
        raise UserError(f"--block-size and --qat-epochs apply to --mode int4, not {mode!r}")
    if mode == "fp16":
        m = fp16_variant(s, model, name=name)
    elif mode == "int4" and qat_epochs:
        m = qat_variant(s, model, qat_epochs, parse_block_size(block_size), name=name)
    elif mode == "int4":
        m = int4_variant(s, model, parse_block_size(block_size), name=name)
    else:
        fields: dict[str, Any] = {"mode": mode, "per_channel": per_channel,
                                  "adaptive": adaptive, "max_ndcg_loss": max_ndcg_loss}  # fmt: skip
        if mode == "static":
            fields["calibration"] = calibration
        from compression.quantize.int8 import QuantizeConfig

        cfg = _validated(QuantizeConfig, fields)
        m = quantize_variant(s, model, cfg, item_matrix=item_matrix, name=name)
    typer.echo(
        f"published {m.name}@{m.version} (parent {m.parent}): test NDCG@10 "
        f"{m.metrics['test_ndcg@10']:.4f}, {m.metrics['model_bytes']:,.0f} bytes "
        f"(parent {m.metrics['parent_model_bytes']:,.0f}), top-10 agreement "
        f"{m.metrics['top10_agreement_vs_parent']:.3f}"
    )


# The demo's data: 500 items in 20 "tastes", histories of 20-150 items in which the next item
# depends mostly on the last one (compression/data/synthetic.py), so a one-block student that reads
# the last 20 items (with successor lists, the project's best student family) matches a
# two-block teacher that reads 150, at about a tenth of its latency. Measured 2026-12-06 on
# 2 cores: teacher 0.6709 NDCG@10, distilled 0.6742, its INT8 0.6736 at 8.6x, labels-only
# 0.6692; 49 s wall on a quiet machine, 2.5 min on a loaded one (epoch budgets: same numbers).
DEMO_DATA = "synthetic:users=1500,items=500,min_len=20,max_len=150,clusters=20,seed=0"
DEMO_TEACHER = {"max_len": 150, "hidden": 64, "n_blocks": 2, "n_heads": 2, "dropout": 0.2,
                "successors": 3, "successor_lags": 2}  # fmt: skip
DEMO_STUDENT = {"max_len": 20, "hidden": 32, "n_blocks": 1, "n_heads": 1, "dropout": 0.0,
                "successors": 3, "successor_lags": 2}  # fmt: skip
# Budgets in epochs, so the demo's numbers do not depend on how busy the machine is (with a
# 60 s limit, a loaded machine gave the distilled student half the epochs of the labels-only
# one: a distillation epoch also runs the teacher). The time limits only guard the minutes.
DEMO_STUDENT_TRAIN = {"max_epochs": 30, "patience": 3, "time_limit_s": 120, "lr": 0.005}


def demo_recipe(data: str) -> Any:
    """The whole job on a small scale: what `recsys build` does with a real recipe."""
    from compression.build import BuildRecipe

    return BuildRecipe(
        family="demo",
        data={"path": data},
        teacher={
            "model": DEMO_TEACHER,
            "train": {"max_epochs": 12, "patience": 4, "time_limit_s": 120, "lr": 0.005},
        },
        students=[
            {"name": "demo-student", "model": DEMO_STUDENT, "train": DEMO_STUDENT_TRAIN,
             "distill": {"alpha": 1.0, "temperature": 1.0, "beta": 1.0, "top_k": 50}},
            {"name": "demo-student-labels", "model": DEMO_STUDENT, "train": DEMO_STUDENT_TRAIN},
        ],
        quantize=[
            {"source": "demo-teacher", "config": {"mode": "dynamic"}},
            {"source": "demo-student", "item_matrix": True, "config": {"mode": "dynamic"}},
        ],
        compare={"batch_sizes": [1, 64]},
    )  # fmt: skip


def _build_and_report(
    recipe: Any,
    store: Path,
    progress: bool,
    repeats: tuple[int, int],
    out: Path | None = None,
    show: bool = True,
) -> Any:
    """Build, compare, write the report (and print it with `show`); return the report."""
    from compression.pipeline import shared_splits

    # The build and its report read and split the data once, and check each model once.
    s = _store(store)
    with shared_splits(), s.verify_once():
        return _build_and_report_once(recipe, s, store, progress, repeats, out, show)


def _build_and_report_once(
    recipe: Any, s: Any, store: Path, progress: bool, repeats: tuple[int, int],
    out: Path | None, show: bool,
) -> Any:  # fmt: skip
    from compression.build import run_build
    from compression.report.compare import compare_family, write_report

    built = run_build(recipe, s, progress=progress, log=_quiet if progress else typer.echo)
    typer.echo(f"built {len(built)} models in {store}: {', '.join(sorted(built))}")
    if recipe.compare is None:
        return None
    teacher = built[recipe.teacher_name]
    cmp = recipe.compare
    report = compare_family(
        s, f"{teacher.name}@{teacher.version}", batch_sizes=cmp.batch_sizes,
        threads=cmp.threads, visit_runs=cmp.visit_runs,
        repeats={b: repeats[0] if b == 1 else repeats[1] for b in cmp.batch_sizes},
        log=lambda msg: typer.echo(msg, err=True),
    )  # fmt: skip
    folder = out or (Path(cmp.out) if cmp.out else reports_dir(store))
    paths = write_report(report, folder, f"compare-{recipe.family}")
    if show:
        typer.echo(report.markdown().rstrip())
    typer.echo(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return report


@app.command()
def build(
    recipe: Annotated[Path, typer.Option(help="Build recipe TOML (see recipes/ml1m.toml).")],
    data: Annotated[str | None, typer.Option(help="Override the recipe's data path.")] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
    progress: Annotated[
        bool, typer.Option(help="Progress bars on a terminal (log lines elsewhere).")
    ] = True,
    repeats_b1: Annotated[int, typer.Option(help="Report: timed runs at batch 1.")] = 200,
    repeats_b64: Annotated[int, typer.Option(help="Report: timed runs at larger batches.")] = 50,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Report folder; default the recipe's [compare] out, else reports/ next to the "
            "store (model_store/reports for the default store)."
        ),
    ] = None,
) -> None:
    """Teacher -> students -> quantized/pruned/FP16 variants -> evaluation -> store -> report,
    reusing every step the store already holds."""
    from compression.build import load_build_recipe

    cfg = load_build_recipe(recipe)
    if data is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data})})
    _build_and_report(cfg, store, _bars(progress), (repeats_b1, repeats_b64), out)


@app.command()
def demo(
    store: StoreOpt = Path(DEFAULT_STORE),
    data: Annotated[str, typer.Option(help="Data set for the demo.")] = DEMO_DATA,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The whole job on embedded synthetic data (about two minutes on 2 cores): teacher,
    distilled and labels-only students, INT8 variants, evaluation, store, comparison report;
    ends with a short table and the command that serves teacher and INT8 student."""
    recipe = demo_recipe(data)
    # Reports next to the store, not into the repository's committed benchmark results.
    out = str(Path(store).parent / "reports")
    recipe = recipe.model_copy(update={"compare": recipe.compare.model_copy(update={"out": out})})
    report = _build_and_report(recipe, store, progress, (100, 20), show=False)
    typer.echo(f"inspect with: recsys store list --store {store}")
    typer.echo("")
    typer.echo(demo_summary(report, store))


DEMO_ROWS = (
    ("demo-teacher", "teacher"),
    ("demo-student", "student (distilled)"),
    ("demo-student-int8-dynamic", "student INT8"),
    ("demo-student-labels", "control: labels only"),
)


def demo_summary(report: Any, store: Path) -> str:
    """The demo's last words: one short table and the command that serves teacher and INT8
    student side by side (full report: the markdown and JSON next to the store)."""
    by_name = {v.ref.split("@")[0]: v for v in report.variants}
    lines = [
        f"{'variant':<21} {'model':<29} {'params':>7} {'bytes':>8} {'NDCG@10':>7} "
        f"{'retained':>8} {'p50 b=1':>9} {'speedup':>7}",
    ]
    for name, label in DEMO_ROWS:
        v = by_name.get(name)
        if v is None:
            continue
        lat = v.latency.get(1)
        lines.append(
            f"{label:<21} {v.ref:<29} {v.params or 0:>7,.0f} {v.onnx_bytes:>8,} "
            f"{v.test_ndcg10 or 0:>7.4f} {(v.ndcg_retention or 0):>8.1%} "
            f"{f'{lat.p50_ms:.3f} ms' if lat else '-':>9} {v.speedup.get(1, 0):>6.1f}x"
        )
    threads = "thread" if report.threads == 1 else "threads"
    lines.append(
        f"(test set, full ranking; ONNX Runtime, {report.threads} {threads}, batch 1, "
        f"warm; full report in {Path(store).parent / 'reports'})"
    )
    teacher, small = by_name.get("demo-teacher"), by_name.get("demo-student-int8-dynamic")
    if teacher is not None and small is not None:
        lines += [
            "",
            "serve teacher and INT8 student side by side:",
            f"recsys serve --store {store} --variant full={teacher.ref} "
            f"--variant small={small.ref} --port 8000",
        ]
    return "\n".join(lines)


@app.command()
def serve(
    variant: Annotated[
        list[str] | None,
        typer.Option(help="NAME=MODEL_REF, repeatable, e.g. --variant full=ml1m-teacher@1."),
    ] = None,
    weight: Annotated[
        list[str] | None, typer.Option(help="NAME=WEIGHT traffic share, repeatable.")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="Model store root folder.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Dynamic batch limit.")] = None,
    max_wait_s: Annotated[float | None, typer.Option(help="Batch wait from first request.")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads per model.")] = None,
) -> None:
    """Serve stored models over HTTP (settings from RECSYS_* environment, flags win)."""
    import logging

    import uvicorn
    from pydantic import ValidationError

    from app.main import create_app
    from app.settings import Settings

    env: dict[str, Any] = {}
    if variant:
        env["variants"] = _pairs(variant, "--variant", str)
    if weight:
        env["weights"] = _pairs(weight, "--weight", float)
    for key, value in {"store": store, "host": host, "port": port,
                       "intra_op_threads": threads}.items():  # fmt: skip
        if value is not None:
            env[key] = str(value) if key == "store" else value
    try:
        settings = Settings(**env)
        if max_batch_size is not None or max_wait_s is not None:
            batch = settings.batch.model_dump()
            batch.update({k: v for k, v in {"max_batch_size": max_batch_size,
                          "max_wait_s": max_wait_s}.items() if v is not None})  # fmt: skip
            settings = Settings(**{**env, "batch": batch})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f".{p}" for p in err["loc"])
        raise UserError(f"settings{where}: {err['msg']}") from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings, torch_factory=_torch_module),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # one log line per request costs ~40% of the throughput
        loop="uvloop",
        http="httptools",
    )


def _torch_module(architecture: dict[str, Any]) -> Any:
    """The service's torch engine factory: the stored architecture as a PyTorch module (its
    weights come from the version's safetensors). Imports `compression` only when called,
    i.e. when the torch engine is chosen (engine "torch", or "auto" without model.onnx)."""
    from compression.configs import ModelConfig
    from compression.model.sasrec import SASRec

    return SASRec(ModelConfig.from_stored(architecture)).eval()


def _pairs(values: list[str], flag: str, cast: Any) -> dict[str, Any]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserError(f"{flag} {item!r}: expected NAME=VALUE")
        try:
            out[name] = cast(value)
        except ValueError:
            raise UserError(f"{flag} {item!r}: {value!r} is not a valid value") from None
    return out


@app.command()
def compare(
    teacher: Annotated[
        str, typer.Argument(help="Teacher of the family: NAME, NAME@latest or NAME@VERSION.")
    ],
    store: StoreOpt = Path(DEFAULT_STORE),
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the JSON, markdown and PNG; default reports/ next to the store "
            "(model_store/reports for the default store)."
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="ONNX Runtime intra-op threads, all models (service default: 1).")
    ] = 1,
    visit_runs: Annotated[
        int,
        typer.Option(
            help="Consecutive calls per visit of a model, the first untimed (warm cache, as "
            "in a service); 1 times single calls in rotation (cold cache)."
        ),
    ] = 11,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", help="Batch size to time (repeatable).")
    ] = None,
    repeats_b1: Annotated[int, typer.Option(help="Timed runs per model at batch 1.")] = 200,
    repeats_b64: Annotated[
        int, typer.Option(help="Timed runs per model at every batch size above 1.")
    ] = 50,
    histories: Annotated[
        int, typer.Option(help="Test histories for agreement and latency inputs.")
    ] = 512,
    all_versions: Annotated[
        bool, typer.Option(help="Compare every version of a name, not only the newest.")
    ] = False,
    stem: Annotated[
        str | None, typer.Option(help="File name stem; default compare-<name>-<version>.")
    ] = None,
) -> None:
    """Compare a teacher with every stored model made from it: quality, agreement, latency."""
    from compression.report.compare import compare_family, write_report

    sizes = batch_size or [1, 64]
    report = compare_family(
        _store(store),
        teacher,
        batch_sizes=sizes,
        threads=threads,
        visit_runs=visit_runs,
        repeats={b: repeats_b1 if b == 1 else repeats_b64 for b in sizes},
        n_histories=histories,
        all_versions=all_versions,
        log=lambda msg: typer.echo(msg, err=True),
    )
    paths = write_report(report, out or reports_dir(store), stem)
    typer.echo(report.markdown().rstrip())
    typer.echo(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")


@app.command("export-triton")
def export_triton_cmd(
    model: Annotated[
        list[str] | None,
        typer.Argument(help="NAME, NAME@latest or NAME@VERSION; default: latest of every name."),
    ] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
    out: Annotated[Path, typer.Option(help="Triton model repository folder to write.")] = Path(
        "triton_models"
    ),
    max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Write stored ONNX models / TensorRT engines as a Triton Inference Server repository."""
    from compression.export.triton import export_triton

    written = export_triton(
        _store(store), model or None, out, max_batch_size=max_batch_size, overwrite=overwrite
    )
    for path in written:
        typer.echo(f"wrote {path}")


def main() -> None:
    """Console entry point: one line and exit 2 for every user error, never a traceback."""
    from compression.data.sequences import DataError
    from model_store.manifest import ManifestError
    from model_store.store import StoreError

    os.environ.setdefault("TQDM_MININTERVAL", "1")
    try:
        app(standalone_mode=False)
    except (UserError, DataError, ManifestError, StoreError, ValueError) as exc:
        typer.echo(f"error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(2)
    except Exception as exc:
        # Click's usage errors (typer may vendor its own copy of click, so match by shape).
        if type(exc).__name__ == "Abort":
            typer.echo("aborted", err=True)
            sys.exit(130)
        if not hasattr(exc, "format_message"):
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
