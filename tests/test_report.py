"""The run overview, its SVG plots and the static HTML report (``ltc-ray report``,
``jobs/cluster.py --report``), on a real small job run once for the module."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _data import random_knn, sphere_faces, write_bin

from ltc_ray.cli import main
from ltc_ray.errors import InputError
from ltc_ray.graph.knn_graph import load_manifest, read_knn_rows
from ltc_ray.graph.similarity_stats import combine, rank_histograms
from ltc_ray.io.output import check_output_location, read_clusters
from ltc_ray.report import (
    overview_svgs,
    render_report,
    run_overview,
    similarity_histogram_svg,
    size_histogram_svg,
    stage_bars_svg,
    write_report,
)
from ltc_ray.report.overview import STAGE_ORDER, log2_size_histogram

SVG = "{http://www.w3.org/2000/svg}"
K = 20


def _coarse(values: np.ndarray, bins: int = 100) -> list[int]:
    return np.histogram(values.astype(np.float64), bins=bins, range=(-1.0, 1.0))[0].tolist()


# ------------------------------------------------------------------ the histogram in run.json
def test_coarse_histogram_is_exact_and_partition_free():
    ids, sims = random_knn(300, 30, seed=5)  # negative similarities and padding included
    whole = combine(30, [rank_histograms(ids, sims)]).summary()["histogram"]
    parts = [rank_histograms(ids[lo:hi], sims[lo:hi]) for lo, hi in ((0, 90), (90, 211),
                                                                      (211, 300))]
    assert combine(30, parts).summary()["histogram"] == whole
    valid = ids[:, 1:] >= 0
    assert whole["bins"] == 100 and (whole["lo"], whole["hi"]) == (-1.0, 1.0)
    assert whole["all"] == _coarse(sims[:, 1:][valid])
    assert whole["r1"] == _coarse(sims[valid[:, 0], 1])
    assert whole["far"] == _coarse(sims[valid[:, 28], 29])  # far rank min(79, k - 1) = 29


def test_log2_bins():
    sizes = np.array([1, 1, 2, 3, 4, 7, 8, 1023, 1024, (1 << 40) - 1, 1 << 40])
    hist = log2_size_histogram(sizes)
    assert hist["edges"] == [1 << i for i in range(42)]
    expect = np.zeros(41, int)
    for s in sizes:
        expect[int(s).bit_length() - 1] += 1
    assert hist["counts"] == expect.tolist()
    assert log2_size_histogram(np.array([], np.int64)) == {"edges": [1], "counts": []}


# ------------------------------------------------------------------ one real job
@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    """knn-cc (threshold and attach cut derived) on 300 rows, 3 partitions, through
    ``ltc-ray cluster --report``; returns (output, labels, work dir, the job's stdout)."""
    root = tmp_path_factory.mktemp("report")
    x, labels = sphere_faces(30, 10, 32, seed=3, noise=0.8)
    write_bin(root / "x.bin", x, labels)
    out, work = root / "out", root / "work"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["cluster", "--features", str(root / "x.bin"), "--dim", "32",
                     "--labels", str(root / "x.meta"), "--method", "knn-cc",
                     "--output", str(out), "--work-dir", str(work), "--report",
                     "--set", f"knn.k={K}", "--set", "cluster.partitions=3"])
    assert code == 0, buf.getvalue()
    return out, root / "x.meta", work, buf.getvalue()


