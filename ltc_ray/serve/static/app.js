// ltc-ray results browser: one page, hash routes, plain DOM (no framework, no build step).
//
// Routes (reload and back/forward work because all state lives in the hash):
//   #/                                    runs
//   #/run/<run>?sort=size&order=desc&page=1   run overview + clusters list
//   #/run/<run>/cluster/<id>?page=2       one cluster's thumbnail grid
//   #/run/<run>/search?q=TEXT             clusters and images whose name matches
// <run> is encodeURIComponent(run id), so nested run ids ("a/reclusters/3-kmeans-...") stay one
// segment. Everything a user or a file named (run, cluster and image names, annotations) is
// put in the page with textContent; only the server's own plot SVG is parsed as markup.

const CLUSTERS_PER_PAGE = 50;
const THUMBS_PER_PAGE = 48;
const SEARCH_LIMIT = 100;
const POLL_MS = 400;
const JOBS_KEY = "ltc-ray-jobs";

const nf = new Intl.NumberFormat("en-US");
const view = document.getElementById("view");
const crumbs = document.getElementById("crumbs");
const errorBox = document.getElementById("error");
const searchForm = document.getElementById("search-form");
const searchInput = document.getElementById("search-input");

let renderToken = 0; // bumped on every route; stale fetches check it and drop their result
let currentRoute = null;
let runsCache = null; // the /api/runs list; cleared when a re-cluster finishes
const overviewCache = new Map(); // run -> overview (finished runs never change)
const selection = { key: "", clusters: new Set(), samples: new Set() };

// ---------------------------------------------------------------- small helpers

/** Element factory: h("a", {href, class, text, dataset, on: {click}}, ...children). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") Object.assign(el.style, value); // CSSOM: allowed under a strict CSP
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
    else if (key === "testid") el.setAttribute("data-testid", value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const enc = encodeURIComponent;

/** The view's new content (null/false entries, from optional sections, are left out). */
function mount(...nodes) {
  view.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : "";
}

const runHref = (run, params = {}) => `#/run/${enc(run)}${qs(params)}`;
const clusterHref = (run, id, page) =>
  `#/run/${enc(run)}/cluster/${enc(id)}${qs({ page: page > 1 ? page : "" })}`;
const searchHref = (run, q) => `#/run/${enc(run)}/search${qs({ q })}`;

function fmtInt(x) {
  return x === null || x === undefined ? "—" : nf.format(x);
}
function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  return typeof x === "number" ? x.toFixed(digits) : String(x);
}
function fmtSeconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}
function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i += 1; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtRate(r) {
  return r === null || r === undefined ? "—" : `${nf.format(Math.round(r))}/s`;
}

async function api(path, params = {}, init = undefined) {
  const res = await fetch(`${path}${qs(params)}`, init);
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  if (!res.ok) {
    const detail = body && (body.detail ?? body.error);
    const text = typeof detail === "string" ? detail : JSON.stringify(detail ?? res.statusText);
    throw new Error(`${res.status}: ${text}`);
  }
  return body;
}

function post(path, payload) {
  return api(path, {}, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
}

function showError(err) {
  errorBox.textContent = err instanceof Error ? err.message : String(err);
  errorBox.hidden = false;
}
function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

async function getRuns(force = false) {
  if (!runsCache || force) runsCache = (await api("/api/runs")).runs;
  return runsCache;
}

/** The server's plot SVG as nodes, dropping anything that could run code (defence in depth:
 * the SVG is ours and already escaped, but it is still parsed, never concatenated). */
function svgNode(markup) {
  const doc = new DOMParser().parseFromString(markup, "image/svg+xml");
  const root = doc.documentElement;
  if (!root || root.nodeName.toLowerCase() !== "svg" || doc.querySelector("parsererror")) return null;
  for (const el of root.querySelectorAll("script, foreignObject, iframe, object, embed")) el.remove();
  for (const el of [root, ...root.querySelectorAll("*")]) {
    for (const attr of [...el.attributes]) {
      const name = attr.name.toLowerCase();
      const val = attr.value.trim().toLowerCase();
      if (name.startsWith("on") || ((name === "href" || name.endsWith(":href")) && !val.startsWith("#"))) {
        el.removeAttribute(attr.name);
      }
    }
  }
  return document.importNode(root, true);
}

function thumbImg(thumb, name, size = 128) {
  if (!thumb) return h("div", { class: "nothumb", role: "img", "aria-label": `no thumbnail for ${name}` }, "?");
  return h("img", {
    src: thumb, alt: name, title: name, loading: "lazy", decoding: "async",
    width: size, height: size, testid: "thumb-img",
  });
}

// ---------------------------------------------------------------- routing

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const q = raw.indexOf("?");
  const path = q >= 0 ? raw.slice(0, q) : raw;
  const params = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : "");
  const segs = path.split("/").filter((s) => s !== "").map((s) => {
    try { return decodeURIComponent(s); } catch { return s; }
  });
  return { segs, params };
}

