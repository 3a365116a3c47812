/* sae4scfm feature atlas: a hand-written single-page app, opened from disk (file://).
 * Data files are scripts calling window.atlasData(key, payload); load(key, path) adds the <script> tag
 * and resolves when that key arrives. Routes (stable links): #/  #/run/<run>  #/layer/<run>
 * #/feature/<run>/L<layer>/<index>  #/search?q=<text>&kind=gene|term|label  #/module/<run>/<module>  #/flow
 * Plots: plotly.js (assets/plotly.min.js, loaded by the first page that draws), WebGL scatter for cells and features. No network requests. */
(function () {
  "use strict";
  const store = {}, waiting = {}, requested = {};
  window.atlasData = function (key, payload) {
    store[key] = payload;
    (waiting[key] || []).forEach((w) => w.resolve(payload));
    delete waiting[key];
  };
  function load(key, path) {
    if (key in store) return Promise.resolve(store[key]);
    return new Promise((resolve, reject) => {
      (waiting[key] = waiting[key] || []).push({ resolve, reject });
      if (requested[key]) return;
      requested[key] = true;
      const s = document.createElement("script");
      s.src = path;
      s.onerror = () => {
        delete requested[key];
        (waiting[key] || []).forEach((w) => w.reject(new Error("missing data file " + path)));
        delete waiting[key];
      };
      document.head.appendChild(s);
      s.onload = () => s.remove();
    });
  }
  let plotlyLoading = null;
  function plotly() {  // plotly.js (4.6 MB) is loaded on the first page that draws, so the index opens fast
    if (window.Plotly) return Promise.resolve(window.Plotly);
    return plotlyLoading || (plotlyLoading = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = "assets/plotly.min.js";
      s.onload = () => resolve(window.Plotly);
      s.onerror = () => { plotlyLoading = null; reject(new Error("missing assets/plotly.min.js")); };
      document.head.appendChild(s);
    }));
  }
  const app = document.getElementById("app");
  const esc = (v) => String(v == null ? "" : v).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const fmt = (v, d = 3) => (v == null || v === "" ? "–" : typeof v === "number" ? (Math.abs(v) >= 1e-3 || v === 0 ? +v.toPrecision(d) : v.toExponential(1)) : esc(v));
  const manifest = () => load("manifest", "data/manifest.js");
  const runOf = (fid) => fid.slice(0, fid.lastIndexOf("/L"));
  const indexOf = (fid) => fid.slice(fid.lastIndexOf("/") + 1);
  const featureLink = (fid, text) => `<a href="#/feature/${esc(fid)}">${esc(text || fid)}</a>`;
  const feature = (fid) => load("feature/" + fid, `data/${runOf(fid)}/features/${indexOf(fid)}.js`);
  const searchLink = (kind, q, text) => `<a href="#/search?q=${encodeURIComponent(q)}&kind=${kind}">${esc(text || q)}</a>`;
  const layout = (extra) => Object.assign({ margin: { l: 50, r: 20, t: 30, b: 40 }, hovermode: "closest", paper_bgcolor: "#fff", plot_bgcolor: "#fff" }, extra || {});
  const config = { displaylogo: false, responsive: true };
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5", "#dbdb8d", "#393b79"];

  function table(cols, rows) {
    if (!rows || !rows.length) return '<p class="muted">none</p>';
    return "<table><thead><tr>" + cols.map((c) => `<th>${esc(c[0])}</th>`).join("") + "</tr></thead><tbody>" +
      rows.map((r) => "<tr>" + cols.map((c) => `<td${c[2] ? ' class="num"' : ""}>${c[1](r)}</td>`).join("") + "</tr>").join("") + "</tbody></table>";
  }
  function recordsTable(rows, empty) {
    if (!rows || !rows.length) return `<p class="muted">${empty || "not computed"}</p>`;
    const cols = Object.keys(rows[0]);
    const cell = (c) => (c === "target_id" || c === "source_id")  // circuit edges: link the other end's feature
      ? (r) => (r[c] ? featureLink(r[c]) : '<span class="muted">run not in this site</span>') : (r) => fmt(r[c]);
    return table(cols.map((c) => [c, cell(c), typeof rows[0][c] === "number"]), rows);
  }

  // FNV-1a over UTF-16 code units: the same shard as sae4scfm.atlas.build.shard_of
  function shardOf(key, n) {
    let h = 0x811c9dc5;
    for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193) >>> 0;
    return h % n;
  }

  async function overviewPage() {
    const m = await manifest();
    app.innerHTML = `<h1>Feature atlas</h1><p class="muted">${m.runs.length} run(s), built ${esc(m.built)}</p>` +
      table([["run", (r) => `<a href="#/run/${esc(r.run_id)}">${esc(r.run_id)}</a>`], ["model", (r) => esc(r.model)],
        ["data", (r) => esc(r.dataset)], ["layer", (r) => esc(r.layer)], ["SAE", (r) => esc(r.architecture)],
        ["features", (r) => fmt(r.n_features), true], ["cells", (r) => fmt(r.n_cells), true],
        ["FVU", (r) => fmt(r.eval.fvu), true], ["L0", (r) => fmt(r.eval.l0), true],
        ["dead", (r) => fmt(r.eval.dead_fraction), true], ["loss recovered", (r) => fmt(r.eval.loss_recovered), true],
        ["", (r) => `<a href="#/layer/${esc(r.run_id)}">layer map</a>`]], m.runs) +
      `<p><a href="#/flow">cross-layer flow</a></p><div class="card"><h2>L0 vs FVU (held out)</h2><div id="l0-fvu" class="plot"></div></div>`;
    if (m.runs.some((r) => r.eval.fvu != null)) {  // drawn after the page is up: the index needs no plotly.js to open
      plotly().then((Plotly) => Plotly.newPlot("l0-fvu", [{ type: "scatter", mode: "markers+text", x: m.runs.map((r) => r.eval.l0), y: m.runs.map((r) => r.eval.fvu),
        text: m.runs.map((r) => `L${r.layer}`), textposition: "top center", hovertext: m.runs.map((r) => r.run_id), marker: { size: 10 } }],
        layout({ xaxis: { title: "L0 (active features per token)" }, yaxis: { title: "FVU" } }), config));
    }
  }

  async function runPage(runId) {
    const [o, mods, Plotly] = await Promise.all([load("overview/" + runId, `data/${runId}/overview.js`),
      load("modules/" + runId, `data/${runId}/modules.js`), plotly()]);
    const r = o.run;
    app.innerHTML = `<h1>${esc(runId)}</h1><p>${esc(r.model)} · ${esc(r.dataset)} · layer ${esc(r.layer)} (${esc(r.hook_point)}) ·
      ${esc(r.architecture)} ${esc(JSON.stringify(r.hyperparams || {}))} · ${fmt(r.n_features)} features · ${fmt(r.n_cells)} cells ·
      <a href="#/layer/${esc(runId)}">layer map</a></p>
      <div class="card"><h2>Held-out metrics</h2>${recordsTable([r.eval])}</div>
      <div class="grid"><div class="card"><h2>Training: FVU and L0</h2><div id="curves" class="plot"></div></div>
      <div class="card"><h2>Feature density (fraction of cells firing)</h2><div id="density" class="plot"></div>
      <p class="muted">${fmt(o.density.dead)} features never fire; median density ${fmt(o.density.median)}</p></div></div>
      <div class="card"><h2>Trained vs random-init control</h2>${recordsTable(o.control)}</div>
      <div class="card"><h2>SAE vs baselines</h2>${recordsTable(o.baselines)}</div>
      <div class="card"><h2>Cross-layer persistence</h2>${recordsTable(o.cross_layer)}</div>
      <div class="card"><h2>Modules</h2>${table([["module", (m) => `<a href="#/module/${esc(runId)}/${esc(m.module)}">${esc(m.module)}</a>`],
        ["size", (m) => fmt(m.size), true], ["labels", (m) => esc(Object.values(m.labels).filter(Boolean).join(" · "))]], mods.modules)}</div>`;
    const c = o.curves;
    if (c.step && c.step.length) {
      Plotly.newPlot("curves", [{ x: c.step, y: c.fvu, name: "FVU", type: "scatter" },
        { x: c.step, y: c.l0, name: "L0", yaxis: "y2", type: "scatter" }],
        layout({ xaxis: { title: "step" }, yaxis: { title: "FVU" }, yaxis2: { title: "L0", overlaying: "y", side: "right" } }), config);
    }
    const e = o.density.log10_edges;
    await Plotly.newPlot("density", [{ type: "bar", x: e.slice(0, -1).map((v, i) => (v + e[i + 1]) / 2), y: o.density.counts }],
      layout({ xaxis: { title: "log10 fraction of cells" }, yaxis: { title: "features" } }), config);
  }

  async function layerPage(runId) {
    const [d, Plotly] = await Promise.all([load("layer_map/" + runId, `data/${runId}/layer_map.js`), plotly()]);
    app.innerHTML = `<h1>Layer map · ${esc(runId)}</h1><p class="muted">${esc(d.method.toUpperCase())} of the decoder directions,
      coloured by ${esc(d.colour_by)}; click a point to open the feature.</p><div id="layer-map" class="plot tall"></div>`;
    const traces = d.categories.map((cat, ci) => ({ type: "scattergl", mode: "markers", name: cat, x: [], y: [], text: [], customdata: [],
      marker: { size: 5, color: cat === "unlabelled" ? "#cccccc" : PALETTE[ci % PALETTE.length] }, hoverinfo: "text" }));
    d.x.forEach((x, i) => { const t = traces[d.colour[i]]; t.x.push(x); t.y.push(d.y[i]); t.text.push(d.text[i]); t.customdata.push(i); });
    await Plotly.newPlot("layer-map", traces, layout({ legend: { itemsizing: "constant" } }), config);
    document.getElementById("layer-map").on("plotly_click", (ev) => {
      const i = ev.points[0].customdata;
      location.hash = `#/feature/${runId}/L${d.layer}/${i}`;
    });
  }

  async function featurePage(fid) {
    const runId = runOf(fid);
    const [f, cells, m, Plotly] = await Promise.all([feature(fid), load("cells/" + runId, `data/${runId}/cells.js`),
      manifest(), plotly()]);
    const inSite = new Set(m.runs.map((r) => r.run_id));
    const crossLink = (x) => inSite.has(runOf(x.feature_id)) ? featureLink(x.feature_id) : esc(x.feature_id) + ' <span class="muted">(run not in this site)</span>';
    app.innerHTML = `<h1>Feature ${esc(f.index)} <span class="muted">· ${esc(runId)} · layer ${esc(f.layer)}</span></h1>
      <p class="explanation">${esc(f.explanation || "no annotation")}</p>
      <p>fires in ${fmt(100 * f.density.cells)}% of cells${f.density.tokens != null ? `, ${fmt(100 * f.density.tokens)}% of gene tokens` : ""};
      max activation ${fmt(f.max_activation)}; module ${f.module ? `<a id="module-link" href="#/module/${esc(runId)}/${esc(f.module)}">${esc(f.module)}</a>` : "–"};
      <a href="#/layer/${esc(runId)}">layer map</a></p>
      <div class="grid">
        <div class="card"><h2>Cells (UMAP), coloured by activation</h2><div id="cell-umap" class="plot"></div></div>
        <div class="card"><h2>Label AUROC</h2><div id="auroc-chart" class="plot"></div></div>
        <div class="card"><h2>Top genes</h2>${table([["gene", (g) => searchLink("gene", g.gene, g.gene)], ["score", (g) => fmt(g.score), true]], f.top_genes)}
          <h2>Genes it fires on most</h2>${table([["gene", (g) => searchLink("gene", g.gene, g.gene)], ["fraction of its tokens", (g) => fmt(g.freq), true],
            ["mean activation", (g) => fmt(g.mean_activation), true]], f.firing_genes)}</div>
        <div class="card"><h2>Activation histogram (firing cells)</h2><div id="histogram" class="plot"></div></div>
      </div>
      <div class="card"><h2>Enriched terms</h2>${table([["collection", (e) => esc(e.collection)], ["term", (e) => searchLink("term", e.term, e.term)],
        ["FDR", (e) => fmt(e.fdr), true], ["overlap", (e) => fmt(e.overlap), true], ["genes", (e) => esc(e.genes.join(", "))]], f.enrichment)}</div>
      <div class="card"><h2>Top cells</h2>${table([["cell", (c) => esc(c.cell)], ["activation", (c) => fmt(c.activation), true],
        ["cell type", (c) => c.cell_type ? searchLink("label", c.cell_type, c.cell_type) : "–"], ["condition", (c) => esc(c.condition || "–")],
        ["split", (c) => esc(c.split || "–")], ["genes where it fires", (c) => esc(c.genes.map((g) => `${g.gene} ${fmt(g.activation)}`).join(", "))]], f.top_cells)}</div>
      <div class="grid">
        <div class="card"><h2>Co-firing neighbours</h2>${table([["feature", (x) => featureLink(x.feature_id)], ["PMI", (x) => fmt(x.pmi), true], ["q", (x) => fmt(x.q), true]], f.coactivation)}</div>
        <div class="card"><h2>Decoder neighbours</h2>${table([["feature", (x) => featureLink(x.feature_id)], ["cosine", (x) => fmt(x.cosine), true]], f.decoder_neighbours)}</div>
        <div class="card" id="cross-layer"><h2>Cross-layer matches</h2>${table([["feature", crossLink], ["by", (x) => esc(x.by || "")],
          ["cosine", (x) => fmt(x.cosine), true], ["Jaccard", (x) => fmt(x.jaccard), true]], f.cross_layer)}</div>
        <div class="card"><h2>Causal effects</h2>${f.causal ? Object.keys(f.causal).map((k) => `<div id="causal-${k}"><h3>${k}</h3>${recordsTable(f.causal[k], "none for this feature")}</div>`).join("") : '<p class="muted">no causal run</p>'}</div>
      </div>`;
    const act = new Float64Array(cells.n);
    f.cell_activations.index.forEach((p, i) => { act[p] = f.cell_activations.value[i]; });
    const ct = cells.cell_type ? cells.cell_type.map((c) => cells.categories.cell_type[c]) : null;
    const drawn = [];
    drawn.push(Plotly.newPlot("cell-umap", [{ type: "scattergl", mode: "markers", x: cells.x, y: cells.y, text: ct,
      marker: { size: 4, color: Array.from(act), colorscale: "Viridis", showscale: true, colorbar: { title: "act." } },
      hovertemplate: "%{text}<br>activation %{marker.color:.3f}<extra></extra>" }],
      layout({ xaxis: { showticklabels: false, title: "UMAP 1" }, yaxis: { showticklabels: false, title: "UMAP 2" } }), config));
    const la = f.label_auroc.slice().reverse();
    drawn.push(Plotly.newPlot("auroc-chart", [{ type: "bar", orientation: "h", x: la.map((a) => a.auroc), y: la.map((a) => (new Set(la.map((b) => b.key)).size > 1 ? `${a.key}: ` : "") + a.label),
      text: la.map((a) => a.auroc_eval != null ? `eval ${fmt(a.auroc_eval)}` : ""), marker: { color: "#2563eb" } }],
      layout({ margin: { l: 220, r: 20, t: 20, b: 40 }, xaxis: { range: [0, 1], title: "AUROC (one vs rest)" } }), config));
    const e = f.activation_histogram.edges;
    drawn.push(Plotly.newPlot("histogram", [{ type: "bar", x: e.slice(0, -1).map((v, i) => (v + e[i + 1]) / 2), y: f.activation_histogram.counts }],
      layout({ xaxis: { title: "activation" }, yaxis: { title: "cells" } }), config));
    await Promise.all(drawn);
  }

  async function searchPage(params) {
    const q = (params.get("q") || "").trim(), kind = params.get("kind") || "gene";
    document.getElementById("search-q").value = q;
    document.getElementById("search-kind").value = kind;
    const m = await manifest();
    const n = (m.search || {})[kind] || 1;
    const words = kind !== "gene" ? (q.toLowerCase().match(/[0-9a-z]+/g) || []) : [q.toLowerCase()];
    const key = q.toLowerCase();
    let hits = [];
    const lookup = async (k) => (await load(`search/${kind}/${shardOf(k, n)}`, `data/search/${kind}/${shardOf(k, n)}.js`))[k] || [];
    const exact = await lookup(key);
    if (exact.length || kind === "gene" || words.length < 2) hits = exact;
    else {  // a term / label query of several words: features indexed under every word
      const lists = await Promise.all(words.map(lookup));
      const common = lists.reduce((a, b) => a.filter((x) => b.includes(x)));
      hits = common;
    }
    const shown = hits.slice(0, 30);
    const recs = await Promise.all(shown.map((fid) => feature(fid).catch(() => null)));
    app.innerHTML = `<h1>Search ${esc(kind)}: “${esc(q)}”</h1><p class="muted">${hits.length} feature(s)${hits.length > shown.length ? `, first ${shown.length} shown` : ""}</p>` +
      `<div id="search-results">` + table([["feature", (i) => featureLink(shown[i])], ["explanation", (i) => esc(recs[i] ? recs[i].explanation : "")],
        ["top genes", (i) => esc(recs[i] ? recs[i].top_genes.slice(0, 6).map((g) => g.gene).join(", ") : "")]], shown.map((_, i) => i)) + "</div>";
  }

  async function modulePage(runId, mod) {
    const d = await load("modules/" + runId, `data/${runId}/modules.js`);
    const m = d.modules.find((x) => x.module === mod);
    if (!m) { app.innerHTML = `<h1>Module ${esc(mod)}</h1><p>not found in ${esc(runId)}</p>`; return; }
    app.innerHTML = `<h1>Module ${esc(mod)} <span class="muted">· ${esc(runId)}</span></h1>
      <p>${fmt(m.size)} co-firing features; ${esc(Object.entries(m.labels).filter((x) => x[1]).map((x) => `${x[0]}: ${x[1]}`).join(" · ") || "no shared label")}</p>
      <div id="module-members">${table([["feature", (x) => featureLink(x.feature_id)], ["explanation", (x) => esc(x.text)]], m.features)}</div>`;
  }

  async function flowPage() {
    const [d, Plotly] = await Promise.all([load("flow", "data/flow.js"), plotly()]);
    app.innerHTML = `<h1>Cross-layer flow</h1><div class="card"><h2>Persistence</h2>${table([["from", (p) => `${esc(p.run_a)} (L${esc(p.layer_a)})`],
      ["to", (p) => `${esc(p.run_b)} (L${esc(p.layer_b)})${p.in_site ? "" : ' <span class="muted">not in site</span>'}`],
      ["decoder persistence", (p) => fmt(p.decoder_persistence), true], ["co-firing persistence", (p) => fmt(p.cofiring_persistence), true]], d.pairs)}</div>
      <div class="card"><h2>Decoder matches between groups</h2><div id="flow-sankey" class="plot tall"></div></div>
      <div class="card"><h2>Strongest matches</h2>${table([["shallower feature", (x) => featureLink(x.a)], ["deeper match", (x) => featureLink(x.b)], ["cosine", (x) => fmt(x.cosine), true]], d.strongest)}</div>`;
    if (d.links.length) {
      await Plotly.newPlot("flow-sankey", [{ type: "sankey", node: { label: d.nodes, pad: 10 },
        link: { source: d.links.map((l) => l.source), target: d.links.map((l) => l.target), value: d.links.map((l) => l.value) } }], layout(), config);
    } else document.getElementById("flow-sankey").outerHTML = '<p class="muted">no cross-layer matches between runs of this site</p>';
  }

  async function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    document.body.dataset.page = parts[0] || "overview";
    document.body.dataset.ready = "0";
    try {
      if (!parts.length) await overviewPage();
      else if (parts[0] === "run") await runPage(parts[1]);
      else if (parts[0] === "layer") await layerPage(parts[1]);
      else if (parts[0] === "feature") await featurePage(parts.slice(1).join("/"));
      else if (parts[0] === "search") await searchPage(new URLSearchParams(query || ""));
      else if (parts[0] === "module") await modulePage(parts[1], parts[2]);
      else if (parts[0] === "flow") await flowPage();
      else app.innerHTML = `<h1>Not found</h1><p>${esc(hash)}</p>`;
    } catch (err) {
      app.innerHTML = `<h1>Could not load this page</h1><p class="muted">${esc(err.message)}</p>`;
    }
    document.body.dataset.ready = "1";
    window.scrollTo(0, 0);
  }
  document.getElementById("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    location.hash = `#/search?q=${encodeURIComponent(document.getElementById("search-q").value)}&kind=${document.getElementById("search-kind").value}`;
  });
  window.addEventListener("hashchange", route);
  route();
})();
