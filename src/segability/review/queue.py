"""The review queue: a run folder's cases, least trusted first, and the filters over them.

A case is one image of the run. With the quality gate's ``qc.csv`` the queue is ordered by the
estimated Dice (lowest first); a run without it (older runs, or ``segability qc`` not run) is
ordered by mean SA against the prediction, and :attr:`ReviewRun.order_note` says so. Images whose
score is undefined (failed, or an empty prediction) come first: nothing vouches for them.

The tables are read through :func:`segability.analysis.results.read_table`, the kept maps through
:func:`segability.analysis.results.decode_maps`; nothing in the folder is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from segability.analysis.results import IMAGES, INPUT, LAYERS, QC, decode_maps, read_table
from segability.errors import UsageError

__all__ = ["Filters", "ReviewRun", "CLASS_COLUMN"]

CLASS_COLUMN = "class"
Reviewed = Literal["yes", "no"]


@dataclass(frozen=True)
class Filters:
    """Which cases of the queue to show; ``None`` shows all.

    Attributes:
        flagged: only cases the gate flagged (True) or did not (False).
        status: only cases with this status (the gate's, else the analysis').
        class_: only cases of this class (the ``class`` column, when the run has one).
        reviewed: ``"yes"`` only cases with a decision, ``"no"`` only those without.
        decision: only cases whose current decision is this one.
    """

    flagged: bool | None = None
    status: str | None = None
    class_: str | None = None
    reviewed: Reviewed | None = None
    decision: str | None = None

    def __post_init__(self) -> None:
        if self.reviewed not in (None, "yes", "no"):
            raise UsageError(f"reviewed must be 'yes', 'no' or None, got {self.reviewed!r}", argument="reviewed")

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        """Filters from a page's query string (unknown or empty values mean "all")."""
        flagged = {"yes": True, "no": False}.get(query.get("flagged", ""))
        reviewed = query.get("reviewed") if query.get("reviewed") in ("yes", "no") else None
        return cls(
            flagged=flagged,
            status=query.get("status") or None,
            class_=query.get("class") or None,
            reviewed=reviewed,  # type: ignore[arg-type]
            decision=query.get("decision") or None,
        )

    def query(self) -> dict[str, str]:
        """The filters as query parameters (only those set)."""
        out = {
            "flagged": None if self.flagged is None else ("yes" if self.flagged else "no"),
            "status": self.status,
            "class": self.class_,
            "reviewed": self.reviewed,
            "decision": self.decision,
        }
        return {k: v for k, v in out.items() if v is not None}