function intParam(params, name, fallback) {
  const v = Number.parseInt(params.get(name) ?? "", 10);
  return Number.isFinite(v) && v >= 1 ? v : fallback;
}

async function route() {
  const token = ++renderToken;
  clearError();
  // a thin bar at the top while a view's data is on its way (the old view stays until then)
  view.setAttribute("aria-busy", "true");
  document.body.classList.add("loading");
  const { segs, params } = parseHash();
  currentRoute = { segs, params };
  const inRun = segs[0] === "run" && segs.length >= 2;
  searchForm.hidden = !inRun;
  if (inRun) {
    searchForm.dataset.run = segs[1];
    if (segs[2] !== "search") searchInput.value = "";
  }
  try {
    if (segs.length === 0) await runsView(token);
    else if (segs[0] === "run" && segs.length === 2) await runView(token, segs[1], params);
    else if (segs[0] === "run" && segs[2] === "cluster" && segs.length === 4) {
      await clusterView(token, segs[1], Number.parseInt(segs[3], 10), intParam(params, "page", 1));
    } else if (segs[0] === "run" && segs[2] === "search" && segs.length === 3) {
      await searchView(token, segs[1], params.get("q") ?? "");
    } else {
      setCrumbs([]);
      mount(h("p", { text: "Nothing here. " }, h("a", { href: "#/", text: "Back to the runs" })));
    }
  } catch (err) {
    if (token !== renderToken) return;
    showError(err);
    mount(h("p", { class: "muted" }, h("a", { href: "#/", text: "Back to the runs" })));
  } finally {
    if (token === renderToken) {
      view.removeAttribute("aria-busy");
      document.body.classList.remove("loading");
    }
  }
}

function setCrumbs(items) {
  const nodes = [h("a", { href: "#/", text: "Runs" })];
  for (const item of items) {
    nodes.push(h("span", { class: "sep", "aria-hidden": "true", text: "›" }));
    nodes.push(item.href ? h("a", { href: item.href, text: item.text }) : h("span", { "aria-current": "page", text: item.text }));
  }
  crumbs.replaceChildren(...nodes);
}

/** Breadcrumb items for a run: its ancestors (run, then "cluster C") first. */
function runTrail(runs, run) {
  const byId = new Map(runs.map((r) => [r.run, r]));
  const trail = [];
  let cur = byId.get(run);
  const seen = new Set();
  while (cur && cur.parent && byId.has(cur.parent.run) && !seen.has(cur.run)) {
    seen.add(cur.run);
    const parent = byId.get(cur.parent.run);
    trail.unshift(
      { text: parent.name || parent.run, href: runHref(parent.run) },
      { text: `cluster ${cur.parent.cluster_id}`, href: clusterHref(parent.run, cur.parent.cluster_id) },
    );
    cur = parent;
  }
  return trail;
}

function runLabel(runs, run) {
  const r = runs.find((x) => x.run === run);
  return r ? r.name || r.run : run;
}

// ---------------------------------------------------------------- runs list

/** Runs in tree order: every re-cluster run right under its parent, one level deeper. */
function runTree(runs) {
  const ids = new Set(runs.map((r) => r.run));
  const children = new Map();
  const roots = [];
  for (const r of runs) {
    if (r.parent && ids.has(r.parent.run)) {
      if (!children.has(r.parent.run)) children.set(r.parent.run, []);
      children.get(r.parent.run).push(r);
    } else roots.push(r);
  }
  const out = [];
  const walk = (r, depth) => {
    out.push({ r, depth });
    for (const c of children.get(r.run) ?? []) walk(c, depth + 1);
  };
  for (const r of roots) walk(r, 0);
  return out;
}

async function runsView(token) {
  const runs = await getRuns(true);
  if (token !== renderToken) return;
  setCrumbs([]);
  document.title = "ltc-ray results";
  if (!runs.length) {
    mount(h("h1", { text: "Runs" }),
      h("p", { class: "muted", text: "No finished runs (folders with _SUCCESS) under the results root." }));
    return;
  }
  const rows = runTree(runs).map(({ r, depth }) => h("tr", { testid: "run-row", dataset: { run: r.run } },
    h("td", { class: "run-name", style: { paddingLeft: `${0.6 + depth * 1.6}em` } },
      depth ? h("span", { class: "muted", text: `↳ cluster ${r.parent.cluster_id}: ` }) : null,
      h("a", { href: runHref(r.run), text: r.name || r.run, testid: "run-link" }),
      r.name && r.name !== r.run ? h("div", { class: "muted small", text: r.run }) : null),
    h("td", { text: r.method ?? "—" }),
    h("td", { class: "num", text: fmtInt(r.n_samples) }),
    h("td", { class: "num", text: fmtInt(r.n_clusters) }),
    h("td", { class: "num", text: fmtNum(r.pairwise_f) })));
  mount(
    h("h1", { text: "Runs" }),
    h("table", { id: "runs-table", class: "data", testid: "runs-table" },
      h("caption", { class: "sr-only", text: "Finished runs under the results root" }),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col", text: "Run" }), h("th", { scope: "col", text: "Method" }),
        h("th", { scope: "col", class: "num", text: "Samples" }),
        h("th", { scope: "col", class: "num", text: "Clusters" }),
        h("th", { scope: "col", class: "num", text: "Pairwise F" }))),
      h("tbody", {}, rows)));
}

