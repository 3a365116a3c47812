"""The atlas at scale: build the site of a 100,000-feature synthetic run and open it in headless Chromium.

Steps and what is reported:
  run       ``sae4scfm.atlas.synthetic.synthetic_run`` (``--features`` x ``--cells``, planted cell-type
            features; not part of the bars); ``--run-dir`` reuses a run made before.
  build     wall and CPU time of ``build_site([run], out)`` (site + Neuronpedia/SAEDashboard export), the site's
            size on disk and file count (bar: < 120 s).
  browser   real headless Chromium (``/usr/bin/chromium`` driven by Playwright): wall time from
            ``page.goto(file://…/index.html)`` until the overview has rendered (``body[data-ready=1]``)
            (bar: < 2 s), then a gene search for a planted marker (the planted feature must be listed)
            and that feature's page; every request the page makes must be a file:// URL inside the site.

    python benchmarks/atlas.py [--features 100000] [--cells 2000] [--run-dir RUN] [--out SITE] [--keep]
                               [--no-build]   (with --run-dir and --out: only the browser part)

Exits 1 when a bar is missed or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUILD_BAR_S, LOAD_BAR_S = 120.0, 2.0


def site_size(site: Path) -> tuple[int, int]:
    """(bytes, files) under ``site``."""
    files = [p for p in site.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def browse(site: Path, feature_id: str, gene: str, timeout_ms: int = 60_000) -> dict:
    """Open the site from disk in headless Chromium; returns the load / search / feature times (s) and
    the requests that left the site folder (must be none)."""
    from playwright.sync_api import sync_playwright

    root = site.resolve().as_uri()
    outside: list[str] = []
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("request", lambda r: None if r.url.startswith(root + "/") else outside.append(r.url))
        t = time.perf_counter()
        page.goto(f"{root}/index.html")
        page.wait_for_selector('body[data-ready="1"]', timeout=timeout_ms)
        out["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        page.reload()
        page.wait_for_selector('body[data-ready="1"]', timeout=timeout_ms)
        out["reload_s"] = time.perf_counter() - t
        t = time.perf_counter()
        page.evaluate(f"location.hash = {json.dumps(f'#/search?q={gene}&kind=gene')}")
        page.wait_for_selector('body[data-page="search"][data-ready="1"]', timeout=timeout_ms)
        out["search_s"] = time.perf_counter() - t
        out["search_lists_planted"] = page.locator(f'#search-results a[href="#/feature/{feature_id}"]').count() > 0
        t = time.perf_counter()
        page.evaluate(f"location.hash = {json.dumps(f'#/feature/{feature_id}')}")
        page.wait_for_selector('body[data-page="feature"][data-ready="1"]', timeout=timeout_ms)
        out["feature_s"] = time.perf_counter() - t
        out["feature_page_text"] = page.inner_text("body")[:2000]
        browser.close()
    out["outside_requests"] = outside
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=100_000)
    p.add_argument("--cells", type=int, default=2_000)
    p.add_argument("--run-dir", type=Path, help="reuse this synthetic run (made by synthetic_run)")
    p.add_argument("--out", type=Path, help="site folder (default: a temp folder, deleted unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temp run and site")
    p.add_argument("--no-build", action="store_true", help="open the site already built at --out (browser only)")
    args = p.parse_args(argv)

    from sae4scfm.atlas.build import build_site
    from sae4scfm.atlas.synthetic import synthetic_run

    work = Path(tempfile.mkdtemp(prefix="atlas-bench-"))
    run_dir = args.run_dir
    if run_dir is None:
        t = time.perf_counter()
        run_dir = synthetic_run(work / "runs", n_features=args.features, n_cells=args.cells)
        print(f"synthetic run: {args.features} features x {args.cells} cells in {time.perf_counter() - t:.1f} s "
              f"({run_dir})")
    truth = json.loads((run_dir / "synthetic.json").read_text())
    site = args.out or work / "atlas"
    t, cpu = time.perf_counter(), time.process_time()
    if args.no_build:
        if args.out is None:
            p.error("--no-build needs --out (the built site)")
    else:
        build_site([run_dir], site, {})
    build_s = 0.0 if args.no_build else time.perf_counter() - t
    build_cpu_s = 0.0 if args.no_build else time.process_time() - cpu
    size, n_files = site_size(site)
    export_size, export_files = site_size(site / "export") if (site / "export").is_dir() else (0, 0)
    print(f"build: {truth['n_features']} features in {build_s:.1f} s wall, {build_cpu_s:.1f} s CPU"
          f"{' (not rebuilt)' if args.no_build else ''} (bar < {BUILD_BAR_S:.0f} s); site "
          f"{size / 2**20:.1f} MiB in {n_files} files (export {export_size / 2**20:.1f} MiB in {export_files} files)")

    run_id = f"{run_dir.parent.name}--{run_dir.name}"
    feature_id = f"{run_id}/L{json.loads((run_dir / 'cfg.json').read_text())['layer']}/{truth['type_features']['B']}"
    gene = truth["markers"]["B"][1]
    got = browse(site, feature_id, gene)
    print(f"browser: index loaded in {got['load_s']:.2f} s (bar < {LOAD_BAR_S:.0f} s; reloaded in "
          f"{got['reload_s']:.2f} s); gene search {gene!r} "
          f"in {got['search_s']:.2f} s (planted B feature listed: {got['search_lists_planted']}); feature page in "
          f"{got['feature_s']:.2f} s; requests outside the site: {len(got['outside_requests'])}")
    ok = (build_s < BUILD_BAR_S and got["load_s"] < LOAD_BAR_S and got["search_lists_planted"]
          and not got["outside_requests"] and gene in got["feature_page_text"])
    if not args.keep and args.out is None and args.run_dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    elif args.keep:
        print(f"kept: {work}")
    met = "browser bars met (build not timed)" if args.no_build else "all bars met"
    print(met if ok else "BAR MISSED or check failed", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
