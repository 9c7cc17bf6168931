"""Versioned, checksummed, atomically published model store (DESIGN.md §3).

Pure stdlib + pydantic: the serving app imports this without PyTorch or numpy.
"""

from model_store.item_ids import MAX_ITEM_ID_LENGTH, ItemIdError, check_item_ids
from model_store.manifest import (
    SCHEMA_VERSION,
    ArtifactInfo,
    DatasetInfo,
    Manifest,
    ManifestError,
    ScorerInfo,
    Signature,
    TensorSpec,
    load_manifest,
)
from model_store.store import ModelStore, StoreError, sha256_file

__all__ = [
    "MAX_ITEM_ID_LENGTH",
    "SCHEMA_VERSION",
    "ArtifactInfo",
    "DatasetInfo",
    "ItemIdError",
    "Manifest",
    "ManifestError",
    "ModelStore",
    "ScorerInfo",
    "Signature",
    "StoreError",
    "TensorSpec",
    "check_item_ids",
    "load_manifest",
    "sha256_file",
]
