"""`recsys build`: one recipe -> teacher, students, compressed variants, evaluation, store,
report. A step whose result the store already holds (same name, same parent, same settings)
is reused, so a rerun after a crash or an edit only does what changed.

Recipe (TOML):

    family = "ml1m"
    fp16 = ["<source>"]    # FP16 graphs (GPU serving); top-level keys come before any table
    context = [{source = "<name>", max_len = 50}]   # read only the most recent items
    [data]                 # as in a teacher recipe
    [teacher]              # model = {...}, train = {...}: published as "<family>-teacher"
    [external_teacher]     # instead of [teacher]: onnx, items, context, name (an ONNX model
                           # from elsewhere, imported; docs/distillation.md#external-teachers)
    [[students]]           # name, model, train, distill (omit distill: labels only)
    [[quantize]]           # source (a model name of this build), name, item_matrix, config
    [[prune]]              # source, name, config = {heads_keep, ffn_keep, ...}, train, distill
    [[int4]]               # source, name, block_size, qat_epochs (docs/compression.md)
    [compare]              # batch_sizes, threads: the report over the whole family, written
                           # to `out`, default the store's reports/ folder (`<store>/../reports`)

A teacher or student section may instead name a standalone recipe, resolved relative to
the build recipe's folder, so that the build makes exactly the model that recipe makes
(never a copy that drifts from it):

    [teacher]
    recipe = "ml1m-teacher.toml"       # its name, model and train; its data must equal [data]
    [[students]]
    recipe = "ml1m-student.toml"       # name, model, train, distill, init; its teacher must be
                                       # this build's teacher (any version)
    [[students]]                       # the labels-only control, as `recsys distill
    recipe = "ml1m-student.toml"       # --labels-only --name ...`: the only two keys
    labels_only = true                 # allowed next to `recipe`
    name = "ml1m-student-labels"
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compression.configs import (
    NAME_PATTERN,
    DataSpec,
    DistillConfig,
    ModelFields,
    StudentRecipe,
    TeacherRecipe,
    TrainConfig,
    load_recipe,
    validation_message,
    without_retired,
)
from model_store.manifest import Manifest
from model_store.store import CHECKPOINT_FILE, ModelStore, StoreError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherStep(_Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default <family>-teacher")
    model: ModelFields = Field(default_factory=dict)
    train: TrainConfig = TrainConfig()


class ExternalTeacherStep(_Strict):
    """A teacher trained elsewhere, instead of `[teacher]` (compression.distill.external)."""

    onnx: str = Field(description="ONNX file: int64 history of its ids -> scores")
    items: str = Field(description="its item ids in id order (lines, or CSV item_id)")
    context: int = Field(200, ge=1, description="most recent items it reads")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default <family>-teacher")


class StudentStep(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    model: ModelFields = Field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    distill: DistillConfig | None = None
    init: Literal["random", "teacher"] = "random"  # see StudentRecipe.init


class QuantizeStep(_Strict):
    source: str = Field(pattern=NAME_PATTERN, description="a model name of this build")
    name: str | None = Field(None, pattern=NAME_PATTERN)
    item_matrix: bool = Field(False, description="int8 item matrix, one scale per row, first")
    # The rest is a QuantizeConfig (mode, per_channel, calibration, adaptive, ...).
    config: dict[str, Any] = Field(default_factory=dict)


class Int4Step(_Strict):
    source: str = Field(pattern=NAME_PATTERN, description="a model name of this build")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default <source>-int4")
    block_size: Literal[16, 32, 64, 128] | None = Field(
        None, description="inputs per scale in the block MatMuls; None = one per output column"
    )
    qat_epochs: int = Field(
        0, ge=0, description="fake-int4 fine-tune epochs first (PyTorch models); 0 = none"
    )


class PruneStep(_Strict):
    source: str = Field(pattern=NAME_PATTERN)
    name: str | None = Field(None, pattern=NAME_PATTERN)
    config: dict[str, Any] = Field(default_factory=dict)  # a PruneConfig
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig(alpha=1.0, temperature=1.0)


class ContextStep(_Strict):
    source: str = Field(pattern=NAME_PATTERN)
    max_len: int = Field(ge=1, description="most recent items the variant reads")
    name: str | None = Field(None, pattern=NAME_PATTERN)


class CompareStep(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads (service: 1)")
    visit_runs: int = Field(11, ge=1, description="calls per visit, first untimed; 1 = cold")
    out: str | None = Field(
        None, description="report folder; None = the store's reports/ (recsys build --out wins)"
    )


class BuildRecipe(_Strict):
    family: str = Field(pattern=NAME_PATTERN)
    data: DataSpec = DataSpec()
    teacher: TeacherStep = TeacherStep()
    external_teacher: ExternalTeacherStep | None = None
    students: list[StudentStep] = Field(default_factory=list)
    quantize: list[QuantizeStep] = Field(default_factory=list)
    int4: list[Int4Step] = Field(default_factory=list)
    prune: list[PruneStep] = Field(default_factory=list)
    fp16: list[str] = Field(default_factory=list)
    context: list[ContextStep] = Field(default_factory=list)
    compare: CompareStep | None = CompareStep()

    @property
    def teacher_name(self) -> str:
        """The family's teacher in the store: trained here or imported."""
        step = self.external_teacher or self.teacher
        return step.name or f"{self.family}-teacher"