// ---------------------------------------------------------------- run overview + clusters

async function runView(token, run, params) {
  const sort = ["size", "id", "name"].includes(params.get("sort")) ? params.get("sort") : "size";
  const order = ["asc", "desc"].includes(params.get("order")) ? params.get("order") : (sort === "size" ? "desc" : "asc");
  const page = intParam(params, "page", 1);
  const [runs, overview, clusters, annotations] = await Promise.all([
    getRuns(),
    overviewCache.has(run) ? overviewCache.get(run) : api("/api/overview", { run }),
    api("/api/clusters", { run, sort, order, offset: (page - 1) * CLUSTERS_PER_PAGE, limit: CLUSTERS_PER_PAGE }),
    api("/api/annotations", { run }),
  ]);
  if (token !== renderToken) return;
  overviewCache.set(run, overview);
  resetSelection(`run:${run}`);
  const name = overview.name || run;
  document.title = `${name} · ltc-ray`;
  setCrumbs([...runTrail(runs, run), { text: name }]);

  const self = runs.find((r) => r.run === run);
  const kids = runs.filter((r) => r.parent && r.parent.run === run);
  mount(
    h("section", { class: "run-head" },
      h("h1", { id: "run-title", testid: "run-title", text: name }),
      h("p", { class: "muted" },
        `${overview.method ?? "?"} · ${run}`,
        self && self.parent ? h("span", {}, " · re-cluster of ",
          h("a", { href: clusterHref(self.parent.run, self.parent.cluster_id), text: `cluster ${self.parent.cluster_id}` }),
          " in ", h("a", { href: runHref(self.parent.run), text: runLabel(runs, self.parent.run) })) : null)),
    statsBlock(overview),
    plotsBlock(overview),
    h("div", { class: "two-col" }, stagesBlock(overview), parametersBlock(overview)),
    kids.length ? h("section", { id: "child-runs", testid: "child-runs" },
      h("h2", { text: "Re-clusters of this run" }),
      h("ul", {}, kids.map((k) => h("li", {},
        h("a", { href: runHref(k.run), text: k.name || k.run, testid: "child-run-link" }),
        ` — cluster ${k.parent.cluster_id}, ${fmtInt(k.n_clusters)} clusters`)))) : null,
    clustersBlock(run, clusters, { sort, order, page }),
    annotationsBlock(annotations.annotations, null),
  );
}

function statsBlock(o) {
  const items = [
    ["Samples", fmtInt(o.n_samples)], ["Clusters", fmtInt(o.n_clusters)],
    ["Method", o.method ?? "—"], ["Dimension", fmtInt(o.dim)],
    ["Wall time", fmtSeconds(o.wall_seconds)], ["Driver peak memory", fmtBytes(o.driver_peak_rss_bytes)],
  ];
  const ss = o.size_summary || {};
  if (ss.max_size !== undefined) items.push(["Largest cluster", fmtInt(ss.max_size)]);
  if (ss.singleton_share !== undefined) items.push(["Singletons", `${fmtInt(ss.singletons)} (${(100 * ss.singleton_share).toFixed(1)}%)`]);
  if (o.metrics) {
    for (const [k, v] of Object.entries(o.metrics)) {
      if (typeof v === "number") items.push([k.replaceAll("_", " "), fmtNum(v)]);
    }
  }
  return h("dl", { id: "run-stats", class: "stats", testid: "run-stats" },
    items.map(([k, v]) => h("div", { class: "stat" }, h("dt", { text: k }), h("dd", { text: v }))));
}

function plotsBlock(o) {
  const svgs = o.svg || {};
  const plots = [
    ["sizes", "Cluster sizes (log–log)"],
    ["similarity", "kNN similarity, thresholds marked"],
    ["stages", "Time and peak memory per stage"],
  ];
  return h("section", { id: "plots", class: "plots", testid: "plots" },
    plots.map(([key, caption]) => {
      const node = svgs[key] ? svgNode(svgs[key]) : null;
      return h("figure", { id: `plot-${key}`, class: "plot", testid: `plot-${key}` },
        node ?? h("p", { class: "muted", text: "No data for this plot." }),
        h("figcaption", { text: caption }));
    }));
}

