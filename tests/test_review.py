"""The review station (``segability review``) and the choice of images to label (``segability select``).

Run folders are made the way users make them: a tiny MONAI UNet analysed by ``segability.analyze``
on a few 32x32 images (maps kept for the first three) or two 16^3 volumes, and a ``qc.csv`` written
through its schema. The app is served by a real uvicorn server on 127.0.0.1 (a free port) in a
thread and spoken to over HTTP with ``http.client``, which sends a path exactly as written (a
``../`` is not tidied away before it reaches the server). The selection is checked on a run folder
written by hand (``SAResult(...).save``) whose SA profiles make the right choice computable by hand.
"""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import re
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from segability.analysis.results import QC, SAResult, write_table
from segability.cli.app import app as cli
from segability.errors import UsageError
from segability.review import (
    ReviewRun,
    ReviewStore,
    greedy_k_centre,
    sa_profiles,
    select_for_labelling,
)

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

MALICIOUS_ID = "<img src=x onerror=alert(1)>\"'&../../case"
MALICIOUS_NOTE = "</textarea><script>alert('note')</script>"
DB_FILES = {"review.sqlite", "review.sqlite-wal", "review.sqlite-shm"}


# ---------------------------------------------------------------------------------- fixtures
def _blobs(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    xs, ys = [], []
    for _ in range(n):
        centre = rng.uniform(6, np.array(shape) - 6).reshape(-1, *[1] * len(shape))
        mask = (((grid - centre) ** 2).sum(0) < rng.uniform(3, 6) ** 2).astype(np.float32)
        xs.append(mask + 0.3 * rng.standard_normal(shape).astype(np.float32))
        ys.append(mask)
    return torch.tensor(np.stack(xs))[:, None], torch.tensor(np.stack(ys))[:, None]


def make_run(root: Path, *, qc: bool = True, dims: int = 2, n: int = 6, keep_maps: int = 3) -> Path:
    """A run folder of a tiny UNet: ``n`` images (32x32, or 16^3 with ``dims=3``), a ``class``
    column, the malicious id on the second image, and (with ``qc``) a gate's ``qc.csv``."""
    from monai.networks.nets import UNet

    import segability

    torch.manual_seed(dims)
    model = UNet(spatial_dims=dims, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0)
    images, labels = _blobs(n, (32, 32) if dims == 2 else (16, 16, 16), seed=dims)
    ids = [f"case_{i:02d}" for i in range(n)]
    ids[1] = MALICIOUS_ID
    metadata = pd.DataFrame({"image": ids, "class": ["lesion" if i % 2 else "healthy" for i in range(n)]})
    result = segability.analyze(model, images, labels, keep_maps=keep_maps, ids=ids, metadata=metadata)
    result.save(root)
    if qc:
        img = result.images
        estimate = np.linspace(0.9, 0.2, n)[np.argsort(np.argsort(img["image"].to_numpy()))]  # not the row order
        table = pd.DataFrame({
            "image": img["image"],
            "estimated_dice": estimate,
            "lower": estimate - 0.1,
            "upper": np.minimum(estimate + 0.1, 1.0),
            "flag": estimate < 0.5,
            "status": np.where(estimate < 0.5, "model_fails", "ok"),
            "reason": np.where(estimate < 0.5, "estimated Dice <b>below</b> 0.5", ""),
            "mean_sa_pred": img["mean_sa_pred"],
            "input_sa_pred": img["input_sa_pred"],
        })  # fmt: skip
        write_table(table, root / QC.file, QC)
    return root


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("review") / "run2d")


