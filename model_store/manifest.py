"""The manifest of one published model version (DESIGN.md §3).

Pure stdlib + pydantic: the serving app reads manifests and must not need PyTorch or numpy.
Every model forbids unknown keys and is strict (no "1" -> 1 coercion), so a typo or a manifest
written by a newer schema fails loudly instead of being half-understood.
"""

import json
import re
import types
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The newest schema this code reads. A version is written with the lowest schema that can
# express it (the store writes 1 unless a scorer is set), so an older service still reads every
# full-score version published by newer code, and refuses a two-stage one by its version number
# instead of half-understanding it.
SCHEMA_VERSION = 2
# Keys a schema added, for the "unknown key" message of a manifest that declares an older one.
ADDED_IN = {2: ("scorer",)}
MANIFEST_FILE = "manifest.json"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# A parent is pinned to a version: "name@latest" would make provenance drift over time.
PARENT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}@[1-9][0-9]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

# allow_inf_nan=False: JSON has no NaN/Infinity, so such a value could not be written and read back.
_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
NonEmpty = Annotated[str, Field(min_length=1)]


class ManifestError(ValueError):
    """An invalid manifest file; the one-line message names the file and the problem."""


class TensorSpec(BaseModel):
    model_config = _CONFIG

    name: NonEmpty
    dtype: NonEmpty  # e.g. "int64", "float32"
    shape: list[Annotated[int, Field(ge=0)] | NonEmpty]  # a str is a dynamic axis, e.g. "batch"


class Signature(BaseModel):
    model_config = _CONFIG

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class DatasetInfo(BaseModel):
    model_config = _CONFIG

    name: NonEmpty
    sha256: Sha256
    n_users: int = Field(ge=0)
    n_items: int = Field(ge=1)
    n_interactions: int = Field(ge=0)


class ArtifactInfo(BaseModel):
    model_config = _CONFIG

    format: Literal["pytorch", "onnx", "tensorrt", "json", "npz", "npy", "faiss", "other"]
    precision: NonEmpty = "fp32"
    sha256: Sha256
    size_bytes: int = Field(ge=0)
    # A TensorRT engine runs only with the TensorRT version and GPU it was built for.
    tensorrt_version: str | None = None
    compute_capability: str | None = None


class HnswParams(BaseModel):
    """A FAISS `IndexHNSWFlat` over the item rows (inner product)."""

    model_config = _CONFIG

    type: Literal["hnsw"]
    m: int = Field(ge=2, le=256)  # graph neighbours per node
    ef_construction: int = Field(ge=1)
    ef_search: int = Field(ge=1)  # raised to the number of results asked for when smaller


class IvfParams(BaseModel):
    """A FAISS inverted-file index (`IndexIVFFlat` or `IndexIVFScalarQuantizer` QT_8bit)."""

    model_config = _CONFIG

    type: Literal["ivf"]
    nlist: int = Field(ge=1)  # k-means cells
    nprobe: int = Field(ge=1)  # cells searched per query
    encoding: Literal["flat", "sq8"]


IndexParams = Annotated[HnswParams | IvfParams, Field(discriminator="type")]


class ScorerInfo(BaseModel):
    """How a two-stage variant ranks: `model.onnx` maps the history to a user vector
    `[batch, dim]` (output `user_vector`); the item matrix scores it (schema_version 2).

    The item matrix (`item_matrix`, .npy) holds rows 0..n_items (row 0 = padding) in blocks of
    `block_rows` rows, each block stored transposed: shape `[n_blocks, dim, block_rows]`, the
    last block zero-padded. Blocks are what the scorer multiplies, so the file is memory-mapped
    and used without a copy. int8 rows come with one float32 scale per row (`item_scales`,
    shape `[n_items + 1]`): row i = int8 row i * scale[i]. `kind` "exact" scores every row;
    "ann" searches `index` (FAISS, built at publish time over rows 1..n_items) and rescores
    what it finds with the matrix. A manifest without `scorer` is a full-score model.
    """

    model_config = _CONFIG

    kind: Literal["exact", "ann"]
    dim: int = Field(ge=1)
    precision: Literal["fp32", "int8"]
    block_rows: int = Field(ge=1)
    item_matrix: NonEmpty
    item_scales: NonEmpty | None = None
    index: NonEmpty | None = None
    index_params: IndexParams | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ScorerInfo":
        if (self.precision == "int8") != (self.item_scales is not None):
            raise ValueError("item_scales is required for precision 'int8' and only for it")
        if (self.kind == "ann") != (self.index is not None and self.index_params is not None):
            raise ValueError("kind 'ann' needs index and index_params; 'exact' takes neither")
        return self

    def files(self) -> list[str]:
        """The artifact names this scorer reads."""
        return [f for f in (self.item_matrix, self.item_scales, self.index) if f is not None]


def check_file_name(name: str) -> str:
    """Raise ValueError unless `name` is a plain file name that is safe inside a version folder."""
    if not name or len(name) > 255 or any(c in name for c in "/\\\0"):
        raise ValueError(f"artifact name {name!r} must be a plain file name (no '/', '\\', NUL)")
    # A leading dot also rules out "." and ".." and keeps artifacts apart from hidden temp files.
    if name.startswith("."):
        raise ValueError(f"artifact name {name!r} must not start with '.'")
    if name == MANIFEST_FILE:
        raise ValueError(f"artifact name {name!r} is reserved for the manifest itself")
    return name