function stagesBlock(o) {
  const stages = o.stages || [];
  return h("section", { class: "stages" },
    h("h2", { text: "Stages" }),
    stages.length ? h("table", { id: "stages-table", class: "data", testid: "stages-table" },
      h("thead", {}, h("tr", {},
        h("th", { scope: "col", text: "Stage" }), h("th", { scope: "col", class: "num", text: "Time" }),
        h("th", { scope: "col", class: "num", text: "Rows/s" }), h("th", { scope: "col", class: "num", text: "Peak memory" }))),
      h("tbody", {}, stages.map((s) => h("tr", {},
        h("td", { text: s.name }), h("td", { class: "num", text: fmtSeconds(s.seconds) }),
        h("td", { class: "num", text: fmtRate(s.rows_per_s) }),
        h("td", { class: "num", text: fmtBytes(s.peak_rss_bytes) })))))
      : h("p", { class: "muted", text: "No stage timings recorded." }));
}

function parametersBlock(o) {
  const p = o.parameters || {};
  const entries = Object.entries(p);
  return h("section", { class: "params" },
    h("h2", { text: "Parameters" }),
    entries.length ? h("table", { id: "params-table", class: "data compact" },
      h("tbody", {}, entries.map(([k, v]) => h("tr", {},
        h("th", { scope: "row", text: k }),
        h("td", { text: typeof v === "object" && v !== null ? JSON.stringify(v) : String(v) })))))
      : h("p", { class: "muted", text: "None recorded." }));
}

function clustersBlock(run, data, { sort, order, page }) {
  const totalPages = Math.max(1, Math.ceil(data.total / CLUSTERS_PER_PAGE));
  const go = (s, o) => { location.hash = runHref(run, { sort: s, order: o }); };
  const sortKey = h("select", { id: "sort-key", testid: "sort-key", on: { change: () => go(sortKey.value, sortOrder.value) } },
    [["size", "size"], ["id", "id"], ["name", "name"]].map(([v, t]) => h("option", { value: v, text: t, selected: v === sort })));
  const sortOrder = h("select", { id: "sort-order", testid: "sort-order", on: { change: () => go(sortKey.value, sortOrder.value) } },
    [["desc", "descending"], ["asc", "ascending"]].map(([v, t]) => h("option", { value: v, text: t, selected: v === order })));

  const mergeName = h("input", { id: "merge-name", type: "text", placeholder: "name (optional)", testid: "merge-name" });
  const mergeBtn = h("button", { id: "merge-btn", type: "button", disabled: true, testid: "merge-btn", text: "Merge selected" });
  const selCount = h("span", { id: "cluster-selection-count", class: "muted", text: "0 selected" });
  const refresh = () => {
    const n = selection.clusters.size;
    selCount.textContent = `${n} selected`;
    mergeBtn.disabled = n < 2;
  };
  mergeBtn.addEventListener("click", async () => {
    const ids = [...selection.clusters].sort((a, b) => a - b);
    mergeBtn.disabled = true;
    try {
      await post("/api/annotations", { run, action: "merge", cluster_ids: ids, sample_ids: [], name: mergeName.value.trim() });
      selection.clusters.clear();
      await route();
    } catch (err) { showError(err); refresh(); }
  });

  const hasMatches = data.clusters.some((x) => x.matches !== undefined);
  const rows = data.clusters.map((c) => {
    const box = h("input", {
      type: "checkbox", class: "pick", "aria-label": `Select cluster ${c.cluster_id}`,
      checked: selection.clusters.has(c.cluster_id), testid: "cluster-pick",
      on: { change: (ev) => { if (ev.target.checked) selection.clusters.add(c.cluster_id); else selection.clusters.delete(c.cluster_id); refresh(); } },
    });
    const href = clusterHref(run, c.cluster_id);
    return h("tr", { testid: "cluster-row", dataset: { clusterId: c.cluster_id, size: c.size } },
      h("td", { class: "pick-cell" }, box),
      h("td", { class: "rep" }, h("a", { href, tabindex: "-1" }, thumbImg(c.thumb, `cluster ${c.cluster_id} representative`, 64))),
      h("td", {}, h("a", { href, text: `cluster ${c.cluster_id}`, testid: "cluster-link" })),
      h("td", c.name ? { text: c.name, testid: "cluster-name" } : { class: "muted", text: "—" }),
      h("td", { class: "num", text: fmtInt(c.size), testid: "cluster-size" }),
      hasMatches ? h("td", { class: "num", text: fmtInt(c.matches) }) : null);
  });
  const table = h("table", { id: "clusters-table", class: "data clusters", testid: "clusters-table" },
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", class: "pick-cell" }, h("span", { class: "sr-only", text: "Select" })),
      h("th", { scope: "col" }, h("span", { class: "sr-only", text: "Representative" })),
      h("th", { scope: "col", text: "Cluster" }), h("th", { scope: "col", text: "Name" }),
      h("th", { scope: "col", class: "num", text: "Size" }),
      hasMatches ? h("th", { scope: "col", class: "num", text: "Matches" }) : null)),
    h("tbody", {}, rows));
  const pageHref = (p) => runHref(run, { sort, order, page: p > 1 ? p : "" });
  refresh();
  return h("section", { id: "clusters", testid: "clusters" },
    h("h2", {}, "Clusters ", h("span", { class: "muted", id: "clusters-total", testid: "clusters-total", text: `(${fmtInt(data.total)})` })),
    h("div", { class: "toolbar" },
      h("label", { for: "sort-key", text: "Sort by" }), sortKey,
      h("label", { for: "sort-order", class: "sr-only", text: "Order" }), sortOrder,
      h("span", { class: "spacer" }),
      selCount,
      h("label", { for: "merge-name", class: "sr-only", text: "Name of the merged cluster" }), mergeName, mergeBtn),
    pager(page, totalPages, pageHref, "clusters-pager"),
    data.clusters.length ? table : h("p", { class: "muted", text: "No clusters on this page." }),
    totalPages > 1 ? pager(page, totalPages, pageHref, "clusters-pager-bottom") : null);
}

