"""The operator's station: review a run's cases in the browser, and choose what to label next.

``segability review RUN_DIR`` serves a local web app over a run folder: a queue of cases, least
trusted first (:mod:`~segability.review.queue`), each case with its pictures
(:mod:`~segability.review.render`) and pages (:mod:`~segability.review.pages`), decisions kept in
``review.sqlite`` (:mod:`~segability.review.store`), routes in :mod:`~segability.review.app`.
``segability select RUN_DIR --budget N`` picks the images whose labels would help most
(:mod:`~segability.review.select`). The web parts need the ``review`` extra (starlette, uvicorn);
the store and the selection need nothing beyond segability.
"""

from __future__ import annotations

from segability.review.queue import Filters, ReviewRun
from segability.review.select import copy_chosen, greedy_k_centre, sa_profiles, select_for_labelling
from segability.review.store import DB_FILE, Decision, ReviewStore, export_decisions

__all__ = [
    "DB_FILE",
    "Decision",
    "Filters",
    "ReviewRun",
    "ReviewStore",
    "copy_chosen",
    "create_app",
    "export_decisions",
    "greedy_k_centre",
    "sa_profiles",
    "select_for_labelling",
]


def __getattr__(name: str):
    if name == "create_app":  # needs starlette: imported on first use
        from segability.review.app import create_app

        return create_app
    raise AttributeError(f"module 'segability.review' has no attribute {name!r}")
