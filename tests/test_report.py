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
from segability.report import build_report
from segability.report.data import layer_roles, quality_table, read_result_folder
from segability.report.figures import SliceView, blend, pick_slice, unit_matrix

FINDINGS = [
    "Mean SA against the prediction ranks images as Dice does.",
    "<i>decoder</i> layers segment best.",
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
        for sid in ("findings", "sa-layers", "maps", "units", "quality", "history", "settings")
    }
    assert images_in == {
        "findings": 0,
        "sa-layers": 1,
        "maps": kept * (3 + n_layers),  # image, label, prediction, then each layer
        "units": 2 + n_layers * best,  # two charts, then the first image's best units
        "quality": 1 + kept,  # the scatter, a thumbnail per kept image
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
    assert toc == ["findings", "sa-layers", "maps", "units", "quality", "history", "settings"]


def test_absent_views_say_why(minimal):
    _, page = minimal
    assert section(page, "findings") is None  # no findings: no section
    for sid, file in (("maps", "maps.npz"), ("units", "units.parquet"), ("history", "history.csv")):
        body = section(page, sid)
        assert "Not shown" in body and file in body and "<img" not in body
        assert f'<li class="missing"><a href="#{sid}">' in page
    quality = section(page, "quality")
    assert "no labels in this run" in quality  # no scatter without Dice
    assert 'id="table-quality"' in quality  # but the label-free ranking is there
    assert section(page, "sa-layers").count("<img ") == 1


def test_encoder_decoder_shading_is_explained(full, minimal):
    assert "shading marks encoder and decoder layers" in section(full[1], "sa-layers")
    assert "do not tell encoder from decoder, so nothing is shaded" in section(
        minimal[1], "sa-layers"
    )


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


def test_quality_table_is_sorted_by_the_estimate_and_flags_match_qc(full):
    root, page = full
    qc = pd.read_csv(root / "qc.csv", dtype={"image": str})
    t = Tables(page)
    ids = t.column("table-quality", "image", text=True)
    assert ids == qc.sort_values("estimated_dice", kind="stable")["image"].tolist()
    est = np.array(t.column("table-quality", "estimated Dice"), dtype=float)
    assert np.all(np.diff(est) >= 0)
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
    assert f"n = {len(images)}" in quality and "coloured by group" in quality


def test_rank_correlations_with_ties_match_scipy():
    from scipy import stats

    from segability.report.html import _pearson, _spearman

    x = np.array([0.1, 0.4, 0.4, 0.9, 0.3, 0.3, 0.8])
    y = np.array([0.2, 0.5, 0.1, 0.9, 0.3, 0.6, 0.6])
    assert _spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert _pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert np.isnan(_spearman(np.ones(4), y[:4]))


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
    block = maps.split("<code>case_001</code>", 1)[1].split("<h3>", 1)[0]
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
    view = SliceView(image, None, slice_index=1)
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


def test_layer_roles_from_names():
    basic_unet = ["conv_0", "down_1", "down_4", "upcat_4", "upcat_1", "final_conv"]
    assert layer_roles(basic_unet) == {
        "conv_0": None,
        "down_1": "encoder",
        "down_4": "encoder",
        "upcat_4": "decoder",
        "upcat_1": "decoder",
        "final_conv": None,
    }
    assert set(layer_roles(["model.0.conv", "model.1.submodule.2.conv"]).values()) == {None}
    assert layer_roles(["encoder.layers.2", "decoderBlock3", "UpSample1", "encoder.up"]) == {
        "encoder.layers.2": "encoder",
        "decoderBlock3": "decoder",
        "UpSample1": "decoder",
        "encoder.up": None,
    }


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
    assert res.exit_code == 0, res.output
    assert out.is_file() and str(out) in res.output
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
    assert res.exit_code == 0, res.output
    assert "cli finding" in (tmp_path / "y.html").read_text(encoding="utf-8")


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