class Served:
    """The review app on 127.0.0.1 in a thread (uvicorn), stopped by :meth:`stop`."""

    def __init__(self, run_dir: Path):
        from segability.review.app import create_app

        self.app = create_app(run_dir)
        self.token = self.app.state.token
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the review server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """``(status, headers, body)``; ``path`` is sent exactly as given."""
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            con.request(method, path, body=body, headers={"Host": f"127.0.0.1:{self.port}", **(headers or {})})
            r = con.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            con.close()

    def get(self, path: str) -> tuple[int, str]:
        status, _, body = self.request("GET", path)
        return status, body.decode("utf-8", "replace")

    def decide(self, image: str, decision: str, note: str = "", reviewer: str = "", token: str | None = None,
               headers: dict | None = None) -> tuple[int, dict]:  # fmt: skip
        body = json.dumps({"image": image, "decision": decision, "note": note, "reviewer": reviewer}).encode()
        sent = {"Content-Type": "application/json", "X-CSRF-Token": self.token if token is None else token,
                **(headers or {})}  # fmt: skip
        status, _, answer = self.request("POST", "/api/decide", body, sent)
        return status, json.loads(answer or b"{}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def served(run_2d):
    server = Served(run_2d)
    yield server
    server.stop()


def _rows(page: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'<tr data-image="([^"]*)"', page)]


def _rows_in_db(run_dir: Path) -> int:
    con = sqlite3.connect(run_dir / "review.sqlite")
    try:
        return con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    finally:
        con.close()


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in DB_FILES
    }


# ------------------------------------------------------------------------------------ queue
def test_queue_is_ordered_by_estimated_dice_least_trusted_first(served, run_2d):
    qc = pd.read_csv(run_2d / "qc.csv")
    status, page = served.get("/")
    assert status == 200
    assert _rows(page) == qc.sort_values("estimated_dice")["image"].tolist()
    assert "Ordered by estimated Dice" in page
    assert "0 of 6 reviewed" in page


def test_queue_filters(served, run_2d):
    qc = pd.read_csv(run_2d / "qc.csv").sort_values("estimated_dice")
    images = pd.read_parquet(run_2d / "images.parquet").set_index("image")
    assert _rows(served.get("/?flagged=yes")[1]) == qc[qc["flag"]]["image"].tolist()
    assert _rows(served.get("/?status=ok")[1]) == qc[qc["status"] == "ok"]["image"].tolist()
    lesion = [i for i in qc["image"] if images.loc[i, "class_meta"] == "lesion"]  # metadata "class" is kept as class_meta
    assert _rows(served.get("/?class=lesion")[1]) == lesion
    first = qc["image"].iloc[0]
    assert served.decide(first, "reject")[0] == 200
    assert _rows(served.get("/?reviewed=no")[1]) == qc["image"].iloc[1:].tolist()
    assert _rows(served.get("/?reviewed=yes")[1]) == [first]
    assert _rows(served.get("/?decision=reject")[1]) == [first]
    assert "1 of 6 reviewed" in served.get("/")[1]


def test_run_without_qc_opens_ordered_by_mean_sa_and_says_why(tmp_path, run_2d):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("layers.parquet", "images.parquet", "settings.json", "maps.npz"):
        (run / name).write_bytes((run_2d / name).read_bytes())
    server = Served(run)
    try:
        status, page = server.get("/")
    finally:
        server.stop()
    assert status == 200
    images = pd.read_parquet(run / "images.parquet")
    assert _rows(page) == images.sort_values("mean_sa_pred")["image"].tolist()
    assert "has no qc.csv" in page and "ordered by mean SA against the prediction" in page
    assert 'name="flagged"' not in page  # nothing to filter on without a gate


# -------------------------------------------------------------------------------- the case
def test_case_shows_the_scores_and_the_layers_that_disagree_most(served, run_2d):
    qc = pd.read_csv(run_2d / "qc.csv").set_index("image")
    layers = pd.read_parquet(run_2d / "layers.parquet")
    image = "case_00"  # maps kept
    status, page = served.get(f"/case?image={image}")
    assert status == 200
    assert f"{qc.loc[image, 'estimated_dice']:.3f} [{qc.loc[image, 'lower']:.2f}, {qc.loc[image, 'upper']:.2f}]" in page
    mine = layers[(layers["image"] == image) & (layers["layer"] != "input")].sort_values("sa_pred")
    captions = [html.unescape(c) for c in re.findall(r"<figcaption>([^<]*) · SA", page)]
    assert captions == mine["layer"].tolist()[:4]
    for panel in ("image", "prediction", "label"):
        assert f'data-panel="{panel}"' in page


