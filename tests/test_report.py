"""The HTML report, without a browser: self-containment, views, values, escaping, CLI, size.

Result folders are synthetic (tests/report_fixtures.py); expected numbers are recomputed here from
the folder's files with pandas/NumPy, and the map overlay is compared with MONAI's own
``blend_images``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from report_fixtures import MALICIOUS_IMAGE, MALICIOUS_LAYER, MALICIOUS_SETTING, write_result
from segability.cli.app import app
from segability.estimation.selection import layer_roles
from segability.report import IncompleteRunError, build_report
from segability.report.figures.charts import (
    history_chart,
    quality_scatter_chart,
    sa_per_layer_chart,
    unit_matrix,
)
from segability.report.figures.labels import layer_labels, short_labels
from segability.report.figures.thumbnails import SliceView, blend, focus_box, pick_slice
from segability.report.folder import parse_findings, read_result_folder
from segability.report.sections.quality import quality_columns
from segability.report.summaries import describe_images, quality_table

FINDINGS = [
    "Mean SA against the prediction ranks images as Dice does.",
    "<i>decoder</i> layers segment best.",
]
FAILED = [
    ("scans/broken.nii.gz", "OSError: not a gzip file"),
    ("scans/<b>odd</b>.nii", "ValueError: 4 channels"),
]


class Tables(HTMLParser):
    """Every ``<table id=...>``: header texts, rows of cells (data-sort or text), row classes."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._t = self._row = self._cell = None
        self._head = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._t = self.tables[a["id"]] = {"headers": [], "rows": [], "classes": []}
        elif self._t is None:
            return
        elif tag in ("thead", "tbody"):
            self._head = tag == "thead"
        elif tag == "tr":
            self._row = []
            if not self._head:
                self._t["classes"].append(a.get("class"))
        elif tag in ("td", "th"):
            self._cell = {"sort": a.get("data-sort"), "text": ""}

    def handle_endtag(self, tag):
        if self._t is None:
            return
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._head:
                self._t["headers"] = [c["text"].strip() for c in self._row]
            else:
                self._t["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._t = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def column(self, table: str, header: str, text: bool = False) -> list[str]:
        t = self.tables[table]
        i = t["headers"].index(header)
        return [
            r[i]["text"].strip() if text or r[i]["sort"] is None else r[i]["sort"]
            for r in t["rows"]
        ]


ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "div",
    "nav",
    "p",
    "h1",
    "h2",
    "h3",
    "ol",
    "ul",
    "li",
    "a",
    "main",
    "header",
    "footer",
    "section",
    "figure",
    "figcaption",
    "img",
    "span",
    "code",
    "strong",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "script",
    "wbr",
}


class Elements(HTMLParser):
    """Every start tag of a page with its attribute names."""

    def __init__(self, text: str):
        super().__init__()
        self.found: list[tuple[str, list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, [a for a, _ in attrs]))