def test_overview_numbers(finished):
    out, _, work, _ = finished
    run = json.loads((out / "run.json").read_text())
    ov = run_overview(str(out))
    sizes = pq.read_table(out / "cluster_summary.parquet").column("size").to_numpy()
    assert ov["n_clusters"] == run["n_clusters"] == len(sizes) > 1
    assert sum(ov["sizes"]["counts"]) == ov["n_clusters"]
    assert ov["sizes"]["counts"] == log2_size_histogram(sizes)["counts"]
    assert ov["size_summary"] == run["cluster_sizes"]
    assert ov["metrics"] == run["metrics"] and 0 < ov["metrics"]["pairwise_f"] <= 1
    # stages in pipeline order, peak memory = the largest worker/actor figure
    names = [s["name"] for s in ov["stages"]]
    assert names == sorted(names, key=lambda n: STAGE_ORDER.index(n))
    assert {"plan", "knn", "graph_stats", "link", "merge", "write", "metrics"} <= set(names)
    for st in ov["stages"]:
        rec = run["stages"][st["name"]]
        actors = rec.get("actor_peak_rss_bytes", [])
        peaks = [rec["worker_peak_rss_bytes"], *(actors if isinstance(actors, list) else
                                                  [actors])]
        assert st["peak_rss_bytes"] == (max(peaks) or None)
        assert st["seconds"] == rec["seconds"]
    # the similarity histogram: the graph's own (3 partitions summed == one process)
    sim = ov["similarity"]
    assert sum(sim["all"]) == run["similarity"]["edges"] == 300 * (K - 1)
    graph = load_manifest(str(work / "knn"))
    ids, sims = read_knn_rows(graph, 0, graph.n_rows)
    assert sim["all"] == _coarse(sims[:, 1:][ids[:, 1:] >= 0])
    assert sim["r1"] == _coarse(sims[:, 1][ids[:, 1] >= 0])
    assert len(sim["edges"]) == 101 and sim["edges"][0] == -1.0 and sim["edges"][-1] == 1.0
    # thresholds: exactly the derived similarity values, labelled
    derived = run["derived_parameters"]
    assert set(derived) == {"knn-cc.threshold", "cluster.attach_threshold"}
    assert {t["name"]: t["value"] for t in sim["thresholds"]} == {
        name: entry["value"] for name, entry in derived.items()}
    assert ov["parameters"]["knn-cc.threshold"] == derived["knn-cc.threshold"]["value"]
    json.dumps(ov, allow_nan=False)  # served as JSON by the web page as it is


def test_overview_on_object_storage(finished):
    """Through fsspec only: the result copied to memory://, the report written there."""
    import fsspec

    out = finished[0]
    fs = fsspec.filesystem("memory")
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != "report.html":
            fs.pipe_file(f"/report-test/{path.relative_to(out)}", path.read_bytes())
    uri = "memory://report-test"
    ov = run_overview(uri)
    local = run_overview(str(out))
    assert {**ov, "output": None} == {**local, "output": None}
    assert write_report(uri) == "memory://report-test/report.html"
    _check_page(fs.cat_file("/report-test/report.html").decode())
    fs.rm("/report-test", recursive=True)


def _bars(svg: str, cls: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [e for e in root.iter(f"{SVG}rect") if cls in (e.get("class") or "").split()]


def test_svgs(finished):
    out = finished[0]
    ov = run_overview(str(out))
    svgs = overview_svgs(ov)
    assert svgs == overview_svgs(run_overview(str(out)))  # deterministic
    for svg in svgs.values():
        assert ET.fromstring(svg).tag == f"{SVG}svg"
    assert len(_bars(svgs["sizes"], "bar")) == sum(1 for c in ov["sizes"]["counts"] if c)
    sim = ov["similarity"]
    assert len(_bars(svgs["similarity"], "all")) == sum(1 for c in sim["all"] if c)
    root = ET.fromstring(svgs["similarity"])
    lines = [e for e in root.iter(f"{SVG}line") if e.get("class") == "threshold"]
    assert len(lines) == len(sim["thresholds"]) == 2
    labels = "".join(e.text or "" for e in root.iter(f"{SVG}text"))
    for th in sim["thresholds"]:
        assert f"{th['name']} = {th['value']:.3f}" in labels
    polylines = {e.get("class") for e in root.iter(f"{SVG}polyline")}
    assert polylines == {"series r1", "series far"}
    stages = _bars(svgs["stages"], "stage")
    assert len(stages) == len(ov["stages"])
    widths = [float(r.get("width")) for r in stages]
    slowest = max(range(len(widths)), key=widths.__getitem__)
    assert ov["stages"][slowest]["seconds"] == max(s["seconds"] for s in ov["stages"])
    # a run that kept only rank quantiles (before run.json had histograms): boxes
    old = {**ov, "similarity": {**sim, "edges": None, "all": None, "r1": None, "far": None}}
    boxes = _bars(similarity_histogram_svg(old), "box")
    assert len(boxes) == 3
    assert similarity_histogram_svg({**ov, "similarity": None}) is None


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("href", "src", "xlink:href", "action")]


