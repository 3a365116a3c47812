"""The atlas in real headless Chromium, opened from disk: search a marker gene, open a feature, the bar chart
and the cell UMAP render with the run's cell count, links to a module and a cross-layer match work, and no
request leaves the site folder. Needs Debian's chromium (``apt-get install -y chromium``) and Playwright's
Python client (``pip install playwright``; never ``playwright install``): missing either fails the run.
Screenshots go to ``$SAE4SCFM_ATLAS_ARTIFACTS`` (default: the test's tmp_path)."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest

from sae4scfm.atlas.build import shard_of
from sae4scfm.atlas.records import run_id_of
from tests.test_atlas_site import build_demo_site, read_js

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MARKERS = ["CD79A", "MS4A1", "CD79B", "NKG7", "GNLY", "LYZ", "S100A8", "CD14", "FCGR3A", "CD3E", "IL7R"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_site(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")  # a skip for a missing module fails the run
    exe = shutil.which("chromium") or CHROMIUM
    if not Path(exe).is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


def _wait(page):
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)


def _distinct_colours(png: bytes) -> int:
    from PIL import Image

    return len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(1 << 24))


def test_atlas_in_headless_chromium(browser, demo, tmp_path):  # browser first: a missing one fails fast
    site, dirs = demo["site"], demo["dirs"]
    artifacts = Path(os.environ.get("SAE4SCFM_ATLAS_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    _, manifest = read_js(site / "data" / "manifest.js")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))

    started = time.perf_counter()
    page.goto((site / "index.html").as_uri())
    _wait(page)
    load_s = time.perf_counter() - started
    print(f"index page loaded in {load_s:.2f} s")
    assert page.locator("main table tbody tr").count() == len(manifest["runs"]) == 2
    page.screenshot(path=str(artifacts / "overview.png"), full_page=True)

    # search a marker gene through the search box
    n = manifest["search"]["gene"]
    gene = next(g for g in MARKERS if g.lower() in read_js(site / "data" / "search" / "gene" / f"{shard_of(g.lower(), n)}.js")[1])
    page.fill("#search-q", gene)
    page.select_option("#search-kind", "gene")
    page.click("#search-form button")
    page.wait_for_function("location.hash.startsWith('#/search')")
    _wait(page)
    links = page.locator("#search-results a")
    assert links.count() >= 1
    page.screenshot(path=str(artifacts / "search.png"), full_page=True)
    fid = links.first.inner_text()
    links.first.click()
    page.wait_for_function(f"location.hash === '#/feature/{fid}'")
    _wait(page)
    run_id, index_ = fid.rsplit("/L", 1)[0], int(fid.rsplit("/", 1)[1])
    _, rec = read_js(site / "data" / run_id / "features" / f"{index_}.js")
    assert gene in [g["gene"] for g in rec["top_genes"] + rec["firing_genes"]]
    n_cells = next(r["n_cells"] for r in manifest["runs"] if r["run_id"] == run_id)
    # the label-AUROC bar chart: one SVG bar per label of the record
    assert page.locator("#auroc-chart .bars path").count() == len(rec["label_auroc"]) > 0
    # the cell UMAP: a WebGL scatter of every cell of the run, drawn (non-blank canvas)
    assert page.evaluate("document.getElementById('cell-umap').data[0].x.length") == n_cells == 300
    assert page.evaluate("document.getElementById('cell-umap')._fullData[0].type") == "scattergl"
    canvas = page.locator("#cell-umap canvas").first
    assert canvas.bounding_box()["width"] > 100
    assert _distinct_colours(page.locator("#cell-umap").screenshot()) > 20
    page.screenshot(path=str(artifacts / "feature.png"), full_page=True)

    # a feature with a module and a cross-layer match in the other run: follow both links
    run_dir = dirs[2]
    for f in range(512):
        _, rec = read_js(site / "data" / run_id_of(run_dir) / "features" / f"{f}.js")
        if rec["module"] and rec["cross_layer"]:
            break
    page.evaluate(f"location.hash = '#/feature/{rec['id']}'")
    _wait(page)
    page.click("#module-link")
    page.wait_for_function(f"location.hash === '#/module/{rec['run_id']}/{rec['module']}'")
    _wait(page)
    assert rec["id"] in page.locator("#module-members").inner_text()
    page.screenshot(path=str(artifacts / "module.png"), full_page=True)
    page.go_back()
    _wait(page)
    target = rec["cross_layer"][0]["feature_id"]
    page.click(f"#cross-layer a[href='#/feature/{target}']")
    page.wait_for_function(f"location.hash === '#/feature/{target}'")
    _wait(page)
    assert page.locator("h1").inner_text().startswith(f"Feature {target.rsplit('/', 1)[1]}")
    assert run_id_of(dirs[1]) in page.locator("h1").inner_text()
    page.screenshot(path=str(artifacts / "cross_layer.png"), full_page=True)

    # the layer map and the flow render too
    page.evaluate(f"location.hash = '#/layer/{run_id_of(run_dir)}'")
    _wait(page)
    assert sum(page.evaluate("document.getElementById('layer-map').data.map(t => t.x.length)")) == 512
    page.evaluate("location.hash = '#/flow'")
    _wait(page)
    assert page.locator("#flow-sankey .sankey-node").count() > 1
    page.screenshot(path=str(artifacts / "flow.png"), full_page=True)

    assert errors == []
    root = site.resolve().as_uri() + "/"
    outside = [u for u in requests if not u.startswith(root)]
    assert requests and outside == [], outside[:5]