function annotationsBlock(list, clusterId) {
  const rows = clusterId === null ? list : list.filter((a) => (a.cluster_ids || []).includes(clusterId));
  const describe = (a) => {
    const ids = (a.cluster_ids || []).join(", ");
    const n = (a.sample_ids || []).length;
    if (a.action === "rename") return `rename cluster ${ids}`;
    if (a.action === "merge") return `merge clusters ${ids}`;
    if (a.action === "split") return `split ${fmtInt(n)} image${n === 1 ? "" : "s"} out of cluster ${ids}`;
    return `${a.action} ${ids}`;
  };
  return h("section", { id: "annotations-section", testid: "annotations-section" },
    h("h2", { text: clusterId === null ? "Annotations" : "Annotations of this cluster" }),
    rows.length ? h("ol", { id: "annotations", class: "annotations", testid: "annotations" },
      rows.map((a) => h("li", { testid: "annotation", dataset: { action: a.action } },
        h("span", { class: "muted", text: `#${a.seq} ${a.time ?? ""} ` }),
        describe(a),
        a.name ? h("span", {}, " → ", h("q", { text: a.name })) : null)))
      : h("p", { class: "muted", id: "annotations-empty", text: "None saved yet. Annotations never change the run's files; they are kept in annotations.parquet beside it." }));
}

function resetSelection(key) {
  if (selection.key !== key) {
    selection.key = key;
    selection.clusters.clear();
    selection.samples.clear();
  }
}

// ---------------------------------------------------------------- pagination

/** First/prev, numbered pages (boundary 1, sibling 1, ellipses), next/last: all links. */
function pager(page, total, hrefFor, id) {
  const items = [];
  const link = (p, text, testid, label) => (p < 1 || p > total || p === page)
    ? h("span", { class: "page disabled", "aria-disabled": "true", testid, text })
    : h("a", { class: "page", href: hrefFor(p), testid, text, "aria-label": label });
  items.push(link(1, "«", "page-first", "First page"), link(page - 1, "‹", "page-prev", "Previous page"));
  const shown = new Set([1, total, page - 1, page, page + 1].filter((p) => p >= 1 && p <= total));
  let last = 0;
  for (const p of [...shown].sort((a, b) => a - b)) {
    if (p - last > 1) items.push(h("span", { class: "page gap", "aria-hidden": "true", text: "…" }));
    items.push(p === page
      ? h("span", { class: "page current", "aria-current": "page", testid: "page-current", text: String(p) })
      : h("a", { class: "page", href: hrefFor(p), testid: `page-${p}`, text: String(p), "aria-label": `Page ${p}` }));
    last = p;
  }
  items.push(link(page + 1, "›", "page-next", "Next page"), link(total, "»", "page-last", "Last page"));
  return h("nav", { class: "pager", id, testid: id, "aria-label": "Pages" },
    items, h("span", { class: "muted page-info", text: `page ${fmtInt(page)} of ${fmtInt(total)}` }));
}

// ---------------------------------------------------------------- one cluster