def _check_page(text: str, plots: int = 3) -> _Collect:
    parser = _Collect()
    parser.feed(text)
    parser.close()
    assert "script" not in parser.tags and "link" not in parser.tags
    assert parser.tags.count("svg") == plots
    assert not [r for r in parser.refs if re.match(r"\s*(https?:)?//", r)]
    assert "url(" not in text and "@import" not in text
    # the only http text is the SVG namespace name (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) == {"http://www.w3.org/2000/svg"}
    return parser


def test_html_report(finished):
    out, _, _, stdout = finished
    page = out / "report.html"  # written by cluster --report
    assert f"report: {page}" in stdout
    text = page.read_text()
    _check_page(text)
    ov = run_overview(str(out))
    assert text == render_report(ov)
    assert f"{ov['metrics']['pairwise_f'] * 100:.2f}%" in text
    for st in ov["stages"]:
        assert f"<td>{st['name']}</td>" in text
    # user text is escaped everywhere
    evil = {**ov, "name": "<script>alert(1)</script>&", "method": '"><img src=x>'}
    evil_text = render_report(evil)
    _check_page(evil_text)
    assert "<script>" not in evil_text and "<img" not in evil_text
    for svg in overview_svgs(evil).values():
        ET.fromstring(svg)


def test_report_cli(finished, tmp_path, capsys):
    out = finished[0]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"
    _check_page((out / "report.html").read_text())
    assert main(["report", str(out)]) == 0  # replaces its own report
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(out), "--to", str(other)]) == 0
    assert other.read_text() == (out / "report.html").read_text()
    capsys.readouterr()
    # refused with one line, exit 2: a user's file, a file inside the result, an unfinished run
    mine = tmp_path / "notes.html"
    mine.write_text("my notes")
    assert main(["report", str(out), "--to", str(mine)]) == 2
    assert mine.read_text() == "my notes"
    assert main(["report", str(out), "--to", str(out / "clusters" / "x.html")]) == 2
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "_SUCCESS").unlink()
    assert main(["report", str(unfinished)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "_SUCCESS" in err[2] and str(unfinished) in err[2]
    assert (unfinished / "report.html").read_text() == (out / "report.html").read_text()
    assert main(["cluster", "--dry-run", "--report", "--rows", "100"]) == 2


def test_result_with_report_is_still_readable(finished, capsys):
    out, labels, _, _ = finished
    assert (out / "report.html").exists()
    table = read_clusters(str(out))  # the manifest's files are checked, extras ignored
    assert table.num_rows == 300
    assert main(["evaluate", "--pred", str(out), "--labels", str(labels)]) == 0
    assert "| " + str(out) in capsys.readouterr().out
    assert write_report(str(out)).endswith("report.html")


def test_overwrite_replaces_a_result_with_its_report(finished, tmp_path, capsys):
    out, labels, work, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert (copy / "report.html").exists()
    check_output_location(str(copy), overwrite=True)  # what --overwrite checks first
    code = main(["cluster", "--features", str(Path(labels).with_suffix(".bin")), "--dim", "32",
                 "--method", "knn-cc", "--output", str(copy), "--work-dir", str(work),
                 "--overwrite", "--report", "--set", f"knn.k={K}",
                 "--set", "cluster.partitions=3"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((copy / "run.json").read_text())
    assert run["run_id"] in (copy / "report.html").read_text()


def test_empty_and_missing_parts_of_an_overview():
    ov = {"name": "x", "sizes": {"edges": [1], "counts": []}, "stages": [], "similarity": None}
    for svg in (size_histogram_svg(ov), stage_bars_svg(ov)):
        ET.fromstring(svg)
    _check_page(render_report(ov), plots=2)  # no similarity statistics: a note instead


def test_a_users_own_report_html_is_never_adopted(finished, tmp_path):
    """Only a report carrying ltc-ray's generator tag counts as the job's: a user's own
    report.html beside a result keeps --overwrite away from the location."""
    out = finished[0]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "report.html").write_text("<html><body>my notes</body></html>")
    with pytest.raises(InputError, match="report.html"):
        check_output_location(str(copy), overwrite=True)