def section(page: str, id_: str) -> str | None:
    m = re.search(rf'<section id="{re.escape(id_)}">(.*?)</section>', page, re.S)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every file of the contract, labels, groups, encoder/decoder names, malicious strings."""
    root = write_result(
        tmp_path_factory.mktemp("full") / "run",
        n_images=6,
        n_layers=8,
        names="encdec",
        keep_maps=3,
        malicious=True,
        findings=FINDINGS,
        errors=FAILED,
    )
    path = build_report(root)
    return root, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    """layers/images/settings only, no labels, MONAI UNet names."""
    root = write_result(
        tmp_path_factory.mktemp("minimal") / "run",
        n_images=4,
        n_layers=6,
        names="unet",
        labels=False,
        units=0,
        keep_maps=0,
        qc=False,
        history=False,
        timing=False,
        groups=False,
        empty_prediction=True,
    )
    path = build_report(root)
    return root, path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- self-contained


def test_the_page_is_self_contained(full):
    _, page = full
    for bad in (
        'src="http',
        "src='http",
        'href="http',
        "<link",
        "@import",
        "url(",
        "//cdn",
        "<iframe",
        "<object",
    ):
        assert bad not in page.lower()
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert len(sources) > 30
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.verify()
    ids = set(re.findall(r'\sid="([^"]+)"', page))
    hrefs = re.findall(r'\shref="([^"]*)"', page)
    assert hrefs and all(h.startswith("#") and h[1:] in ids for h in hrefs)


def test_content_security_policy_allows_only_the_page_own_script_and_style(full):
    _, page = full
    csp = html.unescape(
        re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    )
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    digest = lambda s: base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()  # noqa: E731
    assert "default-src 'none'" in csp and "img-src data:" in csp
    assert f"script-src 'sha256-{digest(scripts[0])}'" in csp
    assert f"style-src 'sha256-{digest(styles[0])}'" in csp
    assert "unsafe-inline" not in csp


# ----------------------------------------------------------------------------- views


def test_every_view_is_present_when_its_data_is(full):
    root, page = full
    n_layers, kept, best = 8, 3, 3
    images_in = {
        sid: section(page, sid).count("<img ")
        for sid in (
            "findings",
            "sa-layers",
            "maps",
            "units",
            "quality",
            "failed",
            "history",
            "settings",
        )
    }
    assert images_in == {
        "findings": 0,
        "sa-layers": 1,
        "maps": kept * (3 + n_layers),  # image, label, prediction, then each layer
        "units": 2 + n_layers * best,  # two charts, then the first image's best units
        "quality": 1 + kept,  # the scatter, a thumbnail per kept image
        "failed": 0,
        "history": 1,
        "settings": 0,
    }
    assert "Not shown" not in page
    assert 'class="missing"' not in page
    for s in FINDINGS:
        assert f"<li>{s.replace('<', '&lt;').replace('>', '&gt;')}</li>" in section(
            page, "findings"
        )
    # the TOC lists the views in reading order
    toc = re.findall(r'<a href="#([^"]+)">', page)
    assert toc == [
        "findings",
        "sa-layers",
        "maps",
        "units",
        "quality",
        "failed",
        "history",
        "settings",
    ]


def test_absent_views_say_why(minimal):
    _, page = minimal
    assert section(page, "findings") is None  # no findings: no section
    for sid, file in (
        ("maps", "maps.npz"),
        ("units", "units.parquet"),
        ("history", "history.csv"),
        ("failed", "errors.csv"),
    ):
        body = section(page, sid)
        assert ("Not shown" in body or sid == "failed") and file in body and "<img" not in body
        assert f'<li class="missing"><a href="#{sid}">' in page
    assert "No failure recorded" in section(page, "failed")
    quality = section(page, "quality")
    assert "no labels in this run" in quality  # no scatter without Dice
    assert 'id="table-quality"' in quality  # but the label-free ranking is there
    assert section(page, "sa-layers").count("<img ") == 1


def test_layer_roles_are_the_estimation_rule_and_shading_is_explained(full, minimal, tmp_path):
    """The report's "part" column is segability.estimation.selection.layer_roles, for role words
    (full) and MONAI UNet structure (minimal) alike; names that tell nothing are not shaded."""
    for root, page in (full, minimal):
        t = Tables(page)
        names = t.column("table-layers", "layer", text=True)
        roles = layer_roles(pd.read_parquet(root / "layers.parquet"))
        assert t.column("table-layers", "part", text=True) == [roles[n] or "" for n in names]
    assert "shading marks encoder, bottleneck and decoder layers" in section(full[1], "sa-layers")
    minimal_roles = Tables(minimal[1]).column("table-layers", "part", text=True)
    assert minimal_roles == [
        "",
        "encoder",
        "encoder",
        "bottleneck",
        "decoder",
        "decoder",
        "decoder",
    ]
    root = write_result(
        tmp_path / "plain", n_images=3, names="plain", keep_maps=0, units=0, qc=False, history=False
    )
    page = build_report(root).read_text(encoding="utf-8")
    assert "do not tell encoder from decoder, so nothing is shaded" in section(page, "sa-layers")
    assert "part" not in Tables(page).tables["table-layers"]["headers"]


def test_layer_table_holds_the_means_and_quartiles_of_the_folder(full):
    root, page = full
    layers = pd.read_parquet(root / "layers.parquet")
    t = Tables(page)
    names = t.column("table-layers", "layer", text=True)
    order = layers.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
    assert names == order and names[0] == "input"
    for header, score in (("SA", "sa"), ("SA pred", "sa_pred")):
        got = np.array(t.column("table-layers", header), dtype=float)
        want = layers.groupby("layer")[score].mean().loc[order].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12)
    iqr = np.array(t.column("table-layers", "SA IQR"), dtype=float)
    q = layers.groupby("layer")["sa"].quantile([0.25, 0.75]).unstack().loc[order]
    np.testing.assert_allclose(iqr, (q[0.75] - q[0.25]).to_numpy(), rtol=1e-9)


def test_undefined_scores_are_counted_with_their_reason(minimal):
    root, page = minimal
    t = Tables(page)
    assert "SA" not in t.tables["table-layers"]["headers"]  # no labels: no SA against a label
    undefined = np.array(t.column("table-layers", "undefined"), dtype=float)
    assert undefined.tolist() == [1.0] * len(undefined)  # the last image's prediction is empty
    assert "empty prediction: no target prototype" in section(page, "sa-layers")


def test_quality_table_puts_flagged_first_then_sorts_by_the_estimate(full):
    root, page = full
    qc = pd.read_csv(root / "qc.csv", dtype={"image": str})
    t = Tables(page)
    ids = t.column("table-quality", "image", text=True)
    want = qc.assign(f=~qc["flag"]).sort_values(["f", "estimated_dice"], kind="stable")
    assert ids == want["image"].tolist()
    est = np.array(t.column("table-quality", "estimated Dice"), dtype=float)
    n_flagged = int(qc["flag"].sum())
    assert 0 < n_flagged < len(qc)
    assert np.all(np.diff(est[:n_flagged]) >= 0) and np.all(np.diff(est[n_flagged:]) >= 0)
    flagged = dict(zip(qc["image"], qc["flag"], strict=True))
    assert [c == "flagged" for c in t.tables["table-quality"]["classes"]] == [
        bool(flagged[i]) for i in ids
    ]
    assert t.column("table-quality", "flag", text=True) == [
        "flagged" if flagged[i] else "pass" for i in ids
    ]
    assert (
        t.column("table-quality", "group", text=True)
        == pd.read_parquet(root / "images.parquet").set_index("image").loc[ids, "group"].tolist()
    )


def test_scatter_caption_gives_spearman_and_pearson_of_the_folder(full):
    root, page = full
    from scipy import stats

    images = pd.read_parquet(root / "images.parquet")
    rho = stats.spearmanr(images["mean_sa_pred"], images["dice"]).statistic
    r = stats.pearsonr(images["mean_sa_pred"], images["dice"]).statistic
    quality = section(page, "quality")
    assert f"Spearman ρ = {rho:.3f}" in quality
    assert f"Pearson r = {r:.3f}" in quality
    assert f"n = {len(images)}" in quality and "Coloured by group" in quality
    assert f"Each dot is an image of images.parquet, {len(images)} images (all 2 groups" in quality


def test_rank_correlations_with_ties_match_scipy():
    from scipy import stats

    from segability.report.sections.quality import _pearson, _spearman

    x = np.array([0.1, 0.4, 0.4, 0.9, 0.3, 0.3, 0.8])
    y = np.array([0.2, 0.5, 0.1, 0.9, 0.3, 0.6, 0.6])
    assert _spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert _pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert np.isnan(_spearman(np.ones(4), y[:4]))


def test_qc_csv_merges_with_images_parquet_on_the_image_id(tmp_path):
    """A hand-made qc.csv (old column names, a measured value that disagrees, an image missing
    from images.parquet) joined to images.parquet: every cell checked."""
    root = write_result(tmp_path / "run", n_images=2, keep_maps=0, units=0, qc=False, history=False)
    images = pd.DataFrame(
        {
            "image": ["a", "b", "c", "d"],
            "dice": [0.91, 0.40, 0.75, 0.66],
            "mean_sa": [0.80, 0.30, 0.70, 0.60],
            "mean_sa_pred": [0.85, 0.35, 0.72, 0.61],
            "input_sa": [0.50, 0.20, 0.45, 0.44],
            "input_sa_pred": [0.55, 0.25, 0.47, 0.43],
            "reason": ["", "", "", ""],
            "group": ["clean", "blur", "clean", "blur"],
            "severity": [0.0, 0.5, 0.0, 1.0],
        }
    )
    images.to_parquet(root / "images.parquet", index=False)
    # the gate's table as segability wrote it before input_sa_pred was named so: "input_sa" holds
    # the label-free value (input_sa_source "prediction"); qc has its own stale Dice/group copies
    qc = pd.DataFrame(
        {
            "image": ["b", "a", "z"],
            "mean_sa_pred": [0.35, 0.85, 0.20],
            "input_sa": [0.25, 0.55, 0.10],
            "input_sa_source": ["prediction", "prediction", "prediction"],
            "estimated_dice": [0.38, 0.83, 0.15],
            "lower": [0.20, 0.70, 0.0],
            "upper": [0.56, 0.96, 0.33],
            "flag": [True, False, True],
            "reason": ["low feature SA", "", "empty prediction"],
            "dice": [np.nan, np.nan, 0.1],
            "group": [np.nan, np.nan, "noise"],
        }
    )
    qc.to_csv(root / "qc.csv", index=False)
    table, estimate, flag = quality_table(read_result_folder(root))
    assert (estimate, flag) == ("estimated_dice", "flag")
    # flagged first (worst estimate first), then the rest; c and d are not in qc.csv: not listed
    assert table["image"].tolist() == ["z", "b", "a"]
    row = table.set_index("image")
    # measured values from images.parquet, qc.csv filling only where images.parquet has none
    assert (
        row.loc["b", "dice"] == 0.40
        and row.loc["a", "dice"] == 0.91
        and row.loc["z", "dice"] == 0.1
    )
    assert row.loc[["b", "a", "z"], "group"].tolist() == ["blur", "clean", "noise"]
    assert row.loc["b", "severity"] == 0.5 and np.isnan(row.loc["z", "severity"])
    assert row.loc[["b", "a"], "mean_sa"].tolist() == [0.30, 0.80]
    # the old "input_sa" of qc.csv is the label-free input SA; images.parquet's input_sa stays
    assert row.loc[["b", "a", "z"], "input_sa_pred"].tolist() == [0.25, 0.55, 0.10]
    assert row.loc["b", "input_sa"] == 0.20 and np.isnan(row.loc["z", "input_sa"])
    # gate values from qc.csv
    assert row.loc[["b", "a", "z"], "estimated_dice"].tolist() == [0.38, 0.83, 0.15]
    assert row.loc[["b", "a", "z"], "flag_reason"].fillna("").tolist() == [
        "low feature SA",
        "",
        "empty prediction",
    ]
    assert "gate_mean_sa_pred" not in table.columns  # the gate's mean SA is images.parquet's
    columns = quality_columns(table, estimate, flag, ["group", "severity"])
    assert columns == [
        "group",
        "severity",
        "estimated_dice",
        "interval",
        "flag",
        "flag_reason",
        "mean_sa_pred",
        "input_sa_pred",
        "mean_sa",
        "input_sa",
        "dice",
    ]
    page = build_report(root).read_text(encoding="utf-8")
    t = Tables(page)
    assert t.tables["table-quality"]["headers"] == [
        "image",
        "group",
        "severity",
        "estimated Dice",
        "interval",
        "flag",
        "flag reason",
        "mean SA (vs prediction)",
        "input SA (vs prediction)",
        "mean SA (vs label)",
        "input SA (vs label)",
        "Dice",
    ]
    cells = {
        h: t.column("table-quality", h, text=True) for h in t.tables["table-quality"]["headers"]
    }
    assert cells["image"] == ["z", "b", "a"]
    assert cells["Dice"] == ["0.100", "0.400", "0.910"]
    assert cells["interval"] == ["0.000–0.330", "0.200–0.560", "0.700–0.960"]
    assert cells["input SA (vs prediction)"] == ["0.100", "0.250", "0.550"]
    assert cells["input SA (vs label)"] == ["—", "0.200", "0.500"]
    assert cells["group"] == ["noise", "blur", "clean"]
    assert cells["severity"] == ["—", "0.5", "0"] or cells["severity"] == ["—", "0.500", "0.000"]
    assert cells["flag"] == ["flagged", "flagged", "pass"]
    assert t.tables["table-quality"]["classes"] == ["flagged", "flagged", None]
    assert "input_sa_source" not in page and "2 other image(s) of images.parquet" in page
    # the new name is read as it is; a gate mean SA over other layers is kept apart
    qc = qc.rename(columns={"input_sa": "input_sa_pred"}).drop(columns="input_sa_source")
    qc["mean_sa_pred"] = [0.30, 0.85, 0.20]
    qc.to_csv(root / "qc.csv", index=False)
    table, _, _ = quality_table(read_result_folder(root))
    row = table.set_index("image")
    assert row.loc[["b", "a", "z"], "input_sa_pred"].tolist() == [0.25, 0.55, 0.10]
    assert row.loc[["b", "a"], "mean_sa_pred"].tolist() == [0.35, 0.85]
    assert row.loc[["b", "a"], "gate_mean_sa_pred"].tolist() == [0.30, 0.85]


def test_quality_table_without_qc_ranks_by_mean_sa_pred(tmp_path):
    root = write_result(tmp_path / "run", n_images=5, qc=False, keep_maps=0, units=0)
    table, estimate, flag = quality_table(read_result_folder(root))
    assert estimate == "mean_sa_pred" and flag is None
    images = pd.read_parquet(root / "images.parquet")
    assert table["image"].tolist() == images.sort_values("mean_sa_pred")["image"].tolist()


def test_map_captions_give_each_layer_sa_of_that_image(full):
    root, page = full
    layers = pd.read_parquet(root / "layers.parquet").set_index(["image", "layer"])
    maps = section(page, "maps")
    image_id = "case_001"
    block = maps.split("<code>case_001</code>", 1)[1].split("<h3>", 1)[0].replace("<wbr>", "")
    for name in ("encoder.0", "bottleneck", "upcat_3"):
        sa, sa_pred = layers.loc[(image_id, name), ["sa", "sa_pred"]]
        assert (
            f'<code>{name}</code></span><span class="score">SA {sa:.2f} · pred {sa_pred:.2f}</span>'
            in block
        )
    assert (
        f"Dice {pd.read_parquet(root / 'images.parquet').set_index('image').loc[image_id, 'dice']:.3f}"
        in block
    )


def test_units_table_lists_the_best_units_by_mean_sa(full):
    root, page = full
    units = pd.read_parquet(root / "units.parquet")
    means = units.groupby(["layer", "unit"])["sa"].mean()
    t = Tables(page)
    layer_col = t.column("table-units", "layer", text=True)
    unit_col = [int(float(u)) for u in t.column("table-units", "unit")]
    sa_col = np.array(t.column("table-units", "SA"), dtype=float)
    np.testing.assert_allclose(
        sa_col, [means[(lay, u)] for lay, u in zip(layer_col, unit_col, strict=True)], rtol=1e-12
    )
    for name in ("encoder.0", "upcat_3"):
        best = means[name].sort_values(ascending=False).index[:5].tolist()
        assert [u for lay, u in zip(layer_col, unit_col, strict=True) if lay == name] == best


# ----------------------------------------------------------------------------- escaping


def test_user_strings_are_escaped_everywhere(full):
    _, page = full
    for raw in (MALICIOUS_IMAGE, MALICIOUS_LAYER, MALICIOUS_SETTING, FINDINGS[1]):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.nii.gz" in page
    assert "model.&lt;img src=x onerror=alert(2)&gt;.conv" in page
    assert "&lt;b onmouseover=alert(3)&gt;UNet&lt;/b&gt;" in page
    assert page.count("<script") == 1
    assert not re.search(r"<img(?![^>]*src=\"data:image/png;base64,)", page)
    # parsed as a browser would: only the report's own elements, no event handler attribute
    tags = Elements(page).found
    assert {t for t, _ in tags} <= ALLOWED_TAGS
    assert not [(t, a) for t, attrs in tags for a in attrs if a.startswith("on")]


def test_escape_helpers():
    from segability.report.html import Html, esc, tag

    assert (
        tag("td", "<b>", class_='x"y', data_sort=1.5)
        == '<td class="x&quot;y" data-sort="1.5">&lt;b&gt;</td>'
    )
    assert tag("p", Html("<b>ok</b>"), "<i>") == "<p><b>ok</b>&lt;i&gt;</p>"
    assert esc(Html("<b>")) == "<b>" and esc("'") == "&#x27;"


# ----------------------------------------------------------------------------- arguments, files


def test_findings_argument_overrides_the_file(tmp_path):
    root = write_result(tmp_path / "run", n_images=3, keep_maps=0, units=0, findings=["from file"])
    page = build_report(root, findings=["from argument"]).read_text(encoding="utf-8")
    assert "from argument" in section(page, "findings") and "from file" not in page
    page = build_report(root).read_text(encoding="utf-8")
    assert "from file" in section(page, "findings")
    with pytest.raises(ValueError, match="findings"):
        build_report(root, findings=[1, 2])


def test_existing_file_is_not_overwritten_unless_it_is_a_report(tmp_path):
    root = write_result(tmp_path / "run", n_images=3, keep_maps=0, units=0)
    foreign = root / "report.html"
    foreign.write_text("<html>my own notes</html>")
    with pytest.raises(FileExistsError, match="not a segability report"):
        build_report(root)
    assert foreign.read_text() == "<html>my own notes</html>"
    foreign.unlink()
    first = build_report(root, title="first").read_text(encoding="utf-8")
    second = build_report(root, title="second").read_text(
        encoding="utf-8"
    )  # an earlier report: replaced
    assert "<title>first</title>" in first and "<title>second</title>" in second
    other = build_report(root, tmp_path / "elsewhere.html")
    assert other == tmp_path / "elsewhere.html" and other.is_file()
    assert not list(root.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_images": 0}, "max_images"),
        ({"images": "case_000"}, "images"),
        ({"images": []}, "images"),
        ({"images": ["case_999"]}, "case_999"),
        ({"slice_index": -1}, "slice_index"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    root = write_result(tmp_path / "run", n_images=3, keep_maps=2, units=0)
    with pytest.raises(ValueError, match=match):
        build_report(root, **kwargs)


def test_not_a_result_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="layers.parquet"):
        build_report(tmp_path)
    pd.DataFrame({"image": ["a"], "layer": ["x"]}).to_parquet(tmp_path / "layers.parquet")
    with pytest.raises(ValueError, match="depth"):
        build_report(tmp_path)


def test_images_without_maps_is_an_error(tmp_path):
    root = write_result(tmp_path / "run", n_images=3, keep_maps=0, units=0)
    with pytest.raises(ValueError, match="no maps.npz"):
        build_report(root, images=["case_000"])


# ----------------------------------------------------------------------------- 3D


def test_3d_maps_show_the_slice_with_the_largest_target(tmp_path):
    root = write_result(
        tmp_path / "run", n_images=2, n_layers=4, spatial=(20, 22, 12), keep_maps=2, units=3
    )
    with np.load(root / "maps.npz") as maps:
        label = maps["0:label"]
    want = int(np.argmax(label.sum(axis=(0, 1))))
    page = build_report(root).read_text(encoding="utf-8")
    maps_html = section(page, "maps")
    assert f"slice {want} of 12 along the last axis (largest target area)" in maps_html
    assert maps_html.count("<img ") == 2 * (3 + 4)
    page = build_report(root, slice_index=3).read_text(encoding="utf-8")
    assert "slice 3 of 12 along the last axis (set by slice_index)" in section(page, "maps")
    with pytest.raises(ValueError, match="slice_index"):
        build_report(root, slice_index=12)


def test_pick_slice_by_hand():
    ref = np.zeros((3, 3, 5), dtype=np.uint8)
    ref[0, 0, 1] = 1
    ref[:2, :2, 3] = 1  # area 4: the largest
    ref[:, 0, 4] = 1  # area 3
    assert pick_slice(ref, 5) == 3
    assert pick_slice(np.zeros_like(ref), 5) == 2  # empty: the middle
    assert pick_slice(None, 4) == 2
    assert pick_slice(ref, 5, slice_index=0) == 0
    with pytest.raises(ValueError, match="slice_index"):
        pick_slice(ref, 5, slice_index=5)


def test_slice_view_resizes_a_coarser_map_by_nearest_neighbour():
    image = np.zeros((1, 4, 4, 2))
    view = SliceView(image, None, slice_index=1, side=4)
    coarse = np.array(
        [[[0, 1], [1, 0]], [[0, 0], [0, 1]]]
    )  # (2, 2, 2): slice 1 is [[1, 0], [0, 1]]
    np.testing.assert_array_equal(
        view.cut(coarse), np.kron(np.eye(2, dtype=int), np.ones((2, 2), dtype=int))
    )


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("cmap", ["cividis", "viridis"])
@pytest.mark.parametrize("alpha_kind", ["scalar", "array"])
@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 3)])
def test_blend_matches_monai_blend_images(cmap, alpha_kind, spatial):
    from monai.visualize.utils import blend_images

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *spatial)).astype(np.float32)
    label = (rng.random((1, *spatial)) > 0.5) * rng.random((1, *spatial)).astype(np.float32)
    alpha = 0.4 if alpha_kind == "scalar" else rng.random((1, *spatial)).astype(np.float32)
    want = blend_images(
        image,
        label.astype(np.float32),
        alpha=np.copy(alpha) if alpha_kind == "array" else alpha,
        cmap=cmap,
    )
    np.testing.assert_allclose(blend(image, label, alpha=alpha, cmap=cmap), want, atol=1e-6)


def test_unit_matrix_sorts_within_layers_and_pads_with_nan():
    m = pd.DataFrame(
        {"layer": ["a", "a", "a", "b"], "unit": [0, 1, 2, 0], "sa": [0.2, np.nan, 0.9, 0.5]}
    )
    names, mat = unit_matrix(m, ["b", "a"], "sa")
    assert names == ["b", "a"]
    np.testing.assert_array_equal(mat, [[0.5, np.nan, np.nan], [0.9, 0.2, np.nan]])


def test_no_pyplot_figure_is_left_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    build_report(write_result(tmp_path / "run", n_images=3, keep_maps=1))
    assert plt.get_fignums() == before


# ----------------------------------------------------------------------------- CLI, size


def test_cli_writes_the_report(full, tmp_path):
    root, _ = full
    out = tmp_path / "r.html"
    res = CliRunner().invoke(
        app,
        ["report", str(root), "--out", str(out), "--images", "case_002", "--images", "case_001"],
    )
    # the fixture run has 2 failed files: exit 1, as analyze gives for it, and the report is written
    assert res.exit_code == 1 and "2 file(s) of this run failed" in res.output, res.output
    assert out.is_file() and str(out) in res.output
    (root / "errors.csv").rename(root / "errors.csv.bak")
    try:
        clean = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "clean.html")])
    finally:
        (root / "errors.csv.bak").rename(root / "errors.csv")
    assert clean.exit_code == 0, clean.output
    maps = section(out.read_text(encoding="utf-8"), "maps")
    assert re.findall(r"<h3>Image <code>([^<]+)</code></h3>", maps) == ["case_002", "case_001"]


def test_cli_errors(full, tmp_path):
    root, _ = full
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert "does not exist" in res.output
    res = runner.invoke(
        app, ["report", str(root), "--out", str(tmp_path / "x.html"), "--images", "case_999"]
    )
    assert res.exit_code == 1
    assert "case_999" in res.output
    findings = tmp_path / "f.json"
    findings.write_text(json.dumps(["cli finding"]))
    res = runner.invoke(
        app,
        [
            "report",
            str(root),
            "--out",
            str(tmp_path / "y.html"),
            "--findings",
            str(findings),
            "--slice",
            "0",
        ],
    )
    assert res.exit_code == 1, res.output  # written; the fixture run has failed files
    assert "cli finding" in (tmp_path / "y.html").read_text(encoding="utf-8")


def test_cli_exit_codes_say_what_failed(tmp_path, monkeypatch):
    runner = CliRunner()
    root = write_result(tmp_path / "run", n_images=2, keep_maps=0, units=0)
    (root / "images.parquet").unlink()
    res = runner.invoke(app, ["report", str(root)])
    assert res.exit_code == 2, res.output  # IncompleteRunError: resume the run, then report
    assert res.output.count("\n") == 1 and res.output.startswith("error: result_dir")
    assert "incomplete run" in res.output and "--resume" in res.output

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr("segability.report.build_report", broken)
    res = runner.invoke(app, ["report", str(root)])
    assert res.exit_code == 1
    assert res.output == "error: RuntimeError: the disk is full\n"  # one line, no traceback
    res = runner.invoke(app, ["report", str(root), "--debug"])
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "in broken" in res.output
    assert res.output.endswith("error: RuntimeError: the disk is full\n")
    assert "in broken" in runner.invoke(app, ["--debug", "report", str(root)]).output


def test_size_of_a_50_image_20_layer_run(tmp_path):
    root = write_result(
        tmp_path / "run", n_images=50, n_layers=20, spatial=(96, 96), units=16, keep_maps=50
    )
    path = build_report(root)
    size = path.stat().st_size
    page = path.read_text(encoding="utf-8")
    assert section(page, "maps").count("<img ") == 4 * (3 + 20)  # max_images=4, not all 50
    assert section(page, "quality").count('class="thumb"') == 50
    assert size < 5e6, f"{size / 1e6:.2f} MB"


# ----------------------------------------------------------------------------- which images


def test_findings_say_which_images_and_the_chart_of_that_subset_is_drawn(tmp_path):
    root = write_result(
        tmp_path / "run",
        n_images=6,
        keep_maps=0,
        units=0,
        findings=[
            {"text": "Shifted images segment worse.", "images": {"group": ["shifted"]}},
            {"text": "Over every image, SA tracks Dice.", "images": "all"},
            "No subset named.",
        ],
    )
    images = pd.read_parquet(root / "images.parquet")
    layers = pd.read_parquet(root / "layers.parquet")
    shifted = images.loc[images["group"] == "shifted", "image"].tolist()
    assert 0 < len(shifted) < len(images)
    page = build_report(root).read_text(encoding="utf-8")
    findings = section(page, "findings")
    assert (
        f'Shifted images segment worse.<span class="scope"> — over {len(shifted)} images (group shifted)'
        in findings
    )
    assert f"— over {len(images)} images (all 2 groups: clean 4, shifted 2)" in findings
    assert "<li>No subset named.</li>" in findings
    layers_html = section(page, "sa-layers")
    assert layers_html.count("<img ") == 2  # the subset the findings quote, then every image
    assert f"the mean SA over these {len(shifted)} images" in layers_html
    assert f"mean SA over {len(images)} images (all 2 groups" in layers_html
    t = Tables(page)
    order = t.column("table-layers", "layer", text=True)
    sub = (
        layers[layers["image"].isin(shifted)].groupby("layer")[["sa", "sa_pred"]].mean().loc[order]
    )
    everyone = layers.groupby("layer")[["sa", "sa_pred"]].mean().loc[order]
    for header, want in (
        ("SA (group shifted)", sub["sa"]),
        ("SA pred (group shifted)", sub["sa_pred"]),
        ("SA", everyone["sa"]),
    ):
        np.testing.assert_allclose(
            np.array(t.column("table-layers", header), float), want, rtol=1e-12
        )


def test_describe_images_counts_groups():
    df = pd.DataFrame({"image": list("abcde"), "group": ["x", "y", "y", "z", "x"]})
    assert describe_images(["b", "c"], df) == "2 images (group y)"
    assert describe_images(["a", "b"], df) == "2 images (2 of 3 groups: x 1, y 1)"
    assert describe_images(list("abcde"), df) == "5 images (all 3 groups: x 2, y 2, z 1)"
    assert describe_images(["a"], df.drop(columns="group")) == "1 image of 5"


def test_findings_selectors_are_validated():
    assert parse_findings([{"text": "t", "images": {"severity": [0.5, 1]}}])[0].images == {
        "severity": ("0.5", "1")
    }
    for bad in ([{"text": "t", "images": []}], [{"images": {"g": "x"}}], [3], "text"):
        with pytest.raises(ValueError, match="findings"):
            parse_findings(bad)


# ----------------------------------------------------------------------------- failures


def test_failed_files_are_listed_with_their_errors(full):
    _, page = full
    t = Tables(page)
    assert t.tables["table-failed"]["headers"] == ["file", "error"]
    assert t.column("table-failed", "file", text=True) == [f for f, _ in FAILED]
    assert t.column("table-failed", "error", text=True) == [e for _, e in FAILED]
    assert "&lt;b&gt;odd&lt;/b&gt;" in section(page, "failed")
    assert '<li><span class="k">failed</span> <span class="v">2</span></li>' in page


@pytest.mark.parametrize("tables", ["absent", "empty"])
def test_a_run_where_every_image_failed_says_so(tmp_path, tables):
    root = tmp_path / "run"
    root.mkdir()
    pd.DataFrame(
        {
            "file": ["a.nii.gz", "b.nii.gz"],
            "error": ["OSError: truncated", "ValueError: 2 channels"],
            "extra": ["x", "y"],
        }
    ).to_csv(root / "errors.csv", index=False)
    (root / "shards").mkdir()  # a finished batch run keeps its shards
    if tables == "empty":
        pd.DataFrame({c: pd.Series(dtype=str) for c in ("image", "layer")}).assign(
            depth=pd.Series(dtype=int), sa=pd.Series(dtype=float), sa_pred=pd.Series(dtype=float)
        ).to_parquet(root / "layers.parquet", index=False)
        pd.DataFrame({"image": pd.Series(dtype=str)}).to_parquet(
            root / "images.parquet", index=False
        )
        (root / "settings.json").write_text(json.dumps({"model": "m.pt", "n_failed": 2}))
    page = build_report(root).read_text(encoding="utf-8")
    assert re.findall(r'<a href="#([^"]+)">', page)[:2] == ["no-result", "failed"]
    assert "Every image of this run failed: 2 file(s)" in section(page, "no-result")
    t = Tables(page)
    assert t.column("table-failed", "file", text=True) == ["a.nii.gz", "b.nii.gz"]
    assert t.column("table-failed", "error", text=True) == [
        "OSError: truncated",
        "ValueError: 2 channels",
    ]
    assert t.column("table-failed", "extra", text=True) == ["x", "y"]
    assert "<img" not in page


def test_an_unmerged_run_is_an_incomplete_run_error(tmp_path):
    root = write_result(tmp_path / "run", n_images=2, keep_maps=0, units=0)
    (root / "shards").mkdir()
    (root / "images.parquet").unlink()
    with pytest.raises(
        IncompleteRunError,
        match=r"incomplete run \(shards/ is there but images.parquet is not\).*resume",
    ):
        build_report(root)
    assert issubclass(IncompleteRunError, ValueError)
    (root / "layers.parquet").unlink()
    with pytest.raises(IncompleteRunError, match="layers.parquet"):
        build_report(root)
    (root / "shards").rmdir()
    with pytest.raises(FileNotFoundError, match="layers.parquet"):
        build_report(root)
    root = write_result(tmp_path / "run2", n_images=2, keep_maps=0, units=0)
    (root / "images.parquet").unlink()
    with pytest.raises(IncompleteRunError, match="images.parquet is missing"):
        build_report(root)


# ----------------------------------------------------------------------------- legibility


def _overlaps(fig, legend_of) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = legend_of(ax)
    assert legend is not None
    box = legend.get_window_extent(renderer)
    inside_figure = fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 0.5
    return box.overlaps(ax.get_window_extent(renderer)) or not inside_figure


def test_legends_sit_outside_the_data(full):
    root, _ = full
    folder = read_result_folder(root)
    from segability.report.summaries import layer_summary

    summary = layer_summary(folder.layers)
    roles = layer_roles(summary["layer"])
    figs = [
        sa_per_layer_chart(summary, roles, ["sa", "sa_pred"], "Mean over all 6 images"),
        quality_scatter_chart(folder.images, "mean_sa_pred", "dice", "group", "x", "y"),
        history_chart(folder.history, summary["layer"].tolist()),
    ]
    for fig in figs:
        assert not _overlaps(fig, lambda ax: ax.get_legend())


def test_short_labels_keep_the_distinguishing_tail_or_number():
    names = [
        "encoder.stages.2.convs.0.conv",
        "encoder.stages.3.convs.0.conv",
        "encoder.stages.3.convs.1.conv",
    ]
    labels, lossy = short_labels(names, 22)
    assert labels == ["encoder…2.convs.0.conv", "encoder…3.convs.0.conv", "encoder…1.conv"]
    assert not lossy and all(len(x) <= 22 for x in labels)
    monai = [
        "model.1.submodule.0.conv",
        "model.1.submodule.1.submodule.0.conv",
        "model.1.submodule.1.submodule.1.submodule.0.conv",
    ]
    assert layer_labels(monai, ["input", *monai], 20) == [
        "1 " + short_labels(monai, 20)[0][0],
        "2 " + short_labels(monai, 20)[0][1],
        "3 " + short_labels(monai, 20)[0][2],
    ]
    assert short_labels(["a", "b"], 4) == (["a", "b"], False)


def test_map_thumbnails_are_large_and_zoomed_on_a_small_lesion(tmp_path):
    root = write_result(
        tmp_path / "run", n_images=3, n_layers=3, spatial=(96, 96), lesion_scale=0.2, units=0
    )
    page = build_report(root).read_text(encoding="utf-8")
    maps = section(page, "maps")
    sizes = []
    for src in re.findall(r'<img src="data:image/png;base64,([^"]+)"', maps):
        with Image.open(io.BytesIO(base64.b64decode(src))) as img:
            sizes.append(img.size)
    assert len(sizes) == 3 * (3 + 3) and all(max(s) >= 192 for s in sizes)
    with np.load(root / "maps.npz") as npz:
        label = npz["0:label"] > 0
        pred = npz["0:prediction"] >= 0.5
    r0, r1, c0, c1 = focus_box(label | pred)
    assert (r1 - r0, c1 - c0) == (48, 48)  # the minimum part around a small lesion
    assert f"rows {r0}–{r1 - 1}, columns {c0}–{c1 - 1} of 96×96" in maps
    # the crop holds the whole lesion
    assert label[r0:r1, c0:c1].sum() == label.sum() and pred[r0:r1, c0:c1].sum() == pred.sum()


def test_focus_box_by_hand():
    m = np.zeros((200, 100), bool)
    m[10:20, 95:100] = True  # 10 rows, at the right border
    assert focus_box(m) == (0, 48, 52, 100)  # 48 x 48, shifted inside the image
    m[:] = False
    m[50:90, 20:30] = True  # 40 rows: the part (120) would exceed half the image (100)
    assert focus_box(m) is None
    assert focus_box(np.zeros((10, 10), bool)) is None


def test_empty_cases_are_not_picked_as_examples(tmp_path):
    root = write_result(
        tmp_path / "run", n_images=4, n_layers=3, keep_maps=3, units=0, empty_first=True
    )
    with np.load(root / "maps.npz") as npz:
        assert not npz["0:label"].any() and not (npz["0:prediction"] >= 0.5).any()
    page = build_report(root, max_images=4).read_text(encoding="utf-8")
    maps = section(page, "maps")
    assert re.findall(r"<h3>Image <code>([^<]+)</code></h3>", maps) == ["case_001", "case_002"]
    assert "1 kept image(s) with an empty label and an empty prediction are not shown" in maps
    page = build_report(root, images=["case_000"]).read_text(encoding="utf-8")  # asked for: shown
    assert re.findall(r"<h3>Image <code>([^<]+)</code></h3>", section(page, "maps")) == ["case_000"]
