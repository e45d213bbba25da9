"""Cluster configs: the AWS launcher YAML passes Ray's own validator offline, the KubeRay RayJobs are
well-formed, and image tags, Ray and Python versions agree with pyproject.toml and the Dockerfile."""

from __future__ import annotations

import copy
import re
import shlex
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

from schemas import SearchSpec, TrainSpec, parse_spec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
AWS_YAML = ROOT / "cluster" / "aws-spot.yaml"
KUBERAY_YAML = ROOT / "cluster" / "kuberay-rayjob.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_NAME = PYPROJECT["project"]["name"]  # lcsc-checkfree-ray
SPEC_MODELS = {"search": SearchSpec, "train": TrainSpec}


def _pinned_ray() -> str:
    """The exact Ray version pinned in pyproject's dependencies."""
    pins = [
        m.group(1)
        for d in PYPROJECT["project"]["dependencies"]
        if (m := re.match(r"ray(?:\[.*\])?==(\S+)", d))
    ]
    assert len(pins) == 1, f"expected one exact ray pin in pyproject.toml, got {pins}"
    return pins[0]


def _aws() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def _kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d]


def _image_tag(image: str) -> tuple[str, str]:
    """(repository path, tag) of an image reference; a pinned digest (`@sha256:...`) may follow the tag."""
    image, _, digest = image.partition("@")
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"bad digest in {image!r}"
    repo, _, tag = image.rpartition(":")
    assert repo and "/" not in tag, f"image {image!r} has no tag"
    return repo, tag


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (an AWS API call included) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _prepared_aws(config: dict) -> dict:
    """Ray's own offline preparation and validation (what `ray up` does before any cloud call)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- AWS cluster launcher -----------------------------------------------------------------------------


def test_aws_config_passes_ray_validator_offline(no_network):
    """cluster/aws-spot.yaml passes Ray's prepare_config + validate_config with the network blocked."""
    prepared = _prepared_aws(_aws())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # Global setup commands were merged into head and worker setup, as `ray up` would run them.
    assert prepared["worker_setup_commands"][: len(_aws()["setup_commands"])] == _aws()["setup_commands"]


@pytest.mark.parametrize(
    "mutate, error",
    [
        (
            lambda c: c["available_node_types"]["worker.cpu.spot"].update(min_worker=1),
            jsonschema.ValidationError,
        ),
        (
            lambda c: c["available_node_types"]["worker.cpu.spot"].update(resources={"spot": 0.5}),
            jsonschema.ValidationError,
        ),
        (lambda c: c.update(head_node_type="head"), ValueError),
        (lambda c: c["available_node_types"]["worker.gpu.spot"].update(min_workers=20), ValueError),
    ],
    ids=["typo-field", "fractional-resource", "unknown-head-type", "min-over-global-max"],
)
def test_ray_validator_rejects_broken_variants(no_network, mutate, error):
    """The validator is live: small breakages of our config are rejected."""
    config = _aws()
    mutate(config)
    with pytest.raises(error):
        _prepared_aws(config)


def _market_problems(config: dict) -> list[str]:
    """Why the config breaks 'head on-demand, every worker spot' (empty when it holds)."""
    problems = []
    for name, node_type in config["available_node_types"].items():
        market = node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
        is_head = name == config["head_node_type"]
        if is_head and market is not None:
            problems.append(f"head {name} uses market {market}")
        if not is_head and market != "spot":
            problems.append(f"worker {name} is not spot")
        if not is_head and node_type["resources"].get("spot") != 1:
            problems.append(f"worker {name} lacks the spot resource")
        if is_head and "spot" in node_type["resources"]:
            problems.append(f"head {name} advertises the spot resource")
    return problems


