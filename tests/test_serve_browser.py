"""The results browser in a real headless browser (Debian's chromium via Selenium).

A module fixture draws a small set of face-like images, writes their embeddings the way the
embedding job does (embeddings.parquet + report.json), clusters them with a real knn-cc run
and serves the results root with the real app on 127.0.0.1. The test then uses the page like
a person: runs, overview plots, sorting, a cluster's paged grid, annotations, a k-means
re-cluster followed to its nested run, search, and a screenshot (also written to
``$LTC_RAY_SCREENSHOT`` when set, which is how docs/img/browser.png is refreshed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require

require("fastapi", "ui")
uvicorn = require("uvicorn", "ui")
require("selenium")
from PIL import Image, ImageDraw, ImageEnhance  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RUN = "faces-knn-cc"
# identities and how many images each has: the largest (> 48) needs a second grid page
IDENTITIES = [("ada", 60), ("ben", 30), ("carla", 12), ("dmitri", 7), ("eun", 5), ("femi", 3),
              ("gus", 2), ("hana", 1), ("ivo", 1)]
DIM = 32
SEARCHED = "carla/carla_0003.png"


# ---------------------------------------------------------------- data


def _face(rng: np.random.Generator, look: dict, size: int = 112) -> Image.Image:
    """One cartoon face of an identity: its colours and hair, with this image's pose,
    expression and lighting (so a cluster's thumbnails look alike but not identical).
    Drawn at twice the size and scaled down, for smooth edges."""
    im = Image.new("RGB", (2 * size, 2 * size), look["bg"])
    d = ImageDraw.Draw(im)

    def box(*xy):
        return tuple(2 * v for v in xy)

    dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
    cx, cy = size // 2 + dx, size // 2 + 6 + dy
    w, hgt = look["face"]
    d.ellipse(box(cx - w, cy - 20 - hgt, cx + w, cy + hgt - 14), fill=look["hair"])
    d.ellipse(box(cx - w + 6, cy - hgt + 4, cx + w - 6, cy + hgt), fill=look["skin"])
    if look["fringe"]:
        d.chord(box(cx - w + 4, cy - hgt - 6, cx + w - 4, cy - hgt + 22), 180, 360,
                fill=look["hair"])
    for ex in (cx - 12, cx + 12):
        d.ellipse(box(ex - 5, cy - 12, ex + 5, cy - 4), fill="white")
        look_x = int(rng.integers(-1, 2))
        d.ellipse(box(ex - 3 + look_x, cy - 11, ex + 2 + look_x, cy - 5), fill=look["eyes"])
    if look["glasses"]:
        ink = (40, 40, 40)
        d.rectangle(box(cx - 19, cy - 15, cx - 5, cy - 1), outline=ink, width=4)
        d.rectangle(box(cx + 5, cy - 15, cx + 19, cy - 1), outline=ink, width=4)
        d.line(box(cx - 5, cy - 9, cx + 5, cy - 9), fill=ink, width=4)
    smile = int(rng.integers(-2, 8))
    d.arc(box(cx - 12, cy + 6 - smile, cx + 12, cy + 16 + smile), 10, 170, fill=(150, 40, 50),
          width=6)
    im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC, fillcolor=look["bg"])
    im = im.resize((size, size), Image.LANCZOS)
    return ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.15)))


def _looks(rng: np.random.Generator, n: int) -> list[dict]:
    skins = [(241, 204, 170), (224, 172, 135), (198, 134, 96), (141, 85, 56), (255, 219, 186)]
    hairs = [(35, 28, 24), (92, 58, 32), (190, 140, 70), (140, 40, 30), (200, 200, 200)]
    out = []
    for i in range(n):
        out.append({
            "bg": tuple(int(v) for v in rng.integers(120, 235, 3)),
            "skin": skins[i % len(skins)], "hair": hairs[(i * 3) % len(hairs)],
            "eyes": tuple(int(v) for v in rng.integers(20, 120, 3)),
            "face": (int(rng.integers(26, 33)), int(rng.integers(30, 37))),
            "fringe": bool(i % 2), "glasses": i % 3 == 1,
        })
    return out


def _make_results(root: Path) -> tuple[Path, Path]:
    """Images + an embedding job's output (hand-written, same files and columns) ->
    a real knn-cc run at results/RUN. Returns (results root, images root)."""
    rng = np.random.default_rng(7)
    images = root / "images"
    looks = _looks(rng, len(IDENTITIES))
    centers = rng.standard_normal((len(IDENTITIES), DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    paths, embs = [], []
    for (name, count), look, center in zip(IDENTITIES, looks, centers, strict=True):
        (images / name).mkdir(parents=True)
        for j in range(count):
            rel = f"{name}/{name}_{j:04d}.png"
            _face(rng, look).save(images / rel)
            e = center + 0.08 * rng.standard_normal(DIM)
            paths.append(rel)
            embs.append(e / np.linalg.norm(e))
    order = np.argsort(paths)
    emb = np.asarray(embs, dtype=np.float32)[order]
    embed_out = root / "embed"
    embed_out.mkdir()
    pq.write_table(pa.table({
        "id": pa.array(np.arange(len(paths)), pa.int64()),
        "path": pa.array([paths[i] for i in order], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
    }), embed_out / "embeddings.parquet")
    (embed_out / "report.json").write_text(json.dumps({
        "kind": "ltc-ray-embeddings", "images_root": str(images), "n_listed": len(paths),
        "n_embedded": len(paths), "n_failed": 0, "failed_sample": [], "dim": DIM}))
    (embed_out / "_SUCCESS").write_text("")

    from ltc_ray.cli import cluster_main

    results = root / "results"
    rc = cluster_main(["--features", str(embed_out / "embeddings.parquet"),
                       "--output", str(results / RUN), "--method", "knn-cc", "--num-cpus", "2"])
    assert rc == 0
    return results, images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """(base URL, cluster sizes of the run in size order, name -> cluster id)."""
    from ltc_ray.serve.app import create_app

    root = tmp_path_factory.mktemp("browser")
    results, images = _make_results(root)
    summary = pq.read_table(results / RUN / "cluster_summary.parquet").to_pydict()
    sizes = [s for _, s in sorted(zip(summary["cluster_id"], summary["size"], strict=True))]
    assert sizes[0] > 48, sizes  # the largest cluster needs a second grid page
    names = pq.read_table(root / "embed" / "embeddings.parquet", columns=["path"]).column(0)
    labels = pq.read_table(results / RUN / "clusters").to_pydict()
    cluster_of = {names[s].as_py(): c
                  for s, c in zip(labels["sample_id"], labels["cluster_id"], strict=True)}

    app = create_app(str(results), str(images), cache_dir=str(root / "cache"), recluster_cpus=1)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", sizes, cluster_of
    server.should_exit = True
    thread.join(10)


# ---------------------------------------------------------------- browser


@pytest.fixture
def driver(tmp_path):
    for exe, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not os.access(exe, os.X_OK):
            ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
            pytest.fail(f"{what} is missing at {exe}: run `make browser` (installs Debian's "
                        f"chromium and chromium-driver){' - CI is set' if ci else ''}",
                        pytrace=False)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser/driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1280,800",
                "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    # the page's viewport exactly 1280x800 (the committed screenshot's size)
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    yield drv
    drv.quit()


def _wait(drv, cond, what: str, timeout: float = 20):
    """cond(driver) truthy within timeout (DOM re-renders make elements stale: retried)."""
    return WebDriverWait(drv, timeout, poll_frequency=0.1, ignored_exceptions=(
        StaleElementReferenceException, NoSuchElementException)).until(cond, message=what)


def _js(drv, script: str, *args):
    return drv.execute_script(script, *args)


def _css(drv, selector: str):
    return drv.find_element(By.CSS_SELECTOR, selector)


def _by_id(drv, element_id: str):
    return drv.find_element(By.ID, element_id)


def _saved(drv, action: str) -> list:
    return drv.find_elements(By.CSS_SELECTOR, f'[data-testid="annotation"][data-action="{action}"]')


def _click(drv, el) -> None:
    """Click like a user would: the element scrolled to mid-screen first, clear of the
    sticky top bar (Selenium only scrolls elements that are off-screen)."""
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()


def _row_sizes(drv) -> list[tuple[int, int]]:
    """(cluster id, size) of the cluster rows, in DOM order."""
    return [tuple(x) for x in _js(drv, """return [...document.querySelectorAll(
        '[data-testid="cluster-row"]')].map(r => [+r.dataset.clusterId, +r.dataset.size]);""")]


def _thumbs(drv) -> int:
    return _js(drv, "return document.querySelectorAll('#grid [data-testid=\"thumb\"]').length")


def _images_loaded(drv, scope: str) -> list[list]:
    """[complete, naturalWidth, naturalHeight] of every <img> under scope, after scrolling
    through the page so the lazy ones start loading."""
    _js(drv, "window.scrollTo(0, document.body.scrollHeight)")
    return _js(drv, f"""return [...document.querySelectorAll('{scope} img')].map(
        i => [i.complete, i.naturalWidth, i.naturalHeight]);""")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_browse_sort_page_recluster_search(served, driver, tmp_path):
    base, sizes, cluster_of = served
    drv = driver
    t0 = time.monotonic()

    # runs list -> the run
    drv.get(base + "/")
    row = _wait(drv, lambda d: _css(d, f'[data-testid="run-row"][data-run="{RUN}"]'), "the run")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1:4] == ["knn-cc", str(sum(sizes)), str(len(sizes))], cells
    _click(drv, row.find_element(By.CSS_SELECTOR, '[data-testid="run-link"]'))

    # overview: headline numbers, server-made SVG plots, stage table
    _wait(drv, lambda d: _by_id(d, "run-stats"), "run overview")
    assert str(len(sizes)) in _by_id(drv, "run-stats").text
    plots = _js(drv, """return [...document.querySelectorAll('#plots figure')].map(f =>
        [f.id, f.querySelectorAll('svg').length, f.querySelectorAll('svg *').length]);""")
    assert [p[0] for p in plots] == ["plot-sizes", "plot-similarity", "plot-stages"]
    assert plots[0][1] == 1 and plots[2][1] == 1 and plots[0][2] > 5, plots
    assert not _js(drv, "return document.querySelectorAll('#plots script, #plots [onload]').length")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#stages-table tbody tr")) >= 2

    # clusters, default: size descending, with counts and representative thumbnails
    _wait(drv, lambda d: len(_row_sizes(d)) == len(sizes), "the cluster rows")
    assert [s for _, s in _row_sizes(drv)] == sorted(sizes, reverse=True)
    assert _by_id(drv, "clusters-total").text == f"({len(sizes)})"

    def sort_by(key: str, order: str):
        # each control re-renders the list when changed: one at a time, waiting in between
        for control, param, value in (("sort-key", "sort", key), ("sort-order", "order", order)):
            if _by_id(drv, control).get_attribute("value") != value:
                Select(_by_id(drv, control)).select_by_value(value)
                _wait(drv, lambda d, c=control, p=param, v=value: f"{p}={v}" in d.current_url
                      and _by_id(d, c).get_attribute("value") == v, f"{param}={value}")
        assert f"sort={key}&order={order}" in drv.current_url
        return _row_sizes(drv)

    got = sort_by("size", "asc")
    assert [s for _, s in got] == sorted(sizes), got
    got = sort_by("id", "desc")
    assert [c for c, _ in got] == list(range(len(sizes)))[::-1], got
    got = sort_by("size", "desc")
    assert [s for _, s in got] == sorted(sizes, reverse=True), got
    assert got[0][0] == 0  # cluster 0 is the largest
    drv.back()  # hash routing: back restores the previous sort
    _wait(drv, lambda d: "sort=id" in d.current_url and _row_sizes(d)[0][0] == len(sizes) - 1,
          "back to the id-descending order")
    drv.forward()
    _wait(drv, lambda d: _row_sizes(d) and _row_sizes(d)[0][0] == 0, "forward to size order")
    rep = _images_loaded(drv, "#clusters-table")
    assert len(rep) == len(sizes)

    # merge two clusters (an annotation: the listing and the run's files stay as they are)
    _click(drv, _css(drv, '[data-cluster-id="3"] [data-testid="cluster-pick"]'))
    assert _by_id(drv, "merge-btn").get_attribute("disabled")  # needs two
    _click(drv, _css(drv, '[data-cluster-id="4"] [data-testid="cluster-pick"]'))
    _by_id(drv, "merge-name").send_keys("same person?")
    _click(drv, _by_id(drv, "merge-btn"))
    _wait(drv, lambda d: _saved(d, "merge"), "the saved merge")
    assert "merge clusters 3, 4" in _by_id(drv, "annotations").text
    assert [s for _, s in _row_sizes(drv)] == sorted(sizes, reverse=True)

    # the largest cluster: 48 thumbnails, then page 2 with the rest
    _click(drv, _css(drv, '[data-cluster-id="0"] [data-testid="cluster-link"]'))
    _wait(drv, lambda d: _thumbs(d) == 48, "48 thumbnails on page 1")
    assert _by_id(drv, "cluster-size").text == f"{sizes[0]} images"
    n_pages = -(-sizes[0] // 48)
    assert _css(drv, "#grid-pager .page-info").text == f"page 1 of {n_pages}"
    first = _css(drv, '#grid [data-testid="thumb-img"]')
    assert first.get_attribute("loading") == "lazy" and first.get_attribute("alt")
    assert first.get_attribute("title") == first.get_attribute("alt")
    _click(drv, _css(drv, '#grid-pager [data-testid="page-next"]'))
    _wait(drv, lambda d: "page=2" in d.current_url and _thumbs(d) == min(48, sizes[0] - 48),
          "page 2 of the grid")
    _wait(drv, lambda d: all(c and w > 0 for c, w, _ in _images_loaded(d, "#grid")),
          "page 2's thumbnails loaded")
    dims = _images_loaded(drv, "#grid")
    assert all(0 < w <= 128 and 0 < h <= 128 for _, w, h in dims), dims  # thumbnails only
    drv.refresh()  # a reload keeps the page
    _wait(drv, lambda d: _thumbs(d) == sizes[0] - 48, "page 2 after a reload")
    _click(drv, _css(drv, '#grid-pager [data-testid="page-first"]'))
    _wait(drv, lambda d: "page=" not in d.current_url and _thumbs(d) == 48, "back on page 1")

    # annotations: split two selected images out, rename the cluster
    picks = drv.find_elements(By.CSS_SELECTOR, '#grid [data-testid="thumb-pick"]')
    _click(drv, picks[0])
    _click(drv, picks[3])
    assert _by_id(drv, "selection-count").text == "2 selected"
    _by_id(drv, "split-name").send_keys("look-alikes")
    _click(drv, _by_id(drv, "split-btn"))
    _wait(drv, lambda d: _saved(d, "split"), "the saved split")
    assert "split 2 images out of cluster 0" in _by_id(drv, "annotations").text
    box = _by_id(drv, "rename-input")
    box.clear()
    box.send_keys("Ada")
    _click(drv, _by_id(drv, "rename-btn"))
    _wait(drv, lambda d: _by_id(d, "cluster-title").text == "Cluster 0: Ada", "renamed")
    assert _saved(drv, "rename")

    # re-cluster the largest cluster with k-means, K = 2: progress, then the nested run
    Select(_by_id(drv, "recluster-method")).select_by_value("kmeans")
    k = _by_id(drv, "recluster-k")
    k.clear()
    k.send_keys("2")
    _click(drv, _by_id(drv, "recluster-btn"))
    _wait(drv, lambda d: _by_id(d, "recluster-progress").is_displayed(), "the progress bar", 10)

    def finished(d):
        state = _by_id(d, "recluster-status").get_attribute("data-state")
        assert state != "failed", _by_id(d, "recluster-message").text
        return state == "done"

    _wait(drv, finished, "the re-cluster to finish", timeout=60)
    assert float(_by_id(drv, "recluster-progress").get_attribute("value")) == 1.0
    cluster_shot = tmp_path / "cluster.png"
    _js(drv, "window.scrollTo(0, 0)")
    drv.save_screenshot(str(cluster_shot))
    _click(drv, _by_id(drv, "recluster-link"))
    _wait(drv, lambda d: d.find_elements(By.ID, "run-title") and len(_row_sizes(d)) == 2,
          "the nested run's two clusters")
    nested = _row_sizes(drv)
    assert sum(s for _, s in nested) == sizes[0] and nested[0][1] >= nested[1][1], nested
    assert "/reclusters/" in drv.current_url.replace("%2F", "/")
    drv.get(base + "/#/")
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="run-row"]')) == 2,
          "the nested run listed under its parent")
    assert "cluster 0" in drv.find_elements(By.CSS_SELECTOR, '[data-testid="run-row"]')[1].text

    # search by an image name
    _click(drv, _css(drv, f'[data-run="{RUN}"] [data-testid="run-link"]'))
    _wait(drv, lambda d: _by_id(d, "search-input").is_displayed(), "the search box")
    _by_id(drv, "search-input").send_keys(Path(SEARCHED).stem)
    _click(drv, _by_id(drv, "search-btn"))
    _wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="search-hit"]'), "hits")
    hits = _js(drv, """return [...document.querySelectorAll('[data-testid="search-hit"]')].map(
        t => [t.querySelector('figcaption span').textContent, +t.dataset.clusterId]);""")
    assert hits == [[SEARCHED, cluster_of[SEARCHED]]], hits
    rows = _js(drv, """return [...document.querySelectorAll('[data-testid="search-cluster-row"]')]
        .map(r => +r.dataset.clusterId);""")
    assert rows == [cluster_of[SEARCHED]]

    # screenshots of the cluster view (taken above) and of this one: real 1280x800 PNGs
    search_shot = tmp_path / "search.png"
    drv.save_screenshot(str(search_shot))
    for png in (cluster_shot, search_shot):
        assert png.stat().st_size > 20_000, png
        assert _png_size(png) == (1280, 800)
    if os.environ.get("LTC_RAY_SCREENSHOT"):
        dest = Path(os.environ["LTC_RAY_SCREENSHOT"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cluster_shot, dest)

    # nothing went wrong in the page (chromedriver's copy of the console)
    try:
        logs = drv.get_log("browser")
    except Exception:  # noqa: BLE001 - a driver without the log endpoint: nothing to check
        logs = []
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, severe
    assert time.monotonic() - t0 < 100
