"""The web API of ``ltc-ray serve`` on real files: a generated image set, its embeddings,
a real finished cluster run (knn-cc on a local Ray), every route through FastAPI's
TestClient, a real re-cluster job (a subprocess with its own Ray), traversal attempts
(also raw ``..`` through a real uvicorn socket), and one run on a moto S3 server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require

require("fastapi", "ui")
require("httpx")
PIL = require("PIL")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from ltc_ray.cli import cluster_main, main  # noqa: E402
from ltc_ray.serve.app import create_app  # noqa: E402
from ltc_ray.serve.paths import PathRefused, clean_segments, resolve_name  # noqa: E402
from ltc_ray.synthetic.images import make_image_set  # noqa: E402

DIM = 16
N_ID, PER_ID = 4, 8


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """images/ (32 images of 4 identities + 1 corrupt), emb/embeddings.parquet with its
    report.json, and results/run-a: a finished knn-cc run on them."""
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    names = make_image_set(str(images), N_ID, PER_ID, size=32, seed=0, corrupt=1)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(N_ID, DIM))
    ident = np.array([int(n.split("/")[0][3:]) if n.startswith("id_") else -1 for n in names])
    x = np.where(ident[:, None] >= 0, centers[np.maximum(ident, 0)], rng.normal(size=DIM))
    x = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    emb = root / "emb"
    emb.mkdir()
    table = pa.table({"id": pa.array(np.arange(len(names), dtype=np.int64)),
                      "path": pa.array(names, type=pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)})
    pq.write_table(table, emb / "embeddings.parquet", row_group_size=10)
    (emb / "report.json").write_text(json.dumps({"kind": "ltc-ray-embeddings",
                                                 "images_root": str(images)}))
    results = root / "results"
    run = results / "run-a"
    rc = cluster_main(["--features", str(emb / "embeddings.parquet"), "--output", str(run),
                       "--method", "knn-cc", "--num-cpus", "2", "--set", "knn.k=5",
                       "--set", "methods.knn-cc.threshold=0.5",
                       "--work-dir", str(root / "work")])
    assert rc == 0
    parts = pa.concat_tables([pq.read_table(p) for p in sorted((run / "clusters").glob("*"))])
    cluster_of = np.empty(len(names), np.int64)
    cluster_of[parts.column("sample_id").to_numpy()] = parts.column("cluster_id").to_numpy()
    cache = root / "cache"
    client = TestClient(create_app(str(results), cache_dir=str(cache), recluster_cpus=2))
    return {"root": root, "images": images, "names": names, "results": results, "run": run,
            "cluster_of": cluster_of, "cache": cache, "client": client}


def test_runs_lists_the_finished_run(world):
    client = world["client"]
    runs = client.get("/api/runs").json()["runs"]
    row = next(r for r in runs if r["run"] == "run-a")
    assert row["method"] == "knn-cc" and row["n_samples"] == len(world["names"])
    assert row["n_clusters"] == int(world["cluster_of"].max()) + 1
    assert row["has_names"] is True and row["parent"] is None and row["pairwise_f"] is None
    # a folder without _SUCCESS (the embeddings, the work area) is no run
    assert {r["run"] for r in runs} == {"run-a"}


def test_overview_has_plots(world):
    out = world["client"].get("/api/overview", params={"run": "run-a"}).json()
    assert out["method"] == "knn-cc" and out["n_clusters"] == int(world["cluster_of"].max()) + 1
    assert set(out["svg"]) >= {"sizes", "similarity", "stages"}
    assert out["svg"]["sizes"].lstrip().startswith("<svg")
    assert world["client"].get("/api/overview", params={"run": "nope"}).status_code == 404


def test_clusters_sort_page_and_filter(world):
    client, cluster_of = world["client"], world["cluster_of"]
    sizes = np.bincount(cluster_of)
    k = len(sizes)

    def get(**params):
        r = client.get("/api/clusters", params={"run": "run-a", **params})
        assert r.status_code == 200, r.text
        return r.json()

    desc = get(sort="size", order="desc", limit=100)
    assert desc["total"] == k
    got = [c["size"] for c in desc["clusters"]]
    assert got == sorted(sizes.tolist(), reverse=True)
    assert all(c["size"] == sizes[c["cluster_id"]] for c in desc["clusters"])
    assert [c["size"] for c in get(sort="size", order="asc")["clusters"]] == sorted(sizes.tolist())
    assert [c["cluster_id"] for c in get(sort="id", order="asc")["clusters"]] == list(range(k))
    assert [c["cluster_id"] for c in get(sort="id", order="desc")["clusters"]] == \
        list(range(k))[::-1]
    first = get(sort="id", order="asc", limit=2, offset=0)
    second = get(sort="id", order="asc", limit=2, offset=2)
    assert [c["cluster_id"] for c in first["clusters"] + second["clusters"]] == \
        list(range(min(4, k)))
    rep = desc["clusters"][0]
    assert cluster_of[rep["representative"]] == rep["cluster_id"]
    assert rep["thumb"].startswith("/api/thumb?")
    # q: clusters with a member whose name contains the text, case-insensitively
    names = np.array(world["names"])
    hit = np.char.find(np.char.lower(names), "id_0002/") >= 0
    filtered = get(q="ID_0002/", limit=100)
    expected = np.bincount(cluster_of[hit], minlength=k)
    assert filtered["total"] == int(np.count_nonzero(expected))
    assert {c["cluster_id"]: c["matches"] for c in filtered["clusters"]} == \
        {int(c): int(expected[c]) for c in np.flatnonzero(expected)}
    assert get(q="no-such-name")["total"] == 0
    for bad in ({"sort": "colour"}, {"order": "up"}, {"limit": 0}, {"limit": 5000},
                {"offset": -1}, {"q": "x" * 500}):
        assert client.get("/api/clusters", params={"run": "run-a", **bad}).status_code == 400
    assert client.get("/api/clusters", params={"run": "no-run"}).status_code == 404
    assert client.get("/api/clusters").status_code == 400  # run is required


def test_cluster_members_are_paged(world):
    client, cluster_of, names = world["client"], world["cluster_of"], world["names"]
    cid = 0
    members = np.flatnonzero(cluster_of == cid)
    page = client.get("/api/cluster", params={"run": "run-a", "id": cid}).json()
    assert page["per_page"] == 48 and page["total_pages"] == 1 and page["size"] == len(members)
    seen = []
    total_pages = -(-len(members) // 3)
    for p in range(1, total_pages + 1):
        body = client.get("/api/cluster", params={"run": "run-a", "id": cid, "page": p,
                                                  "per_page": 3}).json()
        assert body["total_pages"] == total_pages and len(body["members"]) <= 3
        seen += body["members"]
    assert [m["sample_id"] for m in seen] == members.tolist()
    assert [m["name"] for m in seen] == [names[i] for i in members]
    bad = [{"id": cid, "page": total_pages + 1, "per_page": 3}, {"id": cid, "page": 0},
           {"id": cid, "per_page": 0}, {"id": "x"}]
    for params in bad:
        r = client.get("/api/cluster", params={"run": "run-a", **params})
        assert r.status_code == 400, params
    assert client.get("/api/cluster", params={"run": "run-a", "id": 999}).status_code == 404


def test_search_by_name(world):
    client, cluster_of, names = world["client"], world["cluster_of"], world["names"]
    body = client.get("/api/search", params={"run": "run-a", "q": "ID_0001/000"}).json()
    expected = [i for i, n in enumerate(names) if "id_0001/000" in n]
    assert body["total"] == len(expected)
    assert [m["sample_id"] for m in body["matches"]] == expected
    assert all(m["cluster_id"] == cluster_of[m["sample_id"]] for m in body["matches"])
    limited = client.get("/api/search", params={"run": "run-a", "q": "id_", "limit": 2}).json()
    assert limited["total"] == N_ID * PER_ID and len(limited["matches"]) == 2
    assert client.get("/api/search", params={"run": "run-a", "q": " "}).status_code == 400


def test_thumbnails_are_small_cached_jpegs_never_the_original(world):
    client, names, images, cache = world["client"], world["names"], world["images"], world["cache"]
    sid = next(i for i, n in enumerate(names) if n.endswith(".jpg") and n.startswith("id_"))
    original = (images / names[sid]).read_bytes()
    for size in (64, 128, 256):
        r = client.get("/api/thumb", params={"run": "run-a", "sample": sid, "size": size})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content != original
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and max(img.size) <= size
    cached = list(cache.rglob("*.jpg"))
    assert len(cached) >= 3
    again = client.get("/api/thumb", params={"run": "run-a", "sample": sid, "size": 64})
    assert again.headers["x-thumbnail"] == "cached" and again.content != original
    assert any(p.read_bytes() == again.content for p in cached)
    # a corrupt image: a placeholder tile, not an error
    bad = names.index(next(n for n in names if n.startswith("corrupt/")))
    r = client.get("/api/thumb", params={"run": "run-a", "sample": bad, "size": 128})
    assert r.status_code == 200 and r.headers["x-thumbnail"] == "unreadable"
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)
    assert client.get("/api/thumb", params={"run": "run-a", "sample": sid,
                                            "size": 100}).status_code == 400
    assert client.get("/api/thumb", params={"run": "run-a", "sample": 10**6}).status_code == 404


def test_annotations_round_trip_leave_the_output_unchanged(world):
    client, run, cluster_of = world["client"], world["run"], world["cluster_of"]
    before = _tree_hashes(run)
    members0 = np.flatnonzero(cluster_of == 0)
    post = [
        {"run": "run-a", "action": "merge", "cluster_ids": [0, 1], "sample_ids": [],
         "name": ""},
        {"run": "run-a", "action": "split", "cluster_ids": [0],
         "sample_ids": members0[:2].tolist(), "name": "left"},
        {"run": "run-a", "action": "rename", "cluster_ids": [2], "name": "alice"},
    ]
    saved = []
    for body in post:
        r = client.post("/api/annotations", json=body)
        assert r.status_code == 200, r.text
        saved.append(r.json())
    assert [s["seq"] for s in saved] == [1, 2, 3]
    rows = client.get("/api/annotations", params={"run": "run-a"}).json()["annotations"]
    assert [(r["action"], r["cluster_ids"], r["sample_ids"], r["name"]) for r in rows] == [
        ("merge", [0, 1], [], None), ("split", [0], members0[:2].tolist(), "left"),
        ("rename", [2], [], "alice")]
    table = pq.read_table(run / "annotations.parquet")
    assert table.num_rows == 3 and table.column("action").to_pylist() == ["merge", "split",
                                                                           "rename"]
    named = client.get("/api/clusters", params={"run": "run-a", "sort": "name",
                                                "order": "asc"}).json()["clusters"]
    assert named[0]["cluster_id"] == 2 and named[0]["name"] == "alice"
    one = client.get("/api/cluster", params={"run": "run-a", "id": 2}).json()
    assert one["name"] == "alice"
    other = int(np.flatnonzero(cluster_of != 0)[0])
    refused = [
        {"run": "run-a", "action": "merge", "cluster_ids": [0]},
        {"run": "run-a", "action": "merge", "cluster_ids": [0, 999]},
        {"run": "run-a", "action": "split", "cluster_ids": [0], "sample_ids": [other]},
        {"run": "run-a", "action": "split", "cluster_ids": [0],
         "sample_ids": members0.tolist()},
        {"run": "run-a", "action": "rename", "cluster_ids": [1], "name": "x" * 201},
        {"run": "run-a", "action": "rename", "cluster_ids": [1], "name": ""},
        {"run": "run-a", "action": "delete", "cluster_ids": [1]},
    ]
    for body in refused:
        assert client.post("/api/annotations", json=body).status_code == 400, body
    assert client.post("/api/annotations", content=json.dumps(post[2]),
                       headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/api/annotations", json={**post[2], "run": "nope"}).status_code == 404
    after = _tree_hashes(run)
    assert after.pop("annotations.parquet")
    assert after == before  # the committed output's files are byte for byte the same


def _check_run_method_recluster(world) -> None:
    """Re-cluster with the run's own method and parameters (knn-cc, threshold 0.5): the
    nested run records them, holds exactly the parent cluster's members, and its folder
    layout nests in the parent cluster's folder (the parent's layout exists by now)."""
    client, results, names = world["client"], world["results"], world["names"]
    members = np.flatnonzero(world["cluster_of"] == 1)
    r = client.post("/api/recluster", json={"run": "run-a", "cluster_id": 1, "method": "run"})
    assert r.status_code == 200, r.text
    job, deadline = r.json()["job"], time.monotonic() + 100
    while (state := client.get(f"/api/jobs/{job}").json())["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["state"] == "done", state
    assert state["run"].startswith("run-a/reclusters/1-knn-cc-")
    record = json.loads((results / state["run"] / "run.json").read_text())
    assert record["method"] == "knn-cc"
    assert record["config"]["methods"]["knn-cc"]["threshold"] == 0.5
    body = client.get("/api/clusters", params={"run": state["run"], "limit": 500}).json()
    got = []
    for row in body["clusters"]:
        page = client.get("/api/cluster", params={"run": state["run"], "id": row["cluster_id"],
                                                  "per_page": 500}).json()
        got += [m["name"] for m in page["members"]]
    assert sorted(got) == sorted(names[i] for i in members)
    assert Path(state["folders"]).parent.name == "001"


def test_recluster_kmeans_makes_a_nested_run_with_folders(world):
    client, results, run, names = world["client"], world["results"], world["run"], world["names"]
    sizes = np.bincount(world["cluster_of"])
    before = {k: v for k, v in _tree_hashes(run).items() if not k.startswith("annotations")}
    for bad in ({"run": "run-a", "cluster_id": 0, "method": "kmeans", "k": 1},
                {"run": "run-a", "cluster_id": 0, "method": "spectral", "k": 2},
                {"run": "run-a", "cluster_id": 999, "method": "kmeans", "k": 2},
                {"run": "run-a", "cluster_id": 0, "method": "kmeans",
                 "k": int(sizes[0]) + 1}):
        assert client.post("/api/recluster", json=bad).status_code == 400, bad
    assert client.get("/api/jobs/unknown").status_code == 404
    r = client.post("/api/recluster", json={"run": "run-a", "cluster_id": 0,
                                            "method": "kmeans", "k": 2})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    seen_progress = []
    deadline = time.monotonic() + 100
    while True:
        state = client.get(f"/api/jobs/{job}").json()
        seen_progress.append(state["progress"])
        if state["state"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert state["state"] == "done", state
    assert state["progress"] == 1.0 and seen_progress == sorted(seen_progress)
    nested = state["run"]
    assert nested.startswith("run-a/reclusters/0-kmeans-")
    _check_run_method_recluster(world)
    rows = {r["run"]: r for r in client.get("/api/runs").json()["runs"]}
    assert rows[nested]["parent"] == {"run": "run-a", "cluster_id": 0}
    assert rows[nested]["n_clusters"] == 2 and rows[nested]["has_names"]
    nested_dir = results / nested
    assert (nested_dir / "_SUCCESS").is_file() and (nested_dir / "parent.json").is_file()
    parts = pa.concat_tables([pq.read_table(p) for p in (nested_dir / "clusters").glob("*")])
    assert parts.num_rows == sizes[0]
    # the nested run's members are the parent cluster's, by name
    members = np.flatnonzero(world["cluster_of"] == 0)
    got = []
    for cid in range(2):
        body = client.get("/api/cluster", params={"run": nested, "id": cid}).json()
        got += [m["name"] for m in body["members"]]
    assert sorted(got) == sorted(names[i] for i in members)
    # folder layout: the parent's exported into run-a/folders, the nested one inside 000
    folders = Path(state["folders"])
    assert folders.is_dir() and folders.parent.name == "000"
    assert folders.parent.parent.parent == run / "folders"
    nested_names = sorted(p.read_text().split("\n") for p in folders.glob("*/img_names.txt"))
    assert sorted(n for group in nested_names for n in group) == sorted(names[i] for i in members)
    # the seed's /browse over that layout, paged, names pointing at /image/ thumbnails
    rel = folders.parent.relative_to(results).as_posix()
    page = client.get(f"/browse/{rel}", params={"page": 1, "num_per_page": 3}).json()
    assert page["total_images"] == sizes[0] and len(page["img_names"]) == 3
    assert page["total_pages"] == -(-int(sizes[0]) // 3) and not page["is_last_img_page"]
    assert folders.name in page["clu_names"]
    img = client.get(page["img_names"][0])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    top = client.get("/browse/").json()
    assert top["clu_names"] == ["run-a"] and top["total_images"] == 0
    # the parent's committed output is untouched
    after = {k: v for k, v in _tree_hashes(run).items()
             if not k.startswith(("annotations", "reclusters", "folders"))}
    assert after == before


def _attempts() -> list[str]:
    return ["/image/%2e%2e/%2e%2e/etc/passwd", "/image/%252e%252e/%252e%252e/etc/passwd",
            "/image/..%2f..%2fetc/passwd", "/image/%2Fetc%2Fpasswd", "/image//etc/passwd",
            "/image/id_0000%5c..%5c..%5cetc%5cpasswd", "/image/file:%2F%2F%2Fetc%2Fpasswd",
            "/image/~root/.bashrc", "/image/id_0000/%00.png",
            "/browse/%2e%2e", "/browse/%252e%252e/", "/browse/..%2F..%2F", "/browse//etc",
            "/browse/run-a%5c..%5c..", "/api/clusters?run=..%2F..",
            "/api/thumb?run=%2Fetc&sample=0"]


def test_traversal_is_refused(world, tmp_path):
    images = world["images"]
    client = TestClient(create_app(str(world["results"]), str(images),
                                   cache_dir=str(tmp_path / "c")))
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    os.symlink(secret, images / "evil.png")
    os.symlink(tmp_path, images / "evil_dir")
    try:
        for url in _attempts():
            r = client.get(url)
            assert r.status_code == 403, (url, r.status_code)
            assert b"root:" not in r.content and r.headers["content-type"] != "image/jpeg"
        for url in ("/image/evil.png", "/image/evil_dir/secret.png"):
            r = client.get(url)
            assert r.status_code == 403, url
        assert client.get("/image/id_0000/0000.png").status_code == 200
        assert client.get("/image/id_0000/none.png").status_code == 404
        assert client.get("/image/id_0000/0000.png", params={"size": 4000}).status_code == 400
        assert client.get("/browse/no-such-folder").status_code == 404
        # raw, un-normalised '..' (as curl --path-as-is sends it) through a real server
        for raw in ("/image/../../../../etc/passwd", "/browse/../../", "/image/../secret.png"):
            status, body = _raw_get(client.app, raw)
            assert status == 403, (raw, status)
            assert b"root:" not in body
    finally:
        os.unlink(images / "evil.png")
        os.unlink(images / "evil_dir")


def _raw_get(app, path: str) -> tuple[int, bytes]:
    """GET ``path`` byte for byte from a real uvicorn server on 127.0.0.1."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close"
                         "\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_path_helpers():
    assert clean_segments("a/b//c/") == ["a", "b", "c"]
    for bad in ("..", "a/../b", "%2e%2e", "%252e%252e", "a\\b", "/etc", "s3://x", "C:/x",
                "~/x", "a\x00b", "%00"):
        with pytest.raises(PathRefused):
            clean_segments(bad)
    with pytest.raises(PathRefused):
        resolve_name("/srv/images", "/etc/passwd")
    with pytest.raises(PathRefused):
        resolve_name("/srv/images", "/srv/images/../x.png")
    assert resolve_name("/srv/images", "/srv/images/a/x.png") == "/srv/images/a/x.png"
    assert resolve_name("s3://b/img", "a/x.png") == "s3://b/img/a/x.png"
    with pytest.raises(PathRefused):
        resolve_name("s3://b/img", "s3://b/other/x.png")