def test_aws_head_on_demand_and_workers_spot():
    """The head runs on-demand; every worker type is spot and advertises `spot: 1`."""
    config = _aws()
    assert _market_problems(config) == []
    kinds = {t["node_config"]["InstanceType"].split(".")[0] for t in config["available_node_types"].values()}
    assert any(k.startswith("g") for k in kinds), "a GPU worker type (g5/g6) is expected"
    broken = copy.deepcopy(config)
    broken["available_node_types"][config["head_node_type"]]["node_config"]["InstanceMarketOptions"] = {
        "MarketType": "spot"
    }
    assert _market_problems(broken) == [f"head {config['head_node_type']} uses market spot"]


def test_aws_worker_bounds_and_idle_timeout():
    """Each worker type sets 0 <= min <= max, all fit under the global max, and idle nodes are reaped."""
    config = _aws()
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert len(workers) >= 2
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert 1 <= config["idle_timeout_minutes"] <= 30
    # One-time spot instances cannot be stopped, so stopped-node caching must be off.
    assert config["provider"]["cache_stopped_nodes"] is False


def test_aws_image_tags_match_project_version():
    """CPU and GPU images are <registry>/lcsc-checkfree-ray at pyproject's version (GPU with -gpu)."""
    docker = _aws()["docker"]
    repo, tag = _image_tag(docker["image"])
    assert repo.endswith("/" + IMAGE_NAME) and tag == VERSION
    gpu_images = [
        t["docker"]["worker_image"] for t in _aws()["available_node_types"].values() if "docker" in t
    ]
    assert gpu_images, "the GPU worker type must name the GPU image variant"
    for image in gpu_images:
        assert _image_tag(image) == (repo, f"{VERSION}-gpu")


def test_aws_s3_environment_without_keys():
    """Region and bucket URI reach every container; credentials come only from instance profiles."""
    config = _aws()
    text = AWS_YAML.read_text()
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|AKIA[0-9A-Z]{16}", text)
    env = dict(
        opt.split(None, 1)[1].split("=", 1)
        for opt in config["docker"]["run_options"]
        if opt.startswith("--env ")
    )
    assert env["AWS_DEFAULT_REGION"] == config["provider"]["region"]
    assert env["LCSC_S3_URI"].startswith("s3://")
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} has no instance profile"


def test_aws_setup_checks_the_pinned_ray():
    """The setup command asserts the Ray version pinned in pyproject and imports every package."""
    setup = " ".join(_aws()["setup_commands"])
    assert f"'{_pinned_ray()}'" in setup
    for package in ("lcsc_ray", "checkfree_ray", "rayops", "schemas"):
        assert package in setup


# --- Dockerfile -----------------------------------------------------------------------------------------


def _dockerfile_base() -> str:
    """The FROM image with ARG defaults substituted."""
    args, base = {}, None
    for line in DOCKERFILE.read_text().splitlines():
        if m := re.match(r"ARG (\w+)=(\S+)", line):
            args.setdefault(m.group(1), m.group(2))
        elif line.startswith("FROM "):
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
            break
    assert base, "Dockerfile has no FROM line"
    return base


def test_dockerfile_base_matches_pinned_ray_and_python_311():
    """FROM rayproject/ray:<pinned ray>-py311-cpu; every Ray version named in the Dockerfile is the pin."""
    ray_version = _pinned_ray()
    assert _dockerfile_base() == f"rayproject/ray:{ray_version}-py311-cpu"
    text = DOCKERFILE.read_text()
    named = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)|ray\.__version__ == '(\d+\.\d+\.\d+)'", text)
    assert {v for pair in named for v in pair if v} == {ray_version}
    assert len(named) >= 2, "the build should also check the installed Ray version"
    assert re.search(r">=\s*3\.(10|11)", PYPROJECT["project"]["requires-python"])


def test_dockerfile_installs_every_package_and_the_pinned_torch():
    """The image copies each package pyproject installs, installs the project, and pins torch as the Makefile."""
    text = DOCKERFILE.read_text()
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY .*\b{package}\b", text, re.MULTILINE), (
            f"{package} is not copied into the image"
        )
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text), "the project itself is not installed"
    makefile_torch = re.search(r"TORCH_PIN \?= (torch==\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f'"{makefile_torch}"' in text


# --- KubeRay --------------------------------------------------------------------------------------------


def _rayjobs() -> list[dict]:
    return [d for d in _kuberay_docs() if d["kind"] == "RayJob"]


def _pod_specs(job: dict) -> list[tuple[str, dict]]:
    cluster = job["spec"]["rayClusterSpec"]
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return pods


def _job_spec(job: dict) -> tuple[str, str, dict]:
    """(module, subcommand, spec mapping) of a RayJob, the spec read from the ConfigMap mounted on the head."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and len(argv) == 5, argv
    module, command, spec_path = argv[2:]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    maps = {v["name"]: v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
    folder, _, filename = spec_path.rpartition("/")
    (volume,) = [name for name, path in mounts.items() if path == folder and name in maps]
    (config_map,) = [
        d for d in _kuberay_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == maps[volume]
    ]
    return module, command, yaml.safe_load(config_map["data"][filename])


def test_kuberay_documents_and_versions():
    """Two RayJobs (ray.io/v1) with their ConfigMaps; rayVersion is the pinned Ray; cleanup is on."""
    docs = _kuberay_docs()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount", *["ConfigMap", "RayJob", "NetworkPolicy", "PodDisruptionBudget"] * 2]
    )
    for job in _rayjobs():
        assert job["apiVersion"] == "ray.io/v1"
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == _pinned_ray()


def test_kuberay_entrypoints_are_project_modules_with_valid_specs():
    """Each entrypoint runs a project package's __main__ on a mounted spec of the matching kind."""
    scripts = {target.split(".")[0] for target in PYPROJECT["project"]["scripts"].values()}
    seen = set()
    for job in _rayjobs():
        module, command, data = _job_spec(job)
        assert module in scripts and (ROOT / module / "__main__.py").is_file(), module
        assert command == data["kind"], f"{module} {command} is given a {data['kind']!r} spec"
        spec = parse_spec(data, SPEC_MODELS[command], source=f"{KUBERAY_YAML.name}:{job['metadata']['name']}")
        assert spec.output.uri.startswith("s3://")
        seen.add(module)
    assert seen == {"lcsc_ray", "checkfree_ray"}


def test_kuberay_specs_fit_the_worker_pods():
    """Evaluator actors and pipeline stages each fit in one spot worker pod's CPUs."""
    for job in _rayjobs():
        _, command, data = _job_spec(job)
        spec = parse_spec(data, SPEC_MODELS[command])
        group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        pod_cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        if command == "search":
            per_actor, actors = spec.evaluators.num_cpus, spec.evaluators.num_actors
        else:
            per_actor, actors = spec.pipeline.num_cpus_per_stage, spec.pipeline.num_stages
        assert per_actor <= pod_cpus
        assert actors <= group["maxReplicas"] * int(pod_cpus // per_actor)


def test_kuberay_images_match_project_version():
    """Every container image is <registry>/lcsc-checkfree-ray:<pyproject version>."""
    for job in _rayjobs():
        for group, pod in _pod_specs(job):
            for container in pod["containers"]:
                repo, tag = _image_tag(container["image"])
                assert repo.endswith("/" + IMAGE_NAME) and tag == VERSION, (group, container["image"])


def test_kuberay_head_on_demand_workers_spot():
    """Head pods select on-demand capacity; worker groups select and tolerate spot, within their bounds."""
    for job in _rayjobs():
        for group, pod in _pod_specs(job):
            capacity = pod["nodeSelector"]["karpenter.sh/capacity-type"]
            assert capacity == ("on-demand" if group == "head" else "spot"), group
            if group != "head":
                assert any(t.get("value") == "spot" for t in pod["tolerations"]), group
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert '\\"spot\\": 1' in group["rayStartParams"]["resources"]