class Manifest(BaseModel):
    model_config = _CONFIG

    schema_version: Literal[1, 2]
    name: str
    version: int = Field(ge=1)
    created_at: str  # ISO-8601 UTC, set by the store
    kind: NonEmpty  # e.g. "teacher", "student", "quantized"
    parent: str | None  # "name@version" it was made from
    architecture: dict[str, Any]  # the model config ("model_config" is reserved by pydantic)
    recipe: dict[str, Any]
    dataset: DatasetInfo
    signature: Signature | None = None
    metrics: dict[str, float]
    artifacts: dict[str, ArtifactInfo]  # keyed by file name inside the version folder
    item_mapping: str = "items.json"
    scorer: ScorerInfo | None = None  # None: the model scores every item itself

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # The name becomes a folder name, so it is kept to a safe, portable alphabet.
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError("must be 1-64 characters of a-z 0-9 . _ - starting with a-z or 0-9")
        return value

    @field_validator("parent")
    @classmethod
    def _pinned_parent(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(PARENT_PATTERN, value):
            raise ValueError("must be 'name@<version>', e.g. 'sasrec-teacher@3'")
        return value

    @field_validator("created_at")
    @classmethod
    def _utc_timestamp(cls, value: str) -> str:
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO-8601 timestamp") from None
        if stamp.utcoffset() != timedelta(0):
            raise ValueError("must be UTC (end in 'Z' or '+00:00')")
        return value

    @field_validator("artifacts")
    @classmethod
    def _plain_file_names(cls, value: dict[str, ArtifactInfo]) -> dict[str, ArtifactInfo]:
        for name in value:
            check_file_name(name)
        return value

    @model_validator(mode="after")
    def _item_mapping_is_an_artifact(self) -> "Manifest":
        # The service cannot turn scores into item ids without the mapping, so it must ship.
        if self.item_mapping not in self.artifacts:
            raise ValueError(
                f"item_mapping {self.item_mapping!r} is not among the artifacts "
                f"({', '.join(sorted(self.artifacts)) or 'none'})"
            )
        return self

    @model_validator(mode="after")
    def _scorer_files_are_artifacts(self) -> "Manifest":
        if self.scorer is None:
            return self
        if self.schema_version < 2:
            raise ValueError(
                f"key 'scorer' needs schema_version 2 (this manifest says {self.schema_version}); "
                "publish it again with this version of the store"
            )
        missing = [f for f in self.scorer.files() if f not in self.artifacts]
        if missing:
            raise ValueError(
                f"scorer names {missing[0]!r}, which is not among the artifacts "
                f"({', '.join(sorted(self.artifacts))})"
            )
        return self

    def to_json(self) -> str:
        """The manifest as it is written to manifest.json (indented, trailing newline)."""
        return self.model_dump_json(indent=2) + "\n"


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest.json; OSError if unreadable, ManifestError if invalid."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {format_validation_error(exc, _declared(data))}") from exc


def _declared(data: bytes) -> int:
    """The schema_version a manifest declares (SCHEMA_VERSION when it says none usable)."""
    try:
        version = json.loads(data).get("schema_version")
    except (ValueError, AttributeError):
        return SCHEMA_VERSION
    return version if type(version) is int and 1 <= version <= SCHEMA_VERSION else SCHEMA_VERSION


def format_validation_error(exc: ValidationError, schema_version: int = SCHEMA_VERSION) -> str:
    """One line for humans: the most telling error in plain words, plus how many more.

    Unknown keys come first (a misspelt key also shows up as a missing one, and the
    misspelling is what the user must fix); pydantic's own order differs between releases.
    """
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    text = _describe(errors[0], schema_version)
    if len(errors) > 1:
        text += f" (+{len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return text


def _describe(error: Any, schema_version: int) -> str:
    loc = tuple(error["loc"])
    where = _dotted(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        later = {key for v, keys in ADDED_IN.items() if v > schema_version for key in keys}
        fields = [f for f in (parent.model_fields if parent else ()) if f not in later]
        allowed = ", ".join(fields) or "?"
        inside = f" in {_dotted(loc[:-1])}" if len(loc) > 1 else ""
        allows = f"schema_version {schema_version} allows: {allowed}"
        return f"unknown key {loc[-1]!r}{inside} ({allows})"
    if kind == "missing":
        return f"missing required key {where!r}"
    if loc == ("schema_version",) and kind == "literal_error":
        return (
            f"unsupported schema_version {error['input']!r} "
            f"(this code reads schema_version 1 to {SCHEMA_VERSION})"
        )
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = repr(value)
    if isinstance(value, str | int | float | bool) and shown not in message:
        message += f" (got {shown[:57] + '...' if len(shown) > 60 else shown})"
    return f"{where}: {message}" if where else message


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the object at `loc`, to list the keys it allows."""
    tp: Any = Manifest
    for part in loc:
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _strip_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        members = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp
