"""The shard store of a run folder: one set of files per image, written as each image finishes.

Under ``RUN_DIR/shards`` every image has ``<safe>.layers.parquet``, ``<safe>.units.parquet``,
``<safe>.maps.npz`` and ``<safe>.images.parquet`` (written in that order, each to a temporary name
and renamed, through :func:`segability.analysis.results.write_atomic`), or ``<safe>.error.json``
when it failed. An image is done when its images shard exists: a run killed at any moment leaves
only complete shards. ``shards/run.json`` holds the run's fingerprint (see
:mod:`segability.batch.fingerprint`). :func:`merge` turns the shards of the input images, in input
order, into the tables of the result folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from segability.analysis.results import (
    ERRORS,
    IMAGES,
    INPUT,
    LAYERS,
    RUN_FILE,
    SHARD_DIR,
    UNITS,
    SAResult,
    decode_maps,
    empty_table,
    read_table,
    typed,
    write_atomic,
)

__all__ = ["Item", "Outcome", "Stage", "ShardStore", "safe_name", "merge", "SHARD_KINDS"]

Stage = Literal["read", "model", "analysis", "not_run"]
# Shard kinds in the order they are written; "images" last, so it marks the image as done.
SHARD_KINDS = ("layers.parquet", "units.parquet", "maps.npz", "images.parquet")
ERROR_KIND = "error.json"
FILE_COLUMNS = ("file", "label_file")  # what a batch run adds to images.parquet


def safe_name(image_id: str) -> str:
    """A file-name-safe, collision-resistant shard name for an image id.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, leading dots and
    dashes go, the rest is cut to 64 characters, and a hash of the full id is appended, so no id
    (``../../x.nii.gz``, ``a/b``) can name a path outside the shard folder or collide with another.

    Example:
        >>> safe_name("../../etc/passwd").startswith("etc_passwd-")
        True
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id)).lstrip("._-")[:64] or "image"
    digest = hashlib.sha256(str(image_id).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{base}-{digest}"


@dataclass(frozen=True)
class Item:
    """One input: its position in the input order, id (the file name), file and label file ("" for none),
    and the image's other channel files, one per line ("" for none: nnU-Net's ``case_0001``, ...)."""

    index: int
    image_id: str
    file: str
    label: str
    channels: str = ""

    @property
    def image_files(self) -> str | list[str]:
        """The image file, or every channel file in order (what :func:`segability.io.load_item` takes)."""
        return [self.file, *self.channels.split("\n")] if self.channels else self.file


@dataclass
class Outcome:
    """What a worker made of one item: shard bytes by kind, or the stage, error and traceback of its failure."""

    index: int
    image_id: str
    file: str
    stage: Stage | Literal[""] = ""  # "" on success
    error: str = ""
    traceback: str = ""
    shards: dict[str, bytes] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.stage)


class ShardStore:
    """The per-image shard files of a run folder (``out/shards``)."""

    def __init__(self, out: Path):
        self.dir = Path(out) / SHARD_DIR
        self.run_file = self.dir / RUN_FILE

    def path(self, image_id: str, kind: str) -> Path:
        path = self.dir / f"{safe_name(image_id)}.{kind}"
        if path.parent != self.dir:  # safe_name never lets this happen; keep the guarantee explicit
            raise ValueError(f"unsafe shard name for image id {image_id!r}")
        return path

    def own_files(self) -> list[Path]:
        """The files of the store (shards, temporaries, ``run.json``); never a file of the user's."""
        if not self.dir.is_dir():
            return []
        kinds = (*SHARD_KINDS, ERROR_KIND)
        return [p for p in self.dir.iterdir() if p.name == RUN_FILE or p.name.endswith((".tmp", *kinds))]

    def clear(self) -> None:
        for p in self.own_files():
            p.unlink()

    def drop_partial(self) -> None:
        """Delete the temporary files a killed run left (never a complete shard)."""
        for p in self.own_files():
            if p.name.endswith(".tmp"):
                p.unlink()

    def done(self, image_id: str) -> bool:
        return self.path(image_id, "images.parquet").is_file()

    def write(self, outcome: Outcome) -> None:
        """Write an outcome's shards (the images shard last) or its error, replacing what was there."""
        self.dir.mkdir(parents=True, exist_ok=True)
        error_path = self.path(outcome.image_id, ERROR_KIND)
        if outcome.failed:
            for kind in SHARD_KINDS[::-1]:
                self.path(outcome.image_id, kind).unlink(missing_ok=True)
            payload = {"file": outcome.file, "image": outcome.image_id, "stage": outcome.stage,
                       "error": outcome.error, "traceback": outcome.traceback}  # fmt: skip
            write_atomic(error_path, json.dumps(payload).encode())
            return
        for kind in SHARD_KINDS:
            path = self.path(outcome.image_id, kind)
            if kind in outcome.shards:
                write_atomic(path, outcome.shards[kind])
            elif kind != "images.parquet":
                path.unlink(missing_ok=True)
        error_path.unlink(missing_ok=True)

    def error(self, image_id: str) -> dict[str, str] | None:
        """``{"stage", "error", "traceback"}`` of a failed image, None when it did not fail."""
        path = self.path(image_id, ERROR_KIND)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        # Error shards of an earlier version hold the stage in the message ("reading failed: ...").
        return {"stage": data.get("stage", "analysis"), "error": data["error"], "traceback": data.get("traceback", "")}

    def read(self, image_id: str) -> dict[str, Any]:
        """The tables (checked against their schemas) and kept maps of a done image."""
        out: dict[str, Any] = {}
        for kind, schema in (("layers", LAYERS), ("images", IMAGES), ("units", UNITS)):
            path = self.path(image_id, f"{kind}.parquet")
            out[kind] = read_table(path, schema) if path.is_file() else None
        maps_path = self.path(image_id, "maps.npz")
        out["maps"] = next(iter(decode_maps(maps_path.read_bytes()).values())) if maps_path.is_file() else None
        return out


def merge(store: ShardStore, items: Sequence[Item], units: bool) -> tuple[SAResult, pd.DataFrame]:
    """The shards of ``items``, in input order, as one result; and the errors table (:data:`ERRORS`).

    Tables are typed by their schemas also when no image succeeded (then they are empty).
    """
    layer_frames, image_frames, unit_frames, errors = [], [], [], []
    maps: dict[str, dict[str, Any]] = {}
    for item in items:
        if store.done(item.image_id):
            tables = store.read(item.image_id)
            layer_frames.append(tables["layers"])
            image_frames.append(tables["images"])
            if tables["units"] is not None:
                unit_frames.append(tables["units"])
            if tables["maps"] is not None:
                maps[item.image_id] = tables["maps"]
            continue
        error = store.error(item.image_id) or {"stage": "not_run", "error": "the run stopped before this file", "traceback": ""}
        errors.append({"file": item.file, **error})
    layers_df = typed(pd.concat(layer_frames, ignore_index=True), LAYERS) if layer_frames else empty_table(LAYERS)
    if image_frames:
        images_df = pd.concat(image_frames, ignore_index=True)
    else:
        images_df = empty_table(IMAGES).assign(**{c: pd.Series([], dtype=object) for c in FILE_COLUMNS})
    images_df = typed(images_df, IMAGES).astype({c: object for c in FILE_COLUMNS})
    units_df = None
    if units:
        units_df = typed(pd.concat(unit_frames, ignore_index=True), UNITS) if unit_frames else empty_table(UNITS)
    settings: dict[str, Any] = {}
    if len(layers_df):
        order = layers_df.drop_duplicates("layer").sort_values("depth", kind="stable")
        settings["layers"] = [str(n) for n in order["layer"]]
        shape = layers_df.loc[layers_df["layer"] == INPUT, "shape"]
        settings["spatial_dims"] = len(str(shape.iloc[0]).split("x")) - 1 if len(shape) else None
    result = SAResult(layers=layers_df, images=images_df, units=units_df, maps=maps, settings=settings)
    errors_df = typed(pd.DataFrame(errors, columns=ERRORS.names), ERRORS)
    return result, errors_df