async function clusterView(token, run, clusterId, page) {
  if (!Number.isInteger(clusterId) || clusterId < 0) throw new Error(`bad cluster id in the address`);
  const [runs, data, annotations] = await Promise.all([
    getRuns(),
    api("/api/cluster", { run, id: clusterId, page, per_page: THUMBS_PER_PAGE }),
    api("/api/annotations", { run }),
  ]);
  if (token !== renderToken) return;
  resetSelection(`cluster:${run}:${clusterId}`);
  const runName = runLabel(runs, run);
  const title = data.name ? `Cluster ${clusterId}: ${data.name}` : `Cluster ${clusterId}`;
  document.title = `${title} · ${runName} · ltc-ray`;
  setCrumbs([...runTrail(runs, run), { text: runName, href: runHref(run) }, { text: `cluster ${clusterId}` }]);
  const self = runs.find((r) => r.run === run);
  const kids = runs.filter((r) => r.parent && r.parent.run === run && r.parent.cluster_id === clusterId);
  const pageHref = (p) => clusterHref(run, clusterId, p);

  // selection + split
  const selCount = h("span", { id: "selection-count", class: "muted", testid: "selection-count", text: "0 selected" });
  const splitName = h("input", { id: "split-name", type: "text", placeholder: "new cluster's name (optional)", testid: "split-name" });
  const splitBtn = h("button", { id: "split-btn", type: "button", disabled: true, testid: "split-btn", text: "Split" });
  const refresh = () => {
    const n = selection.samples.size;
    selCount.textContent = `${fmtInt(n)} selected`;
    splitBtn.disabled = n === 0 || n >= data.size;
  };
  splitBtn.addEventListener("click", async () => {
    const ids = [...selection.samples].sort((a, b) => a - b);
    splitBtn.disabled = true;
    try {
      await post("/api/annotations", { run, action: "split", cluster_ids: [clusterId], sample_ids: ids, name: splitName.value.trim() });
      selection.samples.clear();
      await route();
    } catch (err) { showError(err); refresh(); }
  });

  const tiles = data.members.map((m) => {
    const box = h("input", {
      type: "checkbox", class: "pick", "aria-label": `Select ${m.name}`, testid: "thumb-pick",
      checked: selection.samples.has(m.sample_id),
      on: { change: (ev) => { if (ev.target.checked) selection.samples.add(m.sample_id); else selection.samples.delete(m.sample_id); tile.classList.toggle("picked", ev.target.checked); refresh(); } },
    });
    const tile = h("figure", { class: `tile${selection.samples.has(m.sample_id) ? " picked" : ""}`, testid: "thumb", dataset: { sampleId: m.sample_id } },
      h("label", { class: "tile-pick" }, box, thumbImg(m.thumb, m.name)),
      h("figcaption", { title: m.name, text: m.name }));
    return tile;
  });
  const selectPage = h("button", { type: "button", id: "select-page", text: "Select page", on: { click: () => {
    for (const m of data.members) selection.samples.add(m.sample_id);
    for (const el of view.querySelectorAll("input.pick")) { el.checked = true; el.closest(".tile")?.classList.add("picked"); }
    refresh();
  } } });
  const clearSel = h("button", { type: "button", id: "select-none", text: "Clear", on: { click: () => {
    selection.samples.clear();
    for (const el of view.querySelectorAll("input.pick")) { el.checked = false; el.closest(".tile")?.classList.remove("picked"); }
    refresh();
  } } });

  mount(
    h("section", { class: "cluster-head" },
      h("h1", { id: "cluster-title", testid: "cluster-title", text: title }),
      h("p", { class: "muted" },
        h("span", { id: "cluster-size", testid: "cluster-size-total", text: `${fmtInt(data.size)} image${data.size === 1 ? "" : "s"}` }),
        " in ", h("a", { href: runHref(run), text: runName }),
        self && self.parent ? ` (a re-cluster of cluster ${self.parent.cluster_id})` : "")),
    h("div", { class: "panels" },
      h("section", { id: "annotate-panel", class: "panel" },
        h("h2", { text: "Annotate" }),
        renameForm(run, clusterId, data.name),
        h("div", { class: "row" },
          h("label", { for: "split-name", text: "Split selected into" }), splitName, splitBtn),
        h("p", { class: "muted small hint", text: "Saved beside the run in annotations.parquet; the run's own files never change." })),
      reclusterForm(run, clusterId, self)),
    kids.length ? h("section", { id: "cluster-reclusters", testid: "cluster-reclusters" },
      h("h2", { text: "Re-clusters of this cluster" }),
      h("ul", {}, kids.map((k) => h("li", {}, h("a", { href: runHref(k.run), text: k.name || k.run }),
        ` — ${k.method}, ${fmtInt(k.n_clusters)} clusters`)))) : null,
    h("div", { class: "toolbar" }, selectPage, clearSel, selCount),
    pager(page, data.total_pages, pageHref, "grid-pager"),
    tiles.length ? h("div", { id: "grid", class: "grid", testid: "grid" }, tiles)
      : h("p", { class: "muted", text: "No images on this page." }),
    data.total_pages > 1 ? pager(page, data.total_pages, pageHref, "grid-pager-bottom") : null,
    annotationsBlock(annotations.annotations, clusterId),
  );
  refresh();
  resumeJob(run, clusterId);
}