def test_a_case_without_kept_maps_says_so(served):
    status, page = served.get("/case?image=case_05")  # the sixth image: maps kept for three
    assert status == 200
    assert "Maps were kept for the first 3 images of the run only" in page
    assert "<img" not in page


def test_pictures_are_pngs_and_3d_slices_differ(served, tmp_path):
    status, headers, body = served.request("GET", "/png?image=case_00&panel=prediction")
    assert status == 200 and headers["content-type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    run3 = make_run(tmp_path / "run3d", dims=3, n=2, keep_maps=1)
    server = Served(run3)
    try:
        shots = {s: server.request("GET", f"/png?image=case_00&panel=label&axis=2&slice={s}") for s in (4, 8)}
        assert all(st == 200 for st, _, _ in shots.values())
        assert shots[4][2] != shots[8][2]
        assert server.request("GET", "/png?image=case_00&panel=label&axis=0&slice=8")[2] != shots[8][2]
        assert server.request("GET", "/png?image=case_00&panel=label&axis=3&slice=1")[0] == 400
        assert server.request("GET", "/png?image=case_00&panel=label&axis=2&slice=16")[0] == 400
        assert server.request("GET", "/png?image=case_00&panel=label&slice=x")[0] == 400
        page = server.get("/case?image=case_00")[1]
        assert 'id="slice"' in page and 'id="axis"' in page
    finally:
        server.stop()


# -------------------------------------------------------------------------------- decisions
def test_a_decision_survives_a_restart(run_2d, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("layers.parquet", "images.parquet", "settings.json", "qc.csv"):
        (run / name).write_bytes((run_2d / name).read_bytes())
    first = Served(run)
    try:
        status, saved = first.decide("case_02", "needs_label", note="blurry edge", reviewer="ana")
    finally:
        first.stop()
    assert status == 200 and saved["decision"] == "needs_label"
    second = Served(run)
    try:
        page = second.get("/case?image=case_02")[1]
        assert 'data-decision="needs_label"' in page and "blurry edge" in page and "ana" in page
        assert second.token == first.token  # a page opened before the restart still posts
    finally:
        second.stop()


def test_concurrent_decisions_all_persist(served, run_2d):
    images = [f"case_{i:02d}" for i in (0, 2, 3, 4, 5)]
    before = _rows_in_db(run_2d)
    jobs = [(images[k % len(images)], ("accept", "reject", "needs_label")[k % 3], f"note {k}") for k in range(48)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: served.decide(job[0], job[1], note=job[2]), jobs))
    assert [status for status, _ in answers] == [200] * len(jobs)
    assert _rows_in_db(run_2d) == before + len(jobs)
    stored = {d.note for d in ReviewStore(run_2d).history()}
    assert {note for _, _, note in jobs} <= stored
    con = sqlite3.connect(run_2d / "review.sqlite")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_posts_need_the_page_token_json_and_the_same_origin(served, run_2d):
    before = _rows_in_db(run_2d)
    assert served.decide("case_00", "accept", token="")[0] == 403
    assert served.decide("case_00", "accept", token="x" * 43)[0] == 403
    assert served.decide("case_00", "accept", headers={"Origin": "http://evil.example"})[0] == 403
    form = served.request("POST", "/api/decide", b"image=case_00&decision=accept",
                          {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": served.token})  # fmt: skip
    assert form[0] == 415
    assert served.decide("case_00", "delete")[0] == 400
    assert served.request("POST", "/api/decide", b"x" * 70_000,
                          {"Content-Type": "application/json", "X-CSRF-Token": served.token})[0] == 413  # fmt: skip
    assert served.decide("case_00", "accept", headers={"Origin": served.url})[0] == 200
    assert _rows_in_db(run_2d) == before + 1
    assert served.token in served.get("/")[1]  # embedded in the page


@pytest.mark.parametrize(
    "path",
    [
        "/files/../settings.json",
        "/files/..%2fsettings.json",
        "/files/%2e%2e/%2e%2e/etc/passwd",
        "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/files/settings.json",
        "/files/layers.parquet",
        "/files/review.sqlite",
        "/files//etc/passwd",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/../settings.json",
        "/case?image=../../settings.json",
        "/case?image=case_99",
        "/case?image=case_00%00",
        "/case",
        "/png?image=../maps.npz",
        "/png?image=case_05",  # a real case without kept maps
        "/png?image=case_00&panel=layer&layer=../../etc/passwd",
        "/png?image=case_00&panel=units",
    ],
)
def test_files_outside_the_app_and_crafted_ids_are_refused(served, path):
    status, _, body = served.request("GET", path)
    assert status in (400, 404), (path, status)
    assert b"root:" not in body and b"PAR1" not in body


def test_crafted_ids_cannot_be_decided_and_other_hosts_are_refused(served, run_2d):
    before = _rows_in_db(run_2d)
    assert served.decide("case_99", "accept")[0] == 404
    assert served.decide("../../etc/passwd", "accept")[0] == 404
    assert _rows_in_db(run_2d) == before
    assert served.request("GET", "/", headers={"Host": "evil.example"})[0] == 400


def test_only_the_report_is_served_and_only_from_inside(served, run_2d, tmp_path):
    assert served.request("GET", "/files/report.html")[0] == 404  # none written yet
    secret = tmp_path / "secret.html"
    secret.write_text("secret")
    link = run_2d / "report.html"
    link.symlink_to(secret)
    try:
        status, _, body = served.request("GET", "/files/report.html")
        assert status == 404 and b"secret" not in body
    finally:
        link.unlink()


def test_user_strings_are_escaped(served):
    status, _ = served.decide(MALICIOUS_ID, "reject", note=MALICIOUS_NOTE, reviewer="<b>eve</b>")
    assert status == 200
    queue = served.get("/")[1]
    case = served.get("/case?" + urlencode({"image": MALICIOUS_ID}))[1]
    for page in (queue, case):
        assert "<img src=x" not in page and "<script>alert" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in queue
    assert "&lt;/textarea&gt;&lt;script&gt;" in case and "&lt;b&gt;eve&lt;/b&gt;" in case


def test_a_session_leaves_the_run_folder_as_it_was(tmp_path):
    run = make_run(tmp_path / "run", n=4, keep_maps=2)
    before = _hashes(run)
    server = Served(run)
    try:
        for path in ("/", "/?flagged=yes", "/case?image=case_00", "/png?image=case_00&panel=layer&layer=input",
                     "/png?image=case_00&panel=label", "/case?image=case_03"):  # fmt: skip
            server.get(path)
        for image in ("case_00", "case_02", "case_03"):
            assert server.decide(image, "accept")[0] == 200
    finally:
        server.stop()
    assert _hashes(run) == before
    assert {p.name for p in run.iterdir()} - set(before) <= DB_FILES


def test_export_writes_every_decision_and_refuses_to_overwrite(tmp_path, run_2d):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("layers.parquet", "images.parquet"):
        (run / name).write_bytes((run_2d / name).read_bytes())
    runner = CliRunner()
    out = tmp_path / "decisions.csv"
    assert runner.invoke(cli, ["review", str(run), "--export", str(out)]).exit_code == 2  # nothing reviewed
    store = ReviewStore(run)
    made = [store.decide("case_00", "accept", note="ok, fine", reviewer="ana"),
            store.decide("case_00", "reject", note='line\nbreak "quoted"'),
            store.decide(MALICIOUS_ID, "needs_label")]  # fmt: skip
    result = runner.invoke(cli, ["review", str(run), "--export", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert table["id"].tolist() == [d.id for d in made]
    assert table["decision"].tolist() == ["accept", "reject", "needs_label"]
    assert table["note"].tolist() == ["ok, fine", 'line\nbreak "quoted"', ""]
    assert table["image"].tolist() == ["case_00", "case_00", MALICIOUS_ID]
    assert table["latest"].tolist() == [False, True, True]
    out.write_text("mine")
    refused = runner.invoke(cli, ["review", str(run), "--export", str(out)])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert out.read_text() == "mine"
    assert runner.invoke(cli, ["review", str(run), "--export", str(out), "--force"]).exit_code == 0
    assert len(pd.read_csv(out)) == 3


def test_the_store_checks_what_it_is_given(tmp_path):
    store = ReviewStore(tmp_path)
    with pytest.raises(UsageError, match="decision must be one of"):
        store.decide("a", "maybe")
    with pytest.raises(UsageError, match="note must hold at most"):
        store.decide("a", "accept", note="x" * 5000)
    assert store.history() == []


def test_review_queue_reads_without_a_server(run_2d):
    run = ReviewRun(run_2d)
    assert run.order_by == "estimated_dice" and run.has_qc
    assert run.cases["rank"].tolist() == list(range(1, 7))


# ------------------------------------------------------------------------------- selection
def _hand_run(root: Path, *, accepted: str | None = "G") -> Path:
    """Seven images, two hidden layers; A, B, C are near-identical failures, D fails otherwise, E
    is fine, F is labelled, G is the least trusted but accepted by a reviewer."""
    profiles = {"A": (0.10, 0.10), "B": (0.10, 0.11), "C": (0.11, 0.10), "D": (0.90, 0.10),
                "E": (0.90, 0.90), "F": (0.50, 0.50), "G": (0.10, 0.90)}  # fmt: skip
    estimate = {"A": 0.10, "B": 0.12, "C": 0.11, "D": 0.30, "E": 0.90, "F": 0.20, "G": 0.05}
    rows = []
    for image, (s1, s2) in profiles.items():
        for depth, (layer, s) in enumerate([("input", 0.5), ("enc", s1), ("dec", s2)]):
            rows.append({"image": image, "layer": layer, "depth": depth, "channels": 4, "shape": "4x8x8",
                         "sa": np.nan, "sa_pred": s, "status": "ok", "reason": ""})  # fmt: skip
    layers = pd.DataFrame(rows)
    images = pd.DataFrame({
        "image": list(profiles), "dice": [0.8 if i == "F" else np.nan for i in profiles],
        "mean_sa": np.nan, "mean_sa_pred": [np.mean(p) for p in profiles.values()], "input_sa": np.nan,
        "input_sa_pred": 0.5, "status": "ok", "reason": "", "file": [str(root / "in" / f"{i}.npy") for i in profiles],
    })  # fmt: skip
    SAResult(layers=layers, images=images, settings={"keep_maps": 0}).save(root)
    qc = pd.DataFrame({"image": list(estimate), "estimated_dice": list(estimate.values())})
    qc = qc.assign(lower=qc["estimated_dice"] - 0.1, upper=qc["estimated_dice"] + 0.1, flag=qc["estimated_dice"] < 0.5,
                   status="ok", reason="")  # fmt: skip
    write_table(qc, root / QC.file, QC)
    (root / "in").mkdir()
    for image in profiles:
        np.save(root / "in" / f"{image}.npy", np.full((2, 2), ord(image)))
    if accepted:
        ReviewStore(root).decide(accepted, "accept")
    return root


def test_select_spreads_the_budget_over_kinds_of_failure(tmp_path):
    run = _hand_run(tmp_path / "run")
    chosen = select_for_labelling(run, 3)
    # By hand: both layers hold the values {0.10, 0.10, 0.10, 0.11, 0.50, 0.90, 0.90} over the seven
    # images: mean 0.38714, standard deviation (ddof 0) 0.35111. F is labelled and G accepted, so the
    # candidates are A..E with distrust 0.90, 0.88, 0.89, 0.70, 0.10. First: A (most distrusted).
    # Distances to A: B and C 0.01 / 0.35111 = 0.02848, D 0.8 / 0.35111 = 2.2785, E 2.2785 * sqrt(2)
    # = 3.2223; scores 0.0251, 0.0253, 1.5949, 0.3222: D. Then the nearest distances: B, C 0.02848,
    # E min(3.2223, 2.2785); scores 0.0251, 0.0253, 0.2278: E. By distrust alone: A, C, B.
    assert chosen["image"].tolist() == ["A", "D", "E"]
    np.testing.assert_allclose(chosen["distrust"], [0.90, 0.70, 0.10], atol=1e-12)
    assert np.isnan(chosen["distance"].iloc[0])
    np.testing.assert_allclose(chosen["distance"].iloc[1:], [0.8 / 0.351109, 0.8 / 0.351109], rtol=1e-5)
    np.testing.assert_allclose(chosen["score"].iloc[1:], [0.70 * 0.8 / 0.351109, 0.10 * 0.8 / 0.351109], rtol=1e-5)
    # without the reviewer's accept, G (the least trusted) comes first
    (run / "review.sqlite").unlink()
    assert select_for_labelling(run, 1)["image"].tolist() == ["G"]


def test_sa_profiles_and_k_centre_by_hand():
    layers = pd.DataFrame({"image": ["a", "a", "b", "b", "c", "c"], "layer": ["x", "input"] * 3,
                           "depth": [1, 0] * 3, "sa_pred": [0.0, 9.0, 1.0, 9.0, np.nan, 9.0]})  # fmt: skip
    assert sa_profiles(layers).to_dict("list") == {"x": [-1.0, 1.0]}  # c has no defined score
    chosen, distances = greedy_k_centre(np.array([[0.0], [1.0], [1.0], [3.0]]), np.array([0.5, 1.0, 1.0, 0.5]), 4)
    # first 1 (most distrusted, first of a tie); then 3 (2 x 0.5 = 1 > 0 x 1 and > 1 x 0.5); then 0; then 2
    assert chosen == [1, 3, 0, 2] and distances[1:] == [2.0, 1.0, 0.0]
    assert greedy_k_centre(np.zeros((2, 1)), np.ones(2), 5)[0] == [0, 1]


def test_select_cli_writes_the_worklist_and_copies_without_overwriting(tmp_path):
    run = _hand_run(tmp_path / "run")
    runner = CliRunner()
    out, labelling = tmp_path / "worklist.csv", tmp_path / "to_label"
    args = ["select", str(run), "--budget", "2", "--out", str(out), "--copy-to", str(labelling)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out)["image"].tolist() == ["A", "D"]
    assert sorted(p.name for p in labelling.iterdir()) == ["A.npy", "D.npy"]
    assert np.load(labelling / "D.npy")[0, 0] == ord("D")
    assert runner.invoke(cli, args).exit_code == 2  # the worklist exists
    np.save(labelling / "D.npy", np.zeros(1))  # someone's other file of the same name
    result = runner.invoke(cli, [*args, "--force"])
    assert result.exit_code == 2 and "nothing was copied" in result.output
    assert np.load(labelling / "D.npy").tolist() == [0.0]
    assert runner.invoke(cli, ["select", str(run), "--budget", "0", "--out", str(tmp_path / "w.csv")]).exit_code == 2


def test_select_skips_labelled_images(run_2d):
    # every image of the analysed run has a label: nothing is left to choose
    assert select_for_labelling(run_2d, 3).empty