class ReviewRun:
    """A run folder read for review: its cases in queue order, layer scores, kept maps.

    Args:
        run_dir: a folder written by ``segability analyze`` (and ``segability qc``).

    Attributes:
        cases: one row per image, in queue order: ``image``, ``rank`` (1 = least trusted),
            ``estimated_dice``, ``lower``, ``upper``, ``flag``, ``status``, ``reason``, ``dice``,
            ``mean_sa_pred``, ``input_sa_pred``, and ``class`` / ``file`` when the run has them.
        order_by: the column the queue is ordered by (``estimated_dice`` or ``mean_sa_pred``).
        order_note: why, in words.
        has_qc: whether the run has ``qc.csv``.
        keep_maps: how many images' maps the run kept.

    Raises:
        FileNotFoundError: the folder lacks ``layers.parquet`` or ``images.parquet``.
        UsageError: a multi-class run (one decision per image needs one class).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir).resolve()
        for required in (LAYERS.file, IMAGES.file):
            if not (self.run_dir / required).is_file():
                raise FileNotFoundError(f"{self.run_dir} is not a segability run folder: {required} is missing")
        images = read_table(self.run_dir / IMAGES.file, IMAGES)
        if "class" in images.columns:
            raise UsageError(
                f"{self.run_dir} is a multi-class run (one row per image and class); the review station takes one "
                "decision per image: run `segability analyze` or `qc` with --target for the class to review",
                argument="run_dir",
            )
        self.layers = read_table(self.run_dir / LAYERS.file, LAYERS)
        settings_file = self.run_dir / "settings.json"
        self.settings: dict[str, Any] = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        maps_file = self.run_dir / "maps.npz"
        self.maps = decode_maps(maps_file) if maps_file.is_file() else {}
        self.keep_maps = int(self.settings.get("keep_maps", len(self.maps)) or 0)
        self.has_qc = (self.run_dir / QC.file).is_file()
        self.cases = self._cases(images)
        self._index = {image: i for i, image in enumerate(self.cases["image"])}

    def _cases(self, images: pd.DataFrame) -> pd.DataFrame:
        if "class_meta" in images.columns and CLASS_COLUMN not in images.columns:  # a metadata "class" (see analyze)
            images = images.rename(columns={"class_meta": CLASS_COLUMN})
        keep = ["image", "dice", "mean_sa_pred", "input_sa_pred", "status", "reason"]
        keep += [c for c in (CLASS_COLUMN, "file") if c in images.columns]
        cases = images[keep].copy()
        if self.has_qc:
            qc = read_table(self.run_dir / QC.file, QC)
            gate = qc[["image", "estimated_dice", "lower", "upper", "flag", "status", "reason"]]
            if CLASS_COLUMN in qc.columns and CLASS_COLUMN not in cases.columns:
                gate = gate.assign(**{CLASS_COLUMN: qc[CLASS_COLUMN]})
            cases = cases.drop(columns=["status", "reason"]).merge(gate, on="image", how="left")
            cases["flag"] = cases["flag"].fillna(False).astype(bool)
            cases["status"] = cases["status"].fillna("not_gated")
            cases["reason"] = cases["reason"].fillna("not in qc.csv")
            self.order_by = "estimated_dice"
            self.order_note = "Ordered by estimated Dice (qc.csv), lowest first."
        else:
            for column in ("estimated_dice", "lower", "upper"):
                cases[column] = np.nan
            cases["flag"] = False
            self.order_by = "mean_sa_pred"
            self.order_note = (
                "This run has no qc.csv (run `segability qc --run RUN_DIR` for estimated Dice), "
                "so the queue is ordered by mean SA against the prediction, lowest first."
            )
        if CLASS_COLUMN in cases.columns:
            cases[CLASS_COLUMN] = cases[CLASS_COLUMN].astype(str)
        # undefined scores first (nothing vouches for them), then lowest first; ties by image id
        score = cases[self.order_by].to_numpy(float)
        order = np.lexsort((cases["image"].to_numpy(str), np.nan_to_num(score, nan=-np.inf)))
        cases = cases.iloc[order].reset_index(drop=True)
        cases.insert(1, "rank", np.arange(1, len(cases) + 1))
        return cases

    # ------------------------------------------------------------------------------ lookup
    def __contains__(self, image: object) -> bool:
        return isinstance(image, str) and image in self._index

    def case(self, image: str) -> dict[str, Any]:
        """The row of one case as a dict.

        Raises:
            KeyError: ``image`` is not an image of this run.
        """
        return self.cases.iloc[self._index[image]].to_dict()

    @property
    def statuses(self) -> list[str]:
        """The statuses present, in queue order of first appearance."""
        return list(dict.fromkeys(self.cases["status"]))

    @property
    def classes(self) -> list[str]:
        """The classes present (empty without a ``class`` column)."""
        return sorted(set(self.cases[CLASS_COLUMN])) if CLASS_COLUMN in self.cases.columns else []

    def queue(self, filters: Filters, decisions: Mapping[str, Any]) -> pd.DataFrame:
        """The cases that pass ``filters``, in queue order; ``decisions`` maps image ids to their
        current decision (anything with a ``decision`` attribute)."""
        c = self.cases
        keep = np.ones(len(c), dtype=bool)
        if filters.flagged is not None:
            keep &= c["flag"].to_numpy(bool) == filters.flagged
        if filters.status is not None:
            keep &= (c["status"] == filters.status).to_numpy()
        if filters.class_ is not None and CLASS_COLUMN in c.columns:
            keep &= (c[CLASS_COLUMN] == filters.class_).to_numpy()
        decided = c["image"].map(lambda i: i in decisions).to_numpy(bool)
        if filters.reviewed == "yes":
            keep &= decided
        elif filters.reviewed == "no":
            keep &= ~decided
        if filters.decision is not None:
            keep &= c["image"].map(lambda i: i in decisions and decisions[i].decision == filters.decision).to_numpy(bool)
        return c[keep]

    def neighbour(self, image: str, filters: Filters, decisions: Mapping[str, Any], step: int = 1) -> str | None:
        """The case after (``step=1``) or before (``-1``) ``image`` in the filtered queue, or None.

        When ``image`` itself no longer passes the filters (it was just reviewed, say), the next
        case is the first one after it in the whole queue that does.
        """
        shown = self.queue(filters, decisions)
        ranks = shown["rank"].to_numpy()
        rank = int(self.case(image)["rank"])
        later = np.flatnonzero(ranks > rank) if step > 0 else np.flatnonzero(ranks < rank)[::-1]
        return str(shown["image"].iloc[later[0]]) if later.size else None

    # ------------------------------------------------------------------------------ layers
    def layer_scores(self, image: str) -> pd.DataFrame:
        """The hidden layers of one image by ``sa_pred``, lowest first (the layers that disagree
        most with the output); undefined scores last. Columns ``layer, depth, sa, sa_pred,
        status, kept`` (``kept``: the layer's map is in ``maps.npz``)."""
        rows = self.layers[(self.layers["image"] == image) & (self.layers["layer"] != INPUT)]
        rows = rows[["layer", "depth", "sa", "sa_pred", "status"]].copy()
        kept = self.maps.get(image, {}).get("layers", {})
        rows["kept"] = rows["layer"].map(lambda name: name in kept).astype(bool)
        score = rows["sa_pred"].to_numpy(float)
        order = np.lexsort((rows["depth"].to_numpy(), np.nan_to_num(score, nan=np.inf)))
        return rows.iloc[order].reset_index(drop=True)

    def maps_note(self, image: str) -> str | None:
        """Why an image has no kept maps (None when it has them)."""
        if image in self.maps:
            return None
        if self.keep_maps <= 0:
            return "This run kept no maps (keep_maps = 0): only the scores are shown."
        return (
            f"Maps were kept for the first {self.keep_maps} images of the run only "
            f"(keep_maps = {self.keep_maps}); this image is not one of them: only its scores are shown."
        )