function renameForm(run, clusterId, current) {
  const input = h("input", { id: "rename-input", type: "text", value: current ?? "", placeholder: "e.g. a person's name", testid: "rename-input", required: true, maxlength: "200" });
  const form = h("form", { id: "rename-form", class: "row", testid: "rename-form" },
    h("label", { for: "rename-input", text: "Name" }), input,
    h("button", { type: "submit", id: "rename-btn", testid: "rename-btn", text: "Rename" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = input.value.trim();
    if (!name) return;
    try {
      await post("/api/annotations", { run, action: "rename", cluster_ids: [clusterId], sample_ids: [], name });
      await route();
    } catch (err) { showError(err); }
  });
  return form;
}

function reclusterForm(run, clusterId, self) {
  const method = h("select", { id: "recluster-method", testid: "recluster-method" },
    h("option", { value: "kmeans", text: "k-means with K clusters" }),
    h("option", { value: "run", text: `this run's method${self && self.method ? ` (${self.method})` : ""}` }));
  const k = h("input", { id: "recluster-k", type: "number", min: "1", step: "1", value: "2", testid: "recluster-k", required: true });
  const kRow = h("span", { class: "row-item" }, h("label", { for: "recluster-k", text: "K" }), k);
  method.addEventListener("change", () => {
    kRow.hidden = method.value !== "kmeans";
    k.disabled = method.value !== "kmeans";
  });
  const btn = h("button", { type: "submit", id: "recluster-btn", testid: "recluster-btn", text: "Re-cluster" });
  const bar = h("progress", { id: "recluster-progress", max: "1", value: "0", testid: "recluster-progress", "aria-label": "Re-cluster progress" });
  const msg = h("span", { id: "recluster-message", testid: "recluster-message", role: "status" });
  const status = h("div", { id: "recluster-status", class: "job", testid: "recluster-status", hidden: true, dataset: { state: "" } },
    bar, msg, h("span", { id: "recluster-result" }));
  const form = h("form", { id: "recluster-form", class: "panel", testid: "recluster-form", dataset: { run, clusterId } },
    h("h2", { text: "Re-cluster" }),
    h("div", { class: "row" }, h("label", { for: "recluster-method", text: "Method" }), method, kRow, btn),
    status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const payload = { run, cluster_id: clusterId, method: method.value };
    if (method.value === "kmeans") {
      const kv = Number.parseInt(k.value, 10);
      if (!Number.isInteger(kv) || kv < 1) { showError("K must be a whole number ≥ 1"); return; }
      payload.k = kv;
    }
    btn.disabled = true;
    try {
      const { job } = await post("/api/recluster", payload);
      rememberJob({ job, run, cluster_id: clusterId });
      pollJob(job, run, clusterId);
    } catch (err) { showError(err); btn.disabled = false; }
  });
  return form;
}

// ---------------------------------------------------------------- re-cluster jobs

function storedJobs() {
  try { return JSON.parse(sessionStorage.getItem(JOBS_KEY) || "[]"); } catch { return []; }
}
function rememberJob(j) {
  const list = storedJobs().filter((x) => x.job !== j.job);
  list.push(j);
  try { sessionStorage.setItem(JOBS_KEY, JSON.stringify(list.slice(-20))); } catch { /* storage off */ }
}
function forgetJob(job) {
  try { sessionStorage.setItem(JOBS_KEY, JSON.stringify(storedJobs().filter((x) => x.job !== job))); } catch { /* storage off */ }
}

const polling = new Set();

/** After a reload, show the last job started from this cluster (still running or not). */
function resumeJob(run, clusterId) {
  const mine = storedJobs().filter((j) => j.run === run && j.cluster_id === clusterId);
  if (mine.length) pollJob(mine[mine.length - 1].job, run, clusterId);
}

/** The job's status painted into the re-cluster form when that cluster is on screen. */
function paintJob(state, run, clusterId) {
  const form = document.getElementById("recluster-form");
  if (!form || form.dataset.run !== run || Number(form.dataset.clusterId) !== clusterId) return;
  const status = document.getElementById("recluster-status");
  const bar = document.getElementById("recluster-progress");
  const msg = document.getElementById("recluster-message");
  const result = document.getElementById("recluster-result");
  const btn = document.getElementById("recluster-btn");
  status.hidden = false;
  status.dataset.state = state.state;
  status.dataset.job = state.job;
  const finished = state.state === "done" || state.state === "failed";
  btn.disabled = !finished;
  bar.value = Math.max(0, Math.min(1, state.progress ?? 0));
  const pct = `${Math.round(100 * bar.value)}%`;
  if (state.state === "done") {
    msg.textContent = "Done:";
    result.replaceChildren(
      h("a", { id: "recluster-link", testid: "recluster-link", href: runHref(state.run), text: "open the nested run" }),
      ...(state.folders ? [h("div", { class: "muted small folders", title: state.folders, testid: "recluster-folders",
        text: `folder layout: …/${String(state.folders).split("/").filter(Boolean).slice(-2).join("/")}` })] : []));
  } else if (state.state === "failed") {
    msg.textContent = `Failed: ${state.error || state.message || "unknown error"}`;
    result.replaceChildren();
  } else {
    msg.textContent = `${state.state} ${pct}${state.message ? ` — ${state.message}` : ""}`;
    result.replaceChildren();
  }
}