def test_host_check_and_errors(world, tmp_path):
    app = create_app(str(world["results"]), cache_dir=str(tmp_path / "c"),
                     allowed_hosts=["127.0.0.1", "localhost"])
    good = TestClient(app, base_url="http://127.0.0.1:8000")
    r = good.get("/api/runs")
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "access-control-allow-origin" not in r.headers
    assert TestClient(app, base_url="http://evil.example").get("/api/runs").status_code == 400
    cross = good.post("/api/annotations", json={"run": "run-a", "action": "rename",
                                                "cluster_ids": [1], "name": "x"},
                      headers={"origin": "http://evil.example"})
    assert cross.status_code == 403
    page = good.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert good.get("/static/app.js").status_code == 200
    assert good.get("/static/../app.py").status_code == 404


def test_serve_cli(world, tmp_path, monkeypatch, capsys):
    import uvicorn

    assert main(["serve", "--results", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", "--results", str(world["results"]), "--port", "70000"]) == 2
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "--results", str(world["results"]), "--cache-dir",
                 str(tmp_path / "c"), "--port", "8123"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8123
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--results", str(world["results"]), "--cache-dir",
                 str(tmp_path / "c"), "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0"
    assert "warning: binding 0.0.0.0" in capsys.readouterr().err


def _copy_run(run: Path, features: str, put) -> None:
    """Copy a finished run through ``put(relative path, bytes)`` with run.json's
    "features" replaced (and the _SUCCESS manifest's size of run.json with it)."""
    record = json.loads((run / "run.json").read_text())
    record["features"] = features
    run_json = json.dumps(record).encode()
    manifest = json.loads((run / "_SUCCESS").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "run.json":
            entry["bytes"] = len(run_json)
        else:
            put(entry["path"], (run / entry["path"]).read_bytes())
    put("run.json", run_json)
    put("_SUCCESS", json.dumps(manifest).encode())


def test_run_without_names_shows_sample_ids(world, tmp_path):
    """A run whose input has no names (a .bin, here gone): placeholder tiles with the
    sample id, searches over the ids, members without names."""
    from ltc_ray.serve.thumbs import placeholder_jpeg

    dst = tmp_path / "results" / "bare"

    def put(rel: str, data: bytes) -> None:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)

    _copy_run(world["run"], str(tmp_path / "gone.bin"), put)
    client = TestClient(create_app(str(tmp_path / "results"), cache_dir=str(tmp_path / "c")))
    [row] = client.get("/api/runs").json()["runs"]
    assert row["run"] == "bare" and row["has_names"] is False
    r = client.get("/api/thumb", params={"run": "bare", "sample": 7, "size": 64})
    assert r.status_code == 200 and r.headers["x-thumbnail"] == "placeholder"
    assert r.content == placeholder_jpeg("#7", 64)
    assert r.content != client.get("/api/thumb", params={"run": "bare", "sample": 8,
                                                         "size": 64}).content
    members = client.get("/api/cluster", params={"run": "bare", "id": 0}).json()["members"]
    assert members and all(m["name"] is None for m in members)
    found = client.get("/api/search", params={"run": "bare", "q": "1"}).json()
    n = len(world["names"])
    assert found["total"] == sum("1" in str(i) for i in range(n))


def test_object_storage_runs_and_thumbnail(world, tmp_path):
    """The run and the images on a moto S3 server: runs listed, a thumbnail made."""
    server_mod = require("moto.server")
    s3fs = require("s3fs")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"key": "testing", "secret": "testing",
              "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**so)
        fs.call_s3("create_bucket", Bucket="ltc")
        root = world["root"]
        fs.put(str(world["images"]) + "/", "ltc/images/", recursive=True)
        fs.put(str(root / "emb" / "embeddings.parquet"), "ltc/emb/embeddings.parquet")
        fs.pipe("ltc/emb/report.json", json.dumps(
            {"kind": "ltc-ray-embeddings", "images_root": "s3://ltc/images"}).encode())
        _copy_run(world["run"], "s3://ltc/emb/embeddings.parquet",
                  lambda rel, data: fs.pipe(f"ltc/results/r1/{rel}", data))
        client = TestClient(create_app("s3://ltc/results", storage_options=so,
                                       cache_dir=str(tmp_path / "c")))
        runs = client.get("/api/runs").json()["runs"]
        assert [r["run"] for r in runs] == ["r1"] and runs[0]["has_names"]
        sid = next(i for i, n in enumerate(world["names"]) if n.startswith("id_"))
        r = client.get("/api/thumb", params={"run": "r1", "sample": sid, "size": 64})
        assert r.status_code == 200 and r.headers["x-thumbnail"] == "made"
        assert max(Image.open(io.BytesIO(r.content)).size) <= 64
        assert client.get("/api/cluster", params={"run": "r1", "id": 0}).status_code == 200
        assert client.get("/api/clusters", params={"run": "../r1"}).status_code == 403
    finally:
        server.stop()


def test_run_index_is_rebuilt_when_success_changes(world, tmp_path, monkeypatch):
    from ltc_ray.serve import runs as runs_mod

    dst = tmp_path / "results" / "copy"

    def put(rel: str, data: bytes) -> None:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)

    _copy_run(world["run"], json.loads((world["run"] / "run.json").read_text())["features"],
              put)
    registry = runs_mod.RunRegistry(str(tmp_path / "results"))
    monkeypatch.setattr(runs_mod, "STAMP_TTL_S", 0.0)
    first = registry.get("copy")
    assert registry.get("copy") is first  # unchanged _SUCCESS: the cached index
    np.testing.assert_array_equal(first.cluster_of, world["cluster_of"])
    assert first.parent is None and first.names is not None
    (dst / "parent.json").write_text(json.dumps({"run": "x", "cluster_id": 3}))
    os.utime(dst / "_SUCCESS", (time.time() + 5, time.time() + 5))  # a new commit
    second = registry.get("copy")
    assert second is not first and second.parent == {"run": "x", "cluster_id": 3}
    with pytest.raises(runs_mod.UnknownRun):
        registry.get("nope")