def load_build_recipe(path: str | Path) -> BuildRecipe:
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{file}: recipe not found; pass a file under recipes/") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{file}: not a readable TOML recipe ({exc})") from None
    if "teacher" in raw and "external_teacher" in raw:
        raise ValueError(
            f"{file}: [teacher] and [external_teacher] both set; a build has one teacher: "
            "keep the one you mean"
        )
    try:
        raw, teacher_ref, student_refs = _resolve_references(raw, file)
        recipe = BuildRecipe(**raw)
        for step in recipe.quantize:
            _quantize_config(step)
        for step in recipe.prune:
            _prune_config(step)
    except ValidationError as exc:
        raise ValueError(f"{file}: {validation_message(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None
    if teacher_ref is not None and teacher_ref.data != recipe.data:
        theirs, ours = (
            d.model_dump(exclude_defaults=True) for d in (teacher_ref.data, recipe.data)
        )
        raise ValueError(
            f"{file}: teacher.recipe reads data {theirs}, this build's [data] is {ours}; make "
            "them equal"
        )
    teacher_name = recipe.teacher.name or f"{recipe.family}-teacher"
    for where, ref in student_refs:
        if ref.teacher.split("@")[0] != teacher_name:
            raise ValueError(
                f"{file}: {where}.recipe distils teacher {ref.teacher!r}, this build's teacher "
                f"is {teacher_name!r}"
            )
    return recipe


# Keys a student section may set next to `recipe`: what `recsys distill` may override too.
_STUDENT_OVERRIDES = {"name", "labels_only"}


def _resolve_references(
    raw: dict[str, Any], file: Path
) -> tuple[dict[str, Any], TeacherRecipe | None, list[tuple[str, StudentRecipe]]]:
    """`raw` with each `recipe = "<file>"` teacher or student section replaced by that
    recipe's settings (module docstring); also the recipes read, for the checks that need
    the validated build. Problems are ValueErrors naming the section."""
    raw = dict(raw)
    teacher_ref = None
    teacher = raw.get("teacher")
    if isinstance(teacher, dict) and "recipe" in teacher:
        extra = sorted(set(teacher) - {"recipe"})
        if extra:
            raise ValueError(
                f"teacher: recipe = {teacher['recipe']!r} sets the whole teacher; remove "
                f"{', '.join(extra)} or drop `recipe` and write the section out"
            )
        teacher_ref = _referenced(file, "teacher", teacher["recipe"], TeacherRecipe)
        raw["teacher"] = {
            "name": teacher_ref.name,
            "model": teacher_ref.model,
            "train": teacher_ref.train,
        }
    student_refs: list[tuple[str, StudentRecipe]] = []
    students = raw.get("students")
    if isinstance(students, list):
        raw["students"] = list(students)
        for i, entry in enumerate(students):
            if not (isinstance(entry, dict) and "recipe" in entry):
                continue
            where = f"students.{i}"
            extra = sorted(set(entry) - {"recipe"} - _STUDENT_OVERRIDES)
            if extra:
                raise ValueError(
                    f"{where}: recipe = {entry['recipe']!r} sets the whole student (only "
                    f"name and labels_only may be added); remove {', '.join(extra)} or drop "
                    "`recipe` and write the section out"
                )
            if not isinstance(entry.get("labels_only", False), bool):
                raise ValueError(f"{where}.labels_only: expected true or false")
            ref = _referenced(file, where, entry["recipe"], StudentRecipe)
            student_refs.append((where, ref))
            raw["students"][i] = {
                "name": entry.get("name", ref.name),
                "model": ref.model,
                "train": ref.train,
                "distill": None if entry.get("labels_only") else ref.distill,
                "init": ref.init,
            }
    return raw, teacher_ref, student_refs


def _referenced(file: Path, where: str, ref: object, kind: type[Any]) -> Any:
    """The standalone recipe `ref` names, relative to the build recipe's folder."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{where}.recipe: expected a path to a recipe file, got {ref!r}")
    target = file.parent / ref
    try:
        return load_recipe(str(target), kind)
    except ValueError as exc:
        raise ValueError(f"{where}.recipe: {exc}") from None


def _quantize_config(step: QuantizeStep) -> Any:
    from compression.quantize.int8 import QuantizeConfig

    return QuantizeConfig(**step.config)


def _prune_config(step: PruneStep) -> Any:
    from compression.model.prune import PruneConfig

    return PruneConfig(**step.config)


def _existing(store: ModelStore, name: str, match: Callable[[Manifest], bool]) -> Manifest | None:
    """The latest stored version of `name` that `match` accepts."""
    if name not in store.names():
        return None
    for version in sorted(store.versions(name), reverse=True):
        manifest, _ = store.resolve(f"{name}@{version}")
        if match(manifest):
            return manifest
    return None


def _ref(m: Manifest) -> str:
    return f"{m.name}@{m.version}"


def _plain(config: BaseModel) -> dict[str, Any]:
    """A config as the store keeps it (through JSON: tuples become lists)."""
    return json.loads(config.model_dump_json())


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _settings(schema: type[BaseModel], stored: dict[str, Any], *drop: str) -> dict[str, Any] | None:
    """A stored recipe read through today's schema, so that a manifest written before a
    setting existed still matches a recipe that leaves it at its default; None if invalid."""
    current = without_retired(_without(stored, *drop))
    if current is None:
        return None
    try:
        return schema(**current).model_dump()
    except (ValidationError, TypeError):
        return None


def _graph_is_current(store: ModelStore, m: Manifest) -> bool:
    """True when `m`'s ONNX file comes from today's graph writer."""
    import onnx

    from compression.export.graph import PRODUCER

    _, folder = store.resolve(_ref(m))
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).producer_name == PRODUCER


def _with_onnx(store: ModelStore, m: Manifest, log: Callable[[str], None]) -> Manifest:
    """`m`, or a re-export of its checkpoint (made now if missing) when `m` has no ONNX graph
    or one written by PyTorch's exporter: `compression/export/graph.py` computes the same
    scores with fewer nodes, faster per call. Variants made from the old graph are then
    rebuilt from the new one (their parent changed); fine-tunes of the weights are not."""
    from compression.variants import export_stored

    if "model.onnx" in m.artifacts and (
        CHECKPOINT_FILE not in m.artifacts or _graph_is_current(store, m)
    ):
        return m

    def current_export(x: Manifest) -> bool:
        return x.recipe.get("exported_from") == _ref(m) and _graph_is_current(store, x)

    found = _existing(store, m.name, current_export)
    if found is None:
        found = export_stored(store, _ref(m))
        log(f"{m.name}: exported {_ref(m)} to ONNX as {_ref(found)}")
    return found


def _same_weights(store: ModelStore, m: Manifest) -> set[str]:
    """`m` and every stored re-export of the same checkpoint (`exported_from`)."""
    origin = m.recipe.get("exported_from", _ref(m))
    refs = {origin, _ref(m)}
    for version in store.versions(m.name):
        other, _ = store.resolve(f"{m.name}@{version}")
        if other.recipe.get("exported_from") == origin:
            refs.add(_ref(other))
    return refs


def run_build(
    recipe: BuildRecipe,
    store: ModelStore,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Manifest]:
    """Every step of the recipe, in order; returns model name -> manifest built or reused.
    The data set is loaded and split once for all of them (`shared_splits`), and each
    stored parent's files are checked once (`ModelStore.verify_once`)."""
    from compression.pipeline import shared_splits

    with shared_splits(), store.verify_once():
        return _run_steps(recipe, store, progress, log)


def _run_steps(
    recipe: BuildRecipe, store: ModelStore, progress: bool, log: Callable[[str], None]
) -> dict[str, Manifest]:
    from compression.pipeline import distill_student, train_teacher

    built: dict[str, Manifest] = {}

    def source(name: str) -> str:
        if name not in built:
            raise ValueError(f"step source {name!r} is not a model of this build: {sorted(built)}")
        return _ref(built[name])

    def reuse(name: str, match: Callable[[Manifest], bool]) -> Manifest | None:
        found = _existing(store, name, match)
        if found is not None:
            log(f"{name}: reusing {_ref(found)} from the store")
        return found

    if recipe.external_teacher is not None:
        _external_steps(recipe, store, built, reuse, progress, log)
        return _variant_steps(recipe, store, built, source, reuse, log)
    teacher_recipe = TeacherRecipe(
        name=recipe.teacher_name, data=recipe.data,
        model=recipe.teacher.model,
        train=recipe.teacher.train,
    )  # fmt: skip
    want = teacher_recipe.model_dump()
    trained = reuse(
        teacher_recipe.name, lambda m: _settings(TeacherRecipe, m.recipe, "stopped_by") == want
    )
    if trained is None:
        trained = train_teacher(teacher_recipe, store, progress, log).manifest
    teacher = _with_onnx(store, trained, log)
    built[teacher.name] = teacher
    # Students distilled from any version holding these weights are students of this one.
    teacher_refs = _same_weights(store, teacher)

    for step in recipe.students:
        student = StudentRecipe(
            name=step.name, teacher=_ref(teacher), model=step.model, train=step.train,
            distill=step.distill, init=step.init,
        )  # fmt: skip
        want_s = _without(student.model_dump(), "teacher")

        def same_student(m: Manifest, w: dict[str, Any] = want_s) -> bool:
            mine = _settings(StudentRecipe, m.recipe, "data", "schedule_events", "stopped_by")
            return m.recipe.get("teacher") in teacher_refs and _without(mine or {}, "teacher") == w

        found = reuse(step.name, same_student)
        if found is None:
            found = distill_student(student, store, progress, log).manifest
        built[step.name] = _with_onnx(store, found, log)

    return _variant_steps(recipe, store, built, source, reuse, log)


def _variant_steps(
    recipe: BuildRecipe,
    store: ModelStore,
    built: dict[str, Manifest],
    source: Callable[[str], str],
    reuse: Callable[[str, Callable[[Manifest], bool]], Manifest | None],
    log: Callable[[str], None],
) -> dict[str, Manifest]:
    """The quantize, int4, prune, FP16 and context steps, on models `built` so far."""
    from compression.variants import (
        QAT_DISTILL,
        context_variant,
        fp16_variant,
        int4_suffix,
        int4_variant,
        prune_variant,
        qat_variant,
        quantize_variant,
    )

    for q in recipe.quantize:
        cfg = _quantize_config(q)
        parent = source(q.source)
        name = q.name or f"{q.source}-int8-{cfg.mode}"
        found = reuse(name, lambda m, c=cfg, p=parent, q=q: m.parent == p  # type: ignore[misc]
                      and m.recipe.get("quantize") == _plain(c)
                      and m.recipe.get("item_matrix_int8") == q.item_matrix)  # fmt: skip
        built[name] = found or quantize_variant(
            store, parent, cfg, item_matrix=q.item_matrix, name=name, log=log
        )

    for f_step in recipe.int4:
        parent = source(f_step.source)
        qat = f_step.qat_epochs
        suffix = int4_suffix(f_step.block_size)
        name = f_step.name or f"{f_step.source}-{'qat-' if qat else ''}{suffix}"
        want = {"block_size": f_step.block_size}
        same = _same_weights(store, built[f_step.source])

        def same_int4(
            m: Manifest, p: str = parent, w: Any = want, n: int = qat, s: Any = same
        ) -> bool:
            if m.recipe.get("int4") != w:
                return False
            if not n:
                return m.parent == p
            try:
                tuned, _ = store.resolve(m.parent or "")  # the fake-quant fine-tune
            except StoreError:
                return False
            qat = tuned.recipe.get("qat", {})
            grid = qat.get("epochs") == n and qat.get("block_size") == w["block_size"]
            return tuned.parent in s and grid and qat.get("distill") == QAT_DISTILL

        found = reuse(name, same_int4)
        if found is None and qat:
            found = qat_variant(store, parent, qat, f_step.block_size, name=name, log=log)
        built[name] = found or int4_variant(store, parent, f_step.block_size, name=name, log=log)

    for p_step in recipe.prune:
        cfg = _prune_config(p_step)
        parent = source(p_step.source)
        name = p_step.name or f"{p_step.source}-pruned"
        # A fine-tune of the same weights is reused whichever export of them it came from.
        same = _same_weights(store, built[p_step.source])
        found = reuse(name, lambda m, c=cfg, s=same: m.parent in s  # type: ignore[misc]
                      and m.recipe.get("prune") == _plain(c))  # fmt: skip
        built[name] = _with_onnx(store, found, log) if found else prune_variant(
            store, parent, cfg, name=name, train_cfg=p_step.train, distill_cfg=p_step.distill,
            log=log,
        )  # fmt: skip

    for src in recipe.fp16:
        parent = source(src)
        name = f"{src}-fp16"
        found = reuse(name, lambda m, p=parent: m.parent == p and m.kind == "fp16")  # type: ignore[misc]
        built[name] = found or fp16_variant(store, parent, name=name, log=log)
    for c in recipe.context:  # after the others: a context step may shorten any of them
        parent = source(c.source)
        name = c.name or f"{c.source}-ctx{c.max_len}"
        found = reuse(name, lambda m, p=parent, n=c.max_len: m.parent == p  # type: ignore[misc]
                      and m.recipe.get("context") == n)  # fmt: skip
        built[name] = found or context_variant(store, parent, c.max_len, name=name, log=log)
    return built


def _external_steps(
    recipe: BuildRecipe,
    store: ModelStore,
    built: dict[str, Manifest],
    reuse: Callable[[str, Callable[[Manifest], bool]], Manifest | None],
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """An external teacher imported as the family's teacher, its students distilled from
    the ONNX file itself; each reused when the store holds it for the same file and data."""
    import hashlib

    from compression.external import import_external
    from compression.pipeline import distill_from_external

    ext = recipe.external_teacher
    assert ext is not None
    onnx_path, items = Path(ext.onnx), Path(ext.items)
    if not onnx_path.is_file():
        raise ValueError(f"external_teacher.onnx: {ext.onnx} does not exist")
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    data = recipe.data.model_dump()

    items_sha = hashlib.sha256(items.read_bytes()).hexdigest() if items.is_file() else ""

    def same_teacher(m: Manifest) -> bool:
        mine = m.recipe.get("external_teacher") or {}
        return (mine.get("sha256"), mine.get("items_sha256"), mine.get("context")) == (
            sha,
            items_sha,
            ext.context,
        ) and m.recipe.get("data") == data

    name = recipe.teacher_name
    teacher = reuse(name, same_teacher)
    built[name] = teacher or import_external(
        store, onnx_path, items, recipe.data, name, context=ext.context, log=log
    )
    parent = _ref(built[name])
    for step in recipe.students:
        if step.init == "teacher":
            raise ValueError(
                f"students.{step.name}: init = 'teacher' copies a stored PyTorch teacher; an "
                "external teacher has no weights to copy: use init = 'random'"
            )
        student = StudentRecipe(
            name=step.name, teacher="external", model=step.model, train=step.train,
            distill=step.distill, init="random",
        )  # fmt: skip
        want = _without(student.model_dump(), "teacher")

        def same_student(m: Manifest, w: dict[str, Any] = want) -> bool:
            mine = _settings(StudentRecipe, m.recipe, "data", "schedule_events", "stopped_by",
                             "external_teacher")  # fmt: skip
            return same_teacher(m) and _without(mine or {}, "teacher") == w

        found = reuse(step.name, same_student)
        built[step.name] = found or distill_from_external(
            student, recipe.data, onnx_path, items, store, context=ext.context,
            progress=progress, log=log, parent=parent,
        ).manifest  # fmt: skip