async function pollJob(job, run, clusterId) {
  if (polling.has(job)) return;
  polling.add(job);
  try {
    for (;;) {
      let state;
      try {
        state = await api(`/api/jobs/${enc(job)}`);
      } catch (err) {
        if (String(err.message).startsWith("404")) { forgetJob(job); return; } // server restarted
        throw err;
      }
      paintJob(state, run, clusterId);
      if (state.state === "done" || state.state === "failed") {
        if (state.state === "done") runsCache = null;
        return;
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  } catch (err) {
    showError(err);
  } finally {
    polling.delete(job);
  }
}

// ---------------------------------------------------------------- search

async function searchView(token, run, q) {
  searchInput.value = q;
  const [runs, clusters, found] = await Promise.all([
    getRuns(),
    q ? api("/api/clusters", { run, sort: "size", order: "desc", offset: 0, limit: CLUSTERS_PER_PAGE, q }) : null,
    q ? api("/api/search", { run, q, limit: SEARCH_LIMIT }) : null,
  ]);
  if (token !== renderToken) return;
  const runName = runLabel(runs, run);
  document.title = `Search “${q}” · ${runName} · ltc-ray`;
  setCrumbs([...runTrail(runs, run), { text: runName, href: runHref(run) }, { text: `search “${q}”` }]);
  if (!q) {
    mount(h("h1", { text: "Search" }), h("p", { class: "muted", text: "Type part of an image name above." }));
    return;
  }
  const clusterRows = clusters.clusters.map((c) => h("tr", { testid: "search-cluster-row", dataset: { clusterId: c.cluster_id } },
    h("td", { class: "rep" }, thumbImg(c.thumb, `cluster ${c.cluster_id} representative`, 64)),
    h("td", {}, h("a", { href: clusterHref(run, c.cluster_id), text: `cluster ${c.cluster_id}` })),
    h("td", c.name ? { text: c.name } : { class: "muted", text: "—" }),
    h("td", { class: "num", text: fmtInt(c.size) }),
    h("td", { class: "num", text: fmtInt(c.matches) })));
  const tiles = found.matches.map((m) => h("figure", { class: "tile", testid: "search-hit", dataset: { sampleId: m.sample_id, clusterId: m.cluster_id } },
    h("a", { href: clusterHref(run, m.cluster_id) }, thumbImg(m.thumb, m.name)),
    h("figcaption", { title: m.name }, h("span", { text: m.name }), h("br"),
      h("a", { href: clusterHref(run, m.cluster_id), class: "small", text: `cluster ${m.cluster_id}` }))));
  mount(
    h("h1", { id: "search-title", testid: "search-title" }, "Images named like ", h("q", { text: q })),
    h("section", { id: "search-clusters-section" },
      h("h2", { text: `Clusters with matching images (${fmtInt(clusters.total)})` }),
      clusterRows.length ? h("table", { id: "search-clusters", class: "data clusters", testid: "search-clusters" },
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, h("span", { class: "sr-only", text: "Representative" })),
          h("th", { scope: "col", text: "Cluster" }), h("th", { scope: "col", text: "Name" }),
          h("th", { scope: "col", class: "num", text: "Size" }), h("th", { scope: "col", class: "num", text: "Matches" }))),
        h("tbody", {}, clusterRows)) : h("p", { class: "muted", text: "No cluster has a matching image." })),
    h("section", { id: "search-images-section" },
      h("h2", { id: "search-total", testid: "search-total",
        text: `Matching images (${fmtInt(found.total)}${found.total > found.matches.length ? `, first ${fmtInt(found.matches.length)} shown` : ""})` }),
      tiles.length ? h("div", { id: "search-grid", class: "grid", testid: "search-grid" }, tiles)
        : h("p", { class: "muted", text: "No image name contains this text." })));
}

// ---------------------------------------------------------------- wiring

searchForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const run = searchForm.dataset.run;
  const q = searchInput.value.trim();
  if (run && q) location.hash = searchHref(run, q);
});

document.addEventListener("keydown", (ev) => {
  if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
  const tag = (ev.target && ev.target.tagName) || "";
  if (["INPUT", "SELECT", "TEXTAREA"].includes(tag)) return;
  const nav = document.getElementById("grid-pager") || document.getElementById("clusters-pager");
  if (!nav) return;
  const target = ev.key === "ArrowRight" ? nav.querySelector('[data-testid="page-next"]')
    : ev.key === "ArrowLeft" ? nav.querySelector('[data-testid="page-prev"]') : null;
  if (target && target.tagName === "A") { ev.preventDefault(); location.hash = target.getAttribute("href"); }
});

window.addEventListener("hashchange", () => { route(); window.scrollTo(0, 0); });
route();
