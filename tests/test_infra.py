"""infra/: the deploy files parse and follow their schemas. They agree with
pyproject.toml and with the job's CLI, and they hold no secrets.

Nothing here starts Ray, Docker or a cloud call. Ray's own launcher validation,
``ray job submit`` option parser and runtime_env packaging rules are used where Ray
ships them, so these checks match what ``ray up`` / ``ray job submit`` would do.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from ltc_ray.cli import cluster_parser
from ltc_ray.io.layout import BENCHMARK_PARTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHER = INFRA / "ray-cluster.yaml"
RAYJOB = INFRA / "rayjob.yaml"
RAYCLUSTER = INFRA / "raycluster.yaml"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
DOCKERFILE = INFRA / "Dockerfile"
KUBE_MANIFESTS = [RAYJOB, RAYCLUSTER]
OBJECT_STORE_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6e?|gr6|p3dn|p3|p4de?|p5e?n?|p6[-\w]*)\.")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def ray_pin(pyproject) -> str:
    pins = [re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", d.replace(" ", ""))
            for d in pyproject["project"]["dependencies"]]
    pins = [m.group(2) for m in pins if m]
    assert len(pins) == 1, "pyproject.toml should pin ray exactly once (ray[...]==X.Y.Z)"
    return pins[0]


def _extras_in(text: str) -> list[set[str]]:
    """Extras of every ``pip install [-e] '.[a,b]'`` in ``text``."""
    found = re.findall(r"pip install\b[^\n]*?['\"]?\.\[([^\]]*)\]", text)
    return [{e.strip() for e in group.split(",")} for group in found]


# ------------------------------------------------------------------ every file
def test_infra_has_the_expected_files():
    for path in [LAUNCHER, RAYJOB, RAYCLUSTER, RUNTIME_ENV, DOCKERFILE, INFRA / "README.md"]:
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", sorted([*INFRA.glob("*.yaml"), *INFRA.glob("*.yml")]),
                         ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: no mapping document"


# ------------------------------------------------------------------ cluster launcher
def test_launcher_yaml_follows_ray_launcher_schema():
    """The same checks ``ray up`` makes before it touches AWS: fill in the provider
    defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(LAUNCHER)
    required = {"cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"}
    assert not required - cfg.keys(), f"missing top-level keys: {sorted(required - cfg.keys())}"
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_launcher_has_cpu_head_and_gpu_workers():
    cfg = _load(LAUNCHER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node type should be CPU-only"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type advertises GPU resources"
    for name, t in gpu_types.items():
        assert name != cfg["head_node_type"]
        assert GPU_INSTANCE.match(t["node_config"]["InstanceType"]), (
            f"{name}: {t['node_config']['InstanceType']} is not a GPU instance type")
        # The kNN stage plans from the GPUs present at job start: keep some up.
        assert t.get("min_workers", 0) >= 1, f"{name}: min_workers 0 means a CPU-only plan"
        assert t.get("max_workers", cfg["max_workers"]) >= t["min_workers"]


def test_launcher_installs_the_project_and_runs_the_pinned_ray(pyproject, ray_pin):
    cfg = _load(LAUNCHER)
    setup = "\n".join(cfg["setup_commands"])
    extras = _extras_in(setup)
    assert extras, "setup_commands do not pip install the project"
    assert any({"gpu", "s3"} <= e for e in extras)
    for e in extras:
        assert e <= pyproject["project"]["optional-dependencies"].keys(), f"unknown extras {e}"
    assert "~/ltc-ray" in cfg["file_mounts"] and cfg["file_mounts"]["~/ltc-ray"] == "."
    image = cfg["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray_pin}-"), f"{image} is not Ray {ray_pin}"


def test_launcher_enables_token_auth_on_every_node():
    cfg = _load(LAUNCHER)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    # ray start never makes a token: it must reach every node from the client.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# ------------------------------------------------------------------ KubeRay manifests
def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_containers(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec.get("workerGroupSpecs", []):
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return out


def _all_containers(doc: dict) -> list[tuple[str, dict]]:
    out = _ray_containers(doc)
    submitter = doc["spec"].get("submitterPodTemplate")
    if submitter:
        out += [("submitter", c) for c in submitter["spec"]["containers"]]
    return out


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayjob_is_a_v1_rayjob_with_shutdown():
    doc = _load(RAYJOB)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "rayClusterSpec" in spec
    # runtimeEnvYAML is a YAML string holding no secrets.
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert isinstance(runtime_env, dict)
    _assert_no_secret_env_vars(runtime_env.get("env_vars", {}), "rayjob runtimeEnvYAML")


def test_raycluster_is_a_v1_raycluster():
    doc = _load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"


@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_cluster_has_a_gpu_worker_group(path, ray_pin):
    doc = _load(path)
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray_pin
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert all(isinstance(v, str) for v in head_params.values()), "rayStartParams are strings"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams are strings"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if gpus:
            gpu_groups.append(group["groupName"])
            assert params.get("num-gpus") == str(gpus), (
                f"{group['groupName']}: num-gpus should match nvidia.com/gpu={gpus}")
            assert group["minReplicas"] >= 1, "the kNN stage plans from GPUs present at start"
    assert gpu_groups, f"{path.name}: no worker group requests nvidia.com/gpu"


@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_pods_share_one_image_and_the_dockerfile_workdir(path):
    doc = _load(path)
    images = {c["image"] for _, c in _all_containers(doc)}
    assert len(images) == 1, f"{path.name}: every Ray pod needs the same image, got {images}"
    workdir = _dockerfile_workdir()
    for role, c in _ray_containers(doc):
        # `python jobs/cluster.py` is resolved against the head's working directory.
        assert c.get("workingDir") == workdir, f"{path.name} {role}: workingDir != {workdir}"


@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_token_auth_and_credentials_come_from_secrets(path):
    doc = _load(path)
    for role, c in _all_containers(doc):
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{role}: RAY_AUTH_MODE"
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), (
            f"{role}: RAY_AUTH_TOKEN must come from a Secret")
    for role, c in _ray_containers(doc):
        env = _env(c)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in env, f"{role}: no {name}"
            assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{role}: {name} literal"
        for name, entry in env.items():
            if _SECRET_NAME.search(name):
                assert "value" not in entry, f"{role}: {name} has a literal value"


# ------------------------------------------------------------------ job commands
def _entrypoint_args(command: str, where: str) -> list[str]:
    """The arguments after ``jobs/cluster.py`` in ``command``. A ``ray job submit``
    prefix is parsed with Ray's own CLI definition."""
    argv = shlex.split(command)
    if argv[:3] == ["ray", "job", "submit"]:
        from ray.dashboard.modules.job.cli import submit

        ctx = submit.make_context("submit", argv[3:])
        params = ctx.params
        if params["runtime_env"]:
            assert (ROOT / params["runtime_env"]).is_file(), f"{where}: no {params['runtime_env']}"
        if params["working_dir"]:
            assert params["working_dir"] == ".", f"{where}: working_dir should be the repo root"
        argv = list(params["entrypoint"])
    assert len(argv) >= 2 and argv[0] in ("python", "python3") and argv[1] == "jobs/cluster.py", (
        f"{where}: not `python jobs/cluster.py ...`: {command!r}")
    assert (ROOT / argv[1]).is_file()
    return argv[2:]


def _check_cluster_args(args: list[str], where: str) -> None:
    ns = cluster_parser().parse_args(args)  # raises InputError on bad flags
    assert (ns.part is None) != (ns.features is None), f"{where}: give --part or --features"
    if ns.part is not None:
        assert ns.part in BENCHMARK_PARTS, f"{where}: no benchmark part {ns.part}"
        inputs = ns.data_root
    else:
        inputs = ns.features
    # A cluster's disks are not where the data lives or where results should stay.
    assert urlparse(inputs).scheme in OBJECT_STORE_SCHEMES, f"{where}: input {inputs} is local"
    assert ns.output and urlparse(ns.output).scheme in OBJECT_STORE_SCHEMES, (
        f"{where}: --output must be an object-store URI, got {ns.output}")
    if ns.storage_options:
        assert isinstance(json.loads(ns.storage_options), dict)
    if ns.config:
        assert (ROOT / ns.config).is_file(), f"{where}: no config {ns.config}"


def _structured_commands() -> list[tuple[str, str]]:
    out = [("rayjob.yaml spec.entrypoint", _load(RAYJOB)["spec"]["entrypoint"])]
    annotations = _load(RAYCLUSTER)["metadata"].get("annotations", {})
    out += [(f"raycluster.yaml annotation {k}", v) for k, v in annotations.items()
            if "jobs/cluster.py" in v]
    for i, cmd in enumerate(_load(LAUNCHER)["metadata"]["ltc_ray"]["job_submit"]):
        out.append((f"ray-cluster.yaml metadata.ltc_ray.job_submit[{i}]", cmd))
    return out


_COMMAND_START = re.compile(r"^(ray job submit|python3? jobs/cluster\.py)\b")


def _commands_in_docs() -> list[tuple[str, str]]:
    """Command lines that mention jobs/cluster.py in infra/'s comments (YAML,
    Dockerfile) and in README code blocks, with backslash continuations joined.
    Prose that mentions the script is not a command line and is skipped."""
    out = []
    for path in sorted(INFRA.iterdir()):
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".md":
            blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
            lines = "\n".join(blocks).splitlines()
        else:
            lines = [ln.strip()[1:] for ln in text.splitlines() if ln.strip().startswith("#")]
        logical, buf = [], ""
        for line in (ln.strip() for ln in lines):
            if line.endswith("\\"):
                buf += line[:-1] + " "
            else:
                logical.append(buf + line)
                buf = ""
        out += [(path.name, ln) for ln in logical
                if "jobs/cluster.py" in ln and _COMMAND_START.match(ln)]
    return out


def test_every_documented_job_command_is_accepted_by_the_cli():
    structured = _structured_commands()
    documented = _commands_in_docs()
    assert len(structured) >= 4, structured
    assert {"README.md", "ray-cluster.yaml"} <= {where for where, _ in documented}
    for where, command in structured + documented:
        _check_cluster_args(_entrypoint_args(command, where), where)


def test_command_checks_reject_bad_commands():
    """The checks above have teeth: a typo'd flag, a local output or a missing
    script all fail."""
    from ltc_ray.errors import InputError

    with pytest.raises(InputError):
        _check_cluster_args(["--part", "9", "--data-rot", "s3://b/x", "--output", "s3://b/y"], "t")
    with pytest.raises(AssertionError):
        _check_cluster_args(["--part", "9", "--data-root", "s3://b/x", "--output", "runs/x"], "t")
    with pytest.raises(AssertionError):
        _check_cluster_args(["--part", "4", "--data-root", "s3://b/x", "--output", "s3://b/y"], "t")
    with pytest.raises(AssertionError):
        _entrypoint_args("ray job submit -- python jobs/clusters.py --part 9", "t")


# ------------------------------------------------------------------ runtime_env
def test_runtime_env_is_valid_and_secret_free():
    from ray.runtime_env import RuntimeEnv

    env = _load(RUNTIME_ENV)
    unknown = env.keys() - RuntimeEnv.known_fields
    assert not unknown, f"runtime_env fields Ray does not know: {sorted(unknown)}"
    RuntimeEnv(**env)  # type-checks env_vars (str -> str), excludes, working_dir
    assert env["working_dir"] == "."
    _assert_no_secret_env_vars(env.get("env_vars", {}), "runtime_env.yaml")


def test_runtime_env_excludes_keep_data_out_of_the_upload(tmp_path):
    """Ray's own packaging walk over a mock checkout: code goes up, data does not."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files = ["pyproject.toml", "jobs/cluster.py", "ltc_ray/cli.py", "ltc_ray/io/layout.py",
             "configs/ms1m.yaml", "infra/runtime_env.yaml",
             "data/features/part9_test.bin", "data/labels/part9_test.meta",
             "knns/part9_test/faiss_k_80.npz", "runs/part9/clusters/part-0.parquet",
             ".venv/bin/python", ".git/HEAD", "scratch/feat.bin"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    uploaded = []
    _dir_travel(tmp_path, [_get_excludes(tmp_path, _load(RUNTIME_ENV)["excludes"])],
                lambda p: p.is_file() and uploaded.append(p.relative_to(tmp_path).as_posix()),
                include_gitignore=False)
    assert sorted(uploaded) == sorted(["pyproject.toml", "jobs/cluster.py", "ltc_ray/cli.py",
                                       "ltc_ray/io/layout.py", "configs/ms1m.yaml",
                                       "infra/runtime_env.yaml"])


# ------------------------------------------------------------------ Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _dockerfile_workdir() -> str:
    return [rest for op, rest in _dockerfile_instructions() if op == "WORKDIR"][-1]


def test_dockerfile_uses_the_pinned_ray_image(pyproject, ray_pin):
    froms = [rest for op, rest in _dockerfile_instructions() if op == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"(?:--platform=\S+\s+)?rayproject/ray:([\w.]+)-py3(\d+)(-\w+)?", froms[0])
    assert m, f"FROM should be an official rayproject/ray image: {froms[0]}"
    assert m.group(1) == ray_pin, f"image Ray {m.group(1)} != pyproject pin {ray_pin}"
    assert m.group(3) and ("gpu" in m.group(3) or m.group(3).startswith("-cu")), "not a GPU image"
    need = re.search(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
    assert int(m.group(2)) >= int(need.group(1)), "image Python is older than requires-python"


def test_dockerfile_installs_the_project_as_non_root(pyproject):
    ops = _dockerfile_instructions()
    runs = "\n".join(rest for op, rest in ops if op == "RUN")
    extras = _extras_in(runs)
    assert any({"gpu", "s3"} <= e for e in extras), "Dockerfile does not pip install '.[gpu,s3]'"
    for e in extras:
        assert e <= pyproject["project"]["optional-dependencies"].keys(), f"unknown extras {e}"
    copied = " ".join(rest for op, rest in ops if op == "COPY")
    assert "pyproject.toml" in copied and "ltc_ray" in copied
    users = [rest for op, rest in ops if op == "USER"]
    assert not users or users[-1].split(":")[0] not in ("root", "0"), "runs as root"
    assert _dockerfile_workdir().startswith("/")
    for op, rest in ops:
        if op in ("ENV", "ARG"):
            assert not _SECRET_NAME.search(rest), f"Dockerfile {op} looks like a secret: {rest}"


def test_dockerignore_keeps_data_out_of_the_build_context():
    ignore = INFRA / "Dockerfile.dockerignore"
    lines = [ln.strip() for ln in ignore.read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "*", "expected an allow-list (first pattern `*`)"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "ltc_ray", "jobs"} <= allowed
    assert not allowed & {"data", "runs", ".venv", ".git"}


# ------------------------------------------------------------------ secrets
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|API_KEY",
                          re.IGNORECASE)
_SECRET_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|API_KEY)"
    r"[A-Za-z_]*)[ \t]*[=:][ \t]*(?P<value>[^\s,}#]+)", re.IGNORECASE)
_KEY_MATERIAL = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),          # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),           # GitHub token
]


def _is_placeholder(value: str) -> bool:
    v = value.strip("'\"`")
    return (not v or v.startswith(("$", "<", "{", "~", "/")) or set(v) <= {"."}
            or v.lower() in {"true", "false", "null", "none", "token"})


def find_secrets(text: str) -> list[str]:
    """Literal credentials in ``text``: secret-named keys/variables assigned a
    literal value (not ``$VAR``, ``$(...)``, ``<...>``, ``...``, a path or a
    ``secretKeyRef``), and raw key material."""
    hits = [m.group(0) for m in _SECRET_ASSIGNMENT.finditer(text)
            if not _is_placeholder(m.group("value"))]
    for pattern in _KEY_MATERIAL:
        hits += pattern.findall(text)
    return hits


def _assert_no_secret_env_vars(env_vars: dict, where: str) -> None:
    bad = [k for k in env_vars if _SECRET_NAME.search(k)]
    assert not bad, f"{where}: secrets in env_vars ({bad}); the jobs API echoes them back"


def test_secret_finder_catches_literals_and_spares_references():
    assert find_secrets("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert find_secrets('  - name: X\n    AWS_SECRET_ACCESS_KEY: "abc123"')
    assert find_secrets("env_vars:\n  RAY_AUTH_TOKEN: 0123456789abcdef")
    assert find_secrets("aws_access_key_id = AKIAIOSFODNN7EXAMPLE")
    assert not find_secrets("--from-literal=AWS_SECRET_ACCESS_KEY=...")
    assert not find_secrets('export RAY_AUTH_TOKEN="$(kubectl get secret x)"')
    assert not find_secrets("secretKeyRef: {name: ltc-ray-aws, key: AWS_SECRET_ACCESS_KEY}")
    assert not find_secrets("- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:\n    secretKeyRef:")


@pytest.mark.parametrize("path", sorted(p for p in INFRA.iterdir() if p.is_file()),
                         ids=lambda p: p.name)
def test_no_literal_secrets_in_infra(path):
    hits = find_secrets(path.read_text())
    assert not hits, f"{path.name}: literal secrets {hits}"
