"""The embedding job (ltc_ray/embed): images -> embeddings.parquet on a real local Ray,
with a real TorchScript model, its ONNX twin on onnxruntime, generated images (PNG/JPEG,
some corrupt), resume after damaged parts, bad inputs, and the cluster job on the output."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ltc_ray.cli import run_verb
from ltc_ray.embed import (
    EMBEDDINGS,
    FAILED,
    REPORT,
    SUCCESS,
    WORK_DIR,
    EmbedSpec,
    Preprocess,
    decode_image,
    run_embed,
)
from ltc_ray.errors import InputError
from ltc_ray.synthetic.images import identity_of, make_image_set, write_tiny_model

N_ID, PER_ID = 12, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    images = root / "images"
    names = make_image_set(str(images), N_ID, PER_ID, size=32, seed=3, corrupt=3)
    (images / "notes.txt").write_text("not an image")  # listed, then failed: never dropped
    (images / ".hidden.png").write_bytes(b"hidden files are not listed")
    models = root / "models"
    sidecar = write_tiny_model(str(models / "tiny.pt"), "torchscript", seed=1)
    onnx_sidecar = write_tiny_model(str(models / "tiny.onnx"), "onnx", seed=1)
    write_tiny_model(str(models / "other" / "tiny.onnx"), "onnx", seed=2)  # a changed model
    return {"root": root, "images": images, "names": names, "sidecar": sidecar,
            "onnx_sidecar": onnx_sidecar, "pt": str(models / "tiny.pt"),
            "onnx": str(models / "tiny.onnx"), "other": str(models / "other" / "tiny.onnx")}


def _direct_embeddings(model_path: str, images: os.PathLike, names: list[str]) -> np.ndarray:
    """The model run in this process on PIL's own decoding (the 32 x 32 sources need no
    resize): the reference the job must match."""
    import torch

    pixels = np.stack([np.asarray(Image.open(os.path.join(images, n)).convert("RGB"))
                       for n in names]).astype(np.float32)
    x = ((pixels / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2)
    model = torch.jit.load(model_path, map_location="cpu")
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _read(out) -> tuple[pa.Table, pa.Table, dict]:
    return (pq.read_table(os.path.join(out, EMBEDDINGS)), pq.read_table(os.path.join(out, FAILED)),
            json.loads(open(os.path.join(out, REPORT)).read()))


@pytest.fixture(scope="module")
def folder_run(ray_local, data):
    out = str(data["root"] / "out-folder")
    report = run_embed(EmbedSpec(input=str(data["images"]), model=data["pt"], output=out,
                                 chunk_size=32))
    return out, report


def test_folder_input_embeds_every_image_and_lists_the_failures(data, folder_run):
    out, report = folder_run
    emb, failed, on_disk = _read(out)
    good = [n for n in data["names"] if not n.startswith("corrupt/")]
    assert emb.schema.field("id").type == pa.int64()
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert emb.column("id").to_pylist() == list(range(len(good)))
    assert emb.column("path").to_pylist() == good  # sorted listing order, subfolders included
    vectors = np.asarray(emb.column("embedding").combine_chunks().values).reshape(-1, 32)
    np.testing.assert_allclose(vectors, _direct_embeddings(data["pt"], data["images"], good),
                               atol=1e-5, rtol=0)
    errors = dict(zip(failed.column("path").to_pylist(), failed.column("error").to_pylist(),
                      strict=True))
    assert sorted(errors) == ["corrupt/bad_000.jpg", "corrupt/bad_001.png",
                              "corrupt/bad_002.jpg", "notes.txt"]
    assert "extension" in errors["notes.txt"] and "0x" not in errors["corrupt/bad_002.jpg"]
    assert on_disk == {k: v for k, v in report.items() if k != "committed"}
    assert (report["n_listed"], report["n_embedded"], report["n_failed"]) == (
        len(good) + 4, len(good), 4)
    assert report["kind"] == "ltc-ray-embeddings" and report["dim"] == 32
    assert report["images_root"] == str(data["images"])
    assert {r["path"] for r in report["failed_sample"]} == set(errors)
    assert report["chunks"] == 3 and report["reused_chunks"] == 0
    # one row group per part (3 chunks, each with embedded images)
    assert pq.ParquetFile(os.path.join(out, EMBEDDINGS)).num_row_groups == 3
    manifest = json.loads(open(os.path.join(out, SUCCESS)).read())
    assert manifest["format"] == "ltc-ray-embeddings/1"
    assert {f["path"]: f["bytes"] for f in manifest["files"]} == {
        n: os.path.getsize(os.path.join(out, n)) for n in (EMBEDDINGS, FAILED, REPORT)}
    assert os.path.getmtime(os.path.join(out, SUCCESS)) >= max(
        os.path.getmtime(os.path.join(out, n)) for n in (EMBEDDINGS, FAILED, REPORT))
    assert not os.path.exists(os.path.join(out, WORK_DIR))
    # a finished output is refused without --overwrite (before any work), exit code 2
    with pytest.raises(InputError, match="--overwrite"):
        run_embed(EmbedSpec(input=str(data["images"]), model=data["pt"], output=out))
    assert run_verb("embed", ["--input", str(data["images"]), "--model", data["pt"],
                              "--output", out]) == 2


def test_list_file_with_onnx_twin_and_parquet_column_via_cli(ray_local, data, folder_run):
    ref = pq.read_table(os.path.join(folder_run[0], EMBEDDINGS))
    ref_by_path = dict(zip(ref.column("path").to_pylist(),
                           ref.column("embedding").to_pylist(), strict=True))
    subset = data["names"][5:40:3]
    # list file in another folder: relative names need --images-root; one absolute path
    lst = data["root"] / "lists" / "some.txt"
    lst.parent.mkdir()
    absolute = str(data["images"] / subset[0])
    lst.write_text("\n".join([absolute, *reversed(subset[1:]), ""]) + "\n")
    out = str(data["root"] / "out-list")
    report = run_embed(EmbedSpec(input=str(lst), model=data["onnx"], output=out,
                                 images_root=str(data["images"]), chunk_size=4))
    emb, failed, _ = _read(out)
    expect = sorted([absolute, *subset[1:]])
    assert emb.column("path").to_pylist() == [p for p in expect if not p.startswith("corrupt/")]
    assert report["model_format"] == "onnx" and report["source_kind"] == "list"
    for path, vec in zip(emb.column("path").to_pylist(), emb.column("embedding").to_pylist(),
                         strict=True):
        key = os.path.relpath(path, data["images"]) if path.startswith("/") else path
        np.testing.assert_allclose(vec, ref_by_path[key], atol=1e-5)  # ONNX == TorchScript
    assert failed.num_rows == sum(p.startswith("corrupt/") for p in expect)

    # Parquet column of paths (relative to the Parquet file's folder), through the CLI
    table = pa.table({"file": [f"images/{n}" for n in data["names"][:20]],
                      "other": list(range(20))})
    pq.write_table(table, data["root"] / "paths.parquet")
    out = str(data["root"] / "out-parquet")
    code = run_verb("embed", ["--input", str(data["root"] / "paths.parquet"), "--path-column",
                              "file", "--model", data["pt"], "--output", out,
                              "--chunk-size", "8", "--batch-size", "3"])
    assert code == 0
    emb, failed, report = _read(out)
    assert report["images_root"] == str(data["root"]) and failed.num_rows == 3
    assert emb.column("path").to_pylist() == [f"images/{n}" for n in data["names"][:20]
                                              if not n.startswith("corrupt/")]
    np.testing.assert_allclose(
        np.asarray(emb.column("embedding").to_pylist()),
        np.asarray([ref_by_path[p[len("images/"):]] for p in emb.column("path").to_pylist()]),
        atol=1e-5)


def test_resume_reuses_good_parts_heals_damaged_ones_and_never_reuses_another_model(
        ray_local, data, folder_run):
    out = str(data["root"] / "out-resume")
    spec = EmbedSpec(input=str(data["images"]), model=data["other"], output=out, chunk_size=16,
                     commit=False)
    first = run_embed(spec)  # the changed model's parts
    assert first["committed"] is False and first["computed_chunks"] == 5
    assert not os.path.exists(os.path.join(out, SUCCESS))
    spec.model = data["onnx"]  # (ONNX here: its actors start faster than torch's)
    second = run_embed(spec)
    assert second["reused_chunks"] == 0  # another model's parts are never reused
    work = os.path.join(out, WORK_DIR)
    parts = sorted(f for f in os.listdir(work) if f.endswith(".parquet"))
    assert len(parts) == 5
    os.remove(os.path.join(work, parts[1]))  # a lost part
    with open(os.path.join(work, parts[3]), "r+b") as f:  # damaged, same size
        f.seek(os.path.getsize(f.name) // 2)
        byte = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    spec.commit = True
    final = run_embed(spec)  # reuses the three good parts, heals the lost and the damaged one
    assert (final["reused_chunks"], final["computed_chunks"]) == (3, 2) and final["committed"]
    assert final["computed_images"] == 32
    ref = pq.read_table(os.path.join(folder_run[0], EMBEDDINGS))
    got = pq.read_table(os.path.join(out, EMBEDDINGS))
    assert got.column("path").equals(ref.column("path"))
    np.testing.assert_allclose(np.asarray(got.column("embedding").to_pylist()),
                               np.asarray(ref.column("embedding").to_pylist()), atol=1e-5)
    assert pq.ParquetFile(os.path.join(out, EMBEDDINGS)).num_row_groups == 5
    assert not os.path.exists(work)


def test_cluster_job_recovers_the_identities_from_the_embeddings(ray_local, data, folder_run):
    from ltc_ray.io.output import read_clusters
    from ltc_ray.metrics.scores import pairwise_prf

    features = os.path.join(folder_run[0], EMBEDDINGS)
    out = str(data["root"] / "clusters")
    assert run_verb("cluster", ["--features", features, "--method", "knn-cc",
                                "--set", "knn.k=10", "--output", out]) == 0
    clusters = read_clusters(out).sort_by("sample_id")
    paths = pq.read_table(features, columns=["path"]).column("path").to_pylist()
    truth = identity_of(paths)
    assert (truth >= 0).all() and len(set(truth)) == N_ID
    _, _, f = pairwise_prf(truth, clusters.column("cluster_id").to_numpy())
    assert f > 0.9, f


@pytest.mark.parametrize("case", ["missing model", "no sidecar", "bad sidecar", "bad model",
                                  "empty folder", "missing input", "missing column",
                                  "unsupported input", "output inside input", "output file"])
def test_bad_inputs_fail_early_naming_the_file(tmp_path, data, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    kw = {"input": str(data["images"]), "model": data["pt"], "output": str(tmp_path / "o")}
    if case == "missing model":
        kw["model"] = where = str(tmp_path / "nope.pt")
    elif case == "no sidecar":
        (tmp_path / "lonely.pt").write_bytes(open(data["pt"], "rb").read())
        kw["model"] = where = str(tmp_path / "lonely.pt")
    elif case == "bad sidecar":
        (tmp_path / "bad.yaml").write_text("size: [32, 32]\nmean: [0.5, 0.5]\nstd: 0.25\n")
        kw["model_config"] = where = str(tmp_path / "bad.yaml")
    elif case == "bad model":
        (tmp_path / "junk.pt").write_bytes(b"not a model")
        (tmp_path / "junk.yaml").write_text(open(data["sidecar"]).read())
        kw["model"] = where = str(tmp_path / "junk.pt")
    elif case == "empty folder":
        kw["input"] = where = str(empty)
    elif case == "missing input":
        kw["input"] = where = str(tmp_path / "nothing")
    elif case == "missing column":
        pq.write_table(pa.table({"name": ["a.png"]}), tmp_path / "p.parquet")
        kw["input"] = where = str(tmp_path / "p.parquet")
    elif case == "unsupported input":
        (tmp_path / "x.csv").write_text("a.png\n")
        kw["input"] = where = str(tmp_path / "x.csv")
    elif case == "output inside input":
        kw["output"] = where = str(data["images"] / "out")
    else:
        (tmp_path / "file").write_text("")
        kw["output"] = where = str(tmp_path / "file")
    with pytest.raises(InputError) as err:
        run_embed(EmbedSpec(**kw))
    assert err.value.where == where, err.value
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_holding_a_users_files_is_refused_whatever_the_flags(tmp_path, data,
                                                                         overwrite):
    """A folder with a file the job does not write -- or with a report.json of the user's
    and no sign of an embedding run -- is refused before any work, and left as it was."""
    for name, text in (("thesis.tex", "mine"), ("report.json", "{}")):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text(text)
        with pytest.raises(InputError, match="did not write") as err:
            run_embed(EmbedSpec(input=str(data["images"]), model=data["pt"], output=str(out),
                                overwrite=overwrite))
        assert err.value.where == str(out)
        assert sorted(p.name for p in out.iterdir()) == [name]
        assert (out / name).read_text() == text


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path, data):
    """One writer per output: the embedding job takes <output>/_LOCK like the cluster job."""
    from ltc_ray.io.lock import OutputLock

    out = tmp_path / "o"
    with OutputLock(str(out), "other-run"):
        with pytest.raises(InputError, match="another job is writing") as err:
            run_embed(EmbedSpec(input=str(data["images"]), model=data["pt"], output=str(out)))
        assert err.value.where == str(out)
        assert sorted(p.name for p in out.iterdir()) == ["_LOCK"]


def test_decoding_resizes_crops_and_orders_channels():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16] = (255, 0, 0)  # red sides, blue middle
    img[:, 48:] = (255, 0, 0)
    img[:, 16:48] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    crop = decode_image(buf.getvalue(), Preprocess((16, 16), (0, 0, 0), (1, 1, 1)))
    inner = crop[:, 1:-1]  # the outermost columns blend in a little red (bilinear filter)
    assert crop.shape == (16, 16, 3) and (inner[..., 2] > 250).all() and (inner[..., 0] < 5).all()
    stretch = decode_image(buf.getvalue(), Preprocess((16, 16), (0, 0, 0), (1, 1, 1),
                                                      "stretch"))
    assert (stretch[:, 0, 0] > 250).all() and (stretch[:, 8, 2] > 250).all()
    bgr = decode_image(buf.getvalue(), Preprocess((16, 16), (0, 0, 0), (1, 1, 1), color="bgr"))
    np.testing.assert_array_equal(bgr, crop[..., ::-1])
    with pytest.raises(OSError):
        decode_image(buf.getvalue()[:40], Preprocess((16, 16), (0, 0, 0), (1, 1, 1)))


def test_embedding_job_on_s3_through_moto(ray_local, data):
    from conftest import require

    moto_server = require("moto.server")
    s3fs = require("s3fs")
    secret = "moto-embed-secret-Hq72Lp"
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"key": "testing", "secret": secret, "endpoint_url": f"http://{host}:{port}",
              "client_kwargs": {"region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **so)
        fs.call_s3("create_bucket", Bucket="emb")
        names = make_image_set("s3://emb/imgs", 3, 4, seed=3, corrupt=1, storage_options=so)
        write_tiny_model("s3://emb/m/tiny.onnx", "onnx", seed=1, storage_options=so)
        report = run_embed(EmbedSpec(input="s3://emb/imgs", model="s3://emb/m/tiny.onnx",
                                     output="s3://emb/out", chunk_size=8, storage_options=so))
        assert (report["n_listed"], report["n_embedded"], report["n_failed"]) == (13, 12, 1)
        assert report["images_root"] == "s3://emb/imgs"
        with fs.open("emb/out/embeddings.parquet", "rb") as f:
            emb = pq.read_table(f)
        assert emb.column("path").to_pylist() == [n for n in names if n.startswith("id_")]
        local = data["root"] / "from-s3"
        fs.get("emb/imgs/", f"{local}/", recursive=True)
        np.testing.assert_allclose(
            np.asarray(emb.column("embedding").to_pylist()),
            _direct_embeddings(data["pt"], local, emb.column("path").to_pylist()), atol=1e-5)
        listed = sorted(p[len("emb/out/"):] for p in fs.find("emb/out"))
        assert listed == [SUCCESS, EMBEDDINGS, FAILED, REPORT]  # _work removed
        assert all(secret.encode() not in fs.cat_file(p) for p in fs.find("emb/out"))
    finally:
        server.stop()


def test_a_chunk_fingerprint_changes_with_its_names_root_model_and_preprocessing(data):
    from dataclasses import replace

    from ltc_ray.embed import resolve_model
    from ltc_ray.embed.job import chunk_fingerprint

    model = resolve_model(data["pt"])
    names = data["names"][:8]
    base = chunk_fingerprint(names, "/imgs", model)
    assert base == chunk_fingerprint(list(names), "/imgs", resolve_model(data["pt"]))
    other_pre = replace(model, preprocess=replace(model.preprocess, color="bgr"))
    changed = [chunk_fingerprint(names[:7], "/imgs", model),
               chunk_fingerprint([*names[:7], "x.png"], "/imgs", model),
               chunk_fingerprint(names, "/other", model),
               chunk_fingerprint(names, "/imgs", resolve_model(data["onnx"])),
               chunk_fingerprint(names, "/imgs", other_pre)]
    assert len({base, *changed}) == 6
