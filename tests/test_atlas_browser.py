"""The atlas in real headless Chromium, opened from disk: search a marker gene, open a feature, the bar chart
and the cell UMAP render with the run's cell count, links to a module and a cross-layer match work, and no
request leaves the site folder. Needs Debian's chromium (``apt-get install -y chromium``) and Playwright's
Python client (``pip install playwright``; never ``playwright install``): missing either fails the run.
Screenshots are kept as artifacts in ``$SAE4SCFM_ATLAS_ARTIFACTS`` (default: ``<repo>/outputs/atlas``, ignored by
git); the test asserts each PNG is written and non-empty. Waits are on the page being routed to
(``body[data-page=...][data-ready="1"]``) or Playwright's auto-retrying ``expect``."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest

from sae4scfm.atlas.build import shard_of
from sae4scfm.atlas.records import run_id_of
from tests.conftest import REPO_ROOT
from tests.test_atlas_site import build_demo_site, read_js

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
expect = None  # playwright.sync_api.expect, set by the browser fixture
MARKERS = ["CD79A", "MS4A1", "CD79B", "NKG7", "GNLY", "LYZ", "S100A8", "CD14", "FCGR3A", "CD3E", "IL7R"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_site(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")  # a skip for a missing module fails the run
    global expect
    expect = sync_api.expect
    exe = shutil.which("chromium") or CHROMIUM
    if not Path(exe).is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


def _wait(page, name: str, hash_: str | None = None) -> None:
    """Wait until the router has rendered page ``name`` (after ``location.hash`` is ``hash_``, when given)."""
    if hash_ is not None:
        page.wait_for_function(f"location.hash === {hash_!r}", timeout=20_000)
    page.wait_for_selector(f'body[data-page="{name}"][data-ready="1"]', timeout=20_000)


def _pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _shot(page, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.is_file() and path.stat().st_size > 1000, path


def test_atlas_in_headless_chromium(browser, demo):  # browser first: a missing one fails fast
    site, dirs = demo["site"], demo["dirs"]
    artifacts = Path(os.environ.get("SAE4SCFM_ATLAS_ARTIFACTS") or REPO_ROOT / "outputs" / "atlas")
    artifacts.mkdir(parents=True, exist_ok=True)
    _, manifest = read_js(site / "data" / "manifest.js")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))

    started = time.perf_counter()
    page.goto((site / "index.html").as_uri())
    _wait(page, "overview")
    load_s = time.perf_counter() - started
    print(f"index page loaded in {load_s:.2f} s")
    assert page.locator("main table tbody tr").count() == len(manifest["runs"]) == 2
    _shot(page, artifacts, "overview")

    # search a marker gene through the search box
    n = manifest["search"]["gene"]
    gene = next(g for g in MARKERS if g.lower() in read_js(site / "data" / "search" / "gene" / f"{shard_of(g.lower(), n)}.js")[1])
    page.fill("#search-q", gene)
    page.select_option("#search-kind", "gene")
    page.click("#search-form button")
    _wait(page, "search")
    links = page.locator("#search-results a")
    assert links.count() >= 1
    _shot(page, artifacts, "search")
    fid = links.first.inner_text()
    links.first.click()
    _wait(page, "feature", f"#/feature/{fid}")
    expect(page.locator("h1")).to_contain_text(f"Feature {fid.rsplit('/', 1)[1]}")
    run_id, index_ = fid.rsplit("/L", 1)[0], int(fid.rsplit("/", 1)[1])
    _, rec = read_js(site / "data" / run_id / "features" / f"{index_}.js")
    assert gene in [g["gene"] for g in rec["top_genes"] + rec["firing_genes"]]
    n_cells = next(r["n_cells"] for r in manifest["runs"] if r["run_id"] == run_id)
    # the label-AUROC bar chart: one SVG bar per label of the record, each as long as its AUROC
    widths = page.evaluate("Array.from(document.querySelectorAll('#auroc-chart .bars path'))"
                           ".map(p => p.getBBox().width)")
    aurocs = [a["auroc"] for a in rec["label_auroc"]][::-1]  # drawn bottom-up
    assert len(widths) == len(aurocs) > 0 and min(widths) > 0
    assert [round(w / widths[0] * aurocs[0], 2) for w in widths] == pytest.approx(aurocs, abs=0.02)
    # the cell UMAP: a WebGL scatter of every cell of the run; its points are drawn: hiding the trace changes
    # hundreds of pixels of the WebGL canvas's area
    assert page.evaluate("document.getElementById('cell-umap').data[0].x.length") == n_cells == 300
    assert page.evaluate("document.getElementById('cell-umap')._fullData[0].type") == "scattergl"
    canvas = page.locator("#cell-umap canvas.gl-canvas-context")
    assert canvas.count() == 1 and canvas.bounding_box()["width"] > 100
    drawn = _pixels(canvas.screenshot())
    _shot(page, artifacts, "feature")
    page.evaluate("Plotly.restyle('cell-umap', {visible: false})")
    page.wait_for_timeout(300)  # WebGL redraws on the next animation frame
    hidden = _pixels(canvas.screenshot())
    changed = (abs(drawn - hidden).sum(axis=2) > 30).sum()
    assert changed > 500, changed
    background = hidden.reshape(-1, 3)[0]
    assert (abs(drawn - background).sum(axis=2) > 30).sum() > (abs(hidden - background).sum(axis=2) > 30).sum() + 500

    # a feature with a module and a cross-layer match in the other run: follow both links
    run_dir = dirs[2]
    for f in range(512):
        _, rec = read_js(site / "data" / run_id_of(run_dir) / "features" / f"{f}.js")
        if rec["module"] and rec["cross_layer"]:
            break
    page.evaluate(f"location.hash = '#/feature/{rec['id']}'")
    _wait(page, "feature", f"#/feature/{rec['id']}")
    expect(page.locator("h1")).to_contain_text(f"Feature {rec['index']} · {rec['run_id']}")
    page.click("#module-link")
    _wait(page, "module", f"#/module/{rec['run_id']}/{rec['module']}")
    expect(page.locator("#module-members")).to_contain_text(rec["id"])
    _shot(page, artifacts, "module")
    page.go_back()
    _wait(page, "feature", f"#/feature/{rec['id']}")
    target = rec["cross_layer"][0]["feature_id"]
    page.click(f"#cross-layer a[href='#/feature/{target}']")
    _wait(page, "feature", f"#/feature/{target}")
    expect(page.locator("h1")).to_contain_text(f"Feature {target.rsplit('/', 1)[1]} · {run_id_of(dirs[1])}")
    _shot(page, artifacts, "cross_layer")

    # causal tables: a circuit edge of a layer-1 feature links to its target, whose page lists the edge coming in
    src, dst = f"{run_id_of(dirs[1])}/L1/3", f"{run_id_of(dirs[2])}/L2/7"
    page.evaluate(f"location.hash = '#/feature/{src}'")
    _wait(page, "feature", f"#/feature/{src}")
    expect(page.locator("#causal-edges tbody tr")).to_have_count(2)
    page.click(f"#causal-edges a[href='#/feature/{dst}']")
    _wait(page, "feature", f"#/feature/{dst}")
    expect(page.locator("#causal-incoming_edges")).to_contain_text(src)
    expect(page.locator("#causal-steering tbody tr")).to_have_count(2)
    _shot(page, artifacts, "causal")

    # the layer map and the flow render too
    page.evaluate(f"location.hash = '#/layer/{run_id_of(run_dir)}'")
    _wait(page, "layer")
    assert sum(page.evaluate("document.getElementById('layer-map').data.map(t => t.x.length)")) == 512
    page.evaluate("location.hash = '#/flow'")
    _wait(page, "flow")
    assert page.locator("#flow-sankey .sankey-node").count() > 1
    _shot(page, artifacts, "flow")

    assert errors == []
    root = site.resolve().as_uri() + "/"
    outside = [u for u in requests if not u.startswith(root)]
    assert requests and outside == [], outside[:5]
