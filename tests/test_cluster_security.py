"""Cluster configs a security review passes, checked offline: Ray token auth, the AWS security group against
the ports `ray start` uses, least-privilege IAM documents, encrypted disks, IRSA, the KubeRay NetworkPolicy,
the head's protection from consolidation, the preemption drain, and the image's pinned dependencies."""

from __future__ import annotations

import copy
import json
import re

from tests.test_cluster_configs import (
    AWS_YAML,
    DOCKERFILE,
    IMAGE_NAME,
    PYPROJECT,
    ROOT,
    VERSION,
    _aws,
    _kuberay_docs,
    _pinned_ray,
    _pod_specs,
    _prepared_aws,
    _rayjobs,
)

# --- Security: Ray token auth, network, IAM, disks (AWS) ----------------------------------------------------

IAM = ROOT / "cluster" / "iam"
CONSTRAINTS = ROOT / "cluster" / "constraints.txt"
WORLD = {"0.0.0.0/0", "::/0"}


def _iam(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def _run_options_env(config: dict) -> tuple[dict[str, str], list[str]]:
    """(--env NAME=VALUE pairs, --env-file paths) of the docker run options."""
    env, files = {}, []
    for option in config["docker"]["run_options"]:
        flag, _, value = option.partition(" ")
        if flag == "--env":
            name, _, val = value.partition("=")
            env[name] = val
        elif flag == "--env-file":
            files.append(value)
    return env, files


def test_aws_token_auth_on_every_node_from_ssm():
    """RAY_AUTH_MODE=token on every container; RAY_AUTH_TOKEN comes from an owner-only env file written from the
    SSM SecureString parameter that the node policy, and nothing else, lets nodes read; no token in the YAML."""
    config = _aws()
    env, files = _run_options_env(config)
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
    (env_file,) = files
    (writer,) = [c for c in config["initialization_commands"] if env_file in c]
    assert "umask 077" in writer and "--with-decryption" in writer and "RAY_AUTH_TOKEN=%s" in writer
    parameter = re.search(r"--name (\S+)", writer).group(1)
    (statement,) = [s for s in _iam("node-policy.json")["Statement"] if "ssm:GetParameter" in s["Action"]]
    assert statement["Resource"].endswith(f":parameter{parameter}")
    assert not re.search(r"RAY_AUTH_MODE\W+disabled", AWS_YAML.read_text())


def _ray_ports(config: dict) -> set[int]:
    """Every TCP port the head and worker `ray start` commands listen on (worker port range included)."""
    text = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    ports = {int(p) for p in re.findall(r"--(?:[a-z-]+-)?port=(\d+)", text)}
    low, high = (int(re.search(rf"--{end}-worker-port=(\d+)", text).group(1)) for end in ("min", "max"))
    return ports | set(range(low, high + 1)) | {22}


def _security_group_problems(config: dict, group: dict) -> list[str]:
    """Why the security group is not 'Ray's ports inside the group, SSH from a named network' (empty if it is)."""
    problems, group_ids = [], set()
    for name, node_type in config["available_node_types"].items():
        ids = node_type["node_config"].get("SecurityGroupIds")
        if not ids:
            problems.append(f"{name} has no SecurityGroupIds (Ray would open SSH to the world)")
        group_ids.update(ids or [])
    covered = set()
    for rule in group["IpPermissions"]:
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        if rule["IpProtocol"] != "tcp":
            problems.append(f"rule {rule['FromPort']}-{rule['ToPort']} is not tcp-only")
        sources = {pair["GroupId"] for pair in rule.get("UserIdGroupPairs", [])}
        if sources - group_ids:
            problems.append(
                f"ports {rule['FromPort']}-{rule['ToPort']} open to another group {sources - group_ids}"
            )
        cidrs = {r["CidrIp"] for r in rule.get("IpRanges", [])} | {
            r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])
        }
        if cidrs and ports != {22}:
            problems.append(f"ports {rule['FromPort']}-{rule['ToPort']} open to addresses {sorted(cidrs)}")
        if cidrs & WORLD:
            problems.append(f"ports {rule['FromPort']}-{rule['ToPort']} open to the world")
        covered |= ports if sources else set()
    missing = _ray_ports(config) - covered
    if missing:
        problems.append(f"Ray ports not open inside the group: {sorted(missing)[:5]}")
    return problems


def test_aws_security_group_opens_only_rays_ports_inside_the_group():
    """Every node type is in the shipped group; it opens exactly Ray's fixed ports to itself, SSH to a named CIDR."""
    config, group = _aws(), _iam("security-group.json")
    assert _security_group_problems(config, group) == []
    ssh = [r for r in group["IpPermissions"] if r["FromPort"] == 22]
    assert ssh and all(r.get("IpRanges") for r in ssh)
    broken = copy.deepcopy(group)
    broken["IpPermissions"][1]["IpRanges"] = [{"CidrIp": "0.0.0.0/0"}]
    assert "ports 6379-6379 open to the world" in _security_group_problems(config, broken)
    unfixed = copy.deepcopy(config)
    unfixed["worker_start_ray_commands"][-1] += " --ray-client-server-port=24000"
    assert any("24000" in p for p in _security_group_problems(unfixed, group))
    no_group = copy.deepcopy(config)
    del no_group["available_node_types"]["worker.gpu.spot"]["node_config"]["SecurityGroupIds"]
    assert any(
        p.startswith("worker.gpu.spot has no SecurityGroupIds")
        for p in _security_group_problems(no_group, group)
    )


def test_aws_every_volume_is_encrypted():
    """Every EBS volume of every node type is encrypted."""
    for name, node_type in _aws()["available_node_types"].items():
        mappings = node_type["node_config"]["BlockDeviceMappings"]
        assert mappings and all(m["Ebs"]["Encrypted"] is True for m in mappings), name


def _statements() -> dict[str, list[dict]]:
    return {path.name: json.loads(path.read_text())["Statement"] for path in IAM.glob("*-policy.json")}


def test_iam_policies_are_least_privilege():
    """No wildcard actions; S3 only on the run bucket's prefix (LCSC_S3_URI); ECR only on the project's
    repository; the head terminates only this cluster's nodes and passes only the workers' role."""
    config = _aws()
    for name, statements in _statements().items():
        assert json.loads((IAM / name).read_text())["Version"] == "2012-10-17", name
        for statement in statements:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert statement["Effect"] == "Allow" and not any(
                a == "*" or a.endswith(":*") for a in actions
            ), name
    env, _ = _run_options_env(config)
    bucket, _, prefix = env["LCSC_S3_URI"].removeprefix("s3://").partition("/")
    s3 = _statements()["s3-runs-policy.json"]
    resources = {s["Resource"] for s in s3}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{prefix}/*"}
    (listing,) = [s for s in s3 if s["Action"] == ["s3:ListBucket"]]
    assert set(listing["Condition"]["StringLike"]["s3:prefix"]) == {prefix, f"{prefix}/*"}
    (pull,) = [s for s in _statements()["node-policy.json"] if "ecr:BatchGetImage" in s["Action"]]
    assert pull["Resource"].endswith(f":repository/{IMAGE_NAME}")
    assert f":{config['provider']['region']}:" in pull["Resource"]
    head = {s["Sid"]: s for s in _statements()["head-autoscaler-policy.json"]}
    terminate = head["TerminateOnlyThisClustersNodes"]["Condition"]["StringEquals"]
    assert terminate == {"ec2:ResourceTag/ray-cluster-name": config["cluster_name"]}
    worker_profile = config["available_node_types"]["worker.cpu.spot"]["node_config"]["IamInstanceProfile"][
        "Arn"
    ]
    assert head["PassOnlyTheWorkerRole"]["Resource"].rsplit("/", 1)[1] == worker_profile.rsplit("/", 1)[1]
    assert _iam("ec2-trust-policy.json")["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


# --- Security: KubeRay --------------------------------------------------------------------------------------


def _docs_of(kind: str) -> list[dict]:
    return [d for d in _kuberay_docs() if d["kind"] == kind]


def _labels(job: dict, group: str) -> dict[str, str]:
    """The labels KubeRay's pods of `group` carry: the template's, plus ray.io/node-type."""
    cluster = job["spec"]["rayClusterSpec"]
    template = (
        cluster["headGroupSpec"]["template"]
        if group == "head"
        else next(g["template"] for g in cluster["workerGroupSpecs"] if g["groupName"] == group)
    )
    return {
        **template.get("metadata", {}).get("labels", {}),
        "ray.io/node-type": "head" if group == "head" else "worker",
    }


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_kuberay_token_auth_on():
    """Every RayJob's cluster runs Ray token authentication; no container turns it off."""
    for job in _rayjobs():
        assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
        for _, pod in _pod_specs(job):
            for container in pod["containers"]:
                assert not [e for e in container.get("env", []) if e["name"].startswith("RAY_AUTH")]


def test_kuberay_s3_through_irsa_without_static_keys():
    """Head and workers use the IRSA service account; no container reads AWS keys from a Secret or inline."""
    (account,) = _docs_of("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for job in _rayjobs():
        assert "serviceAccountName" not in job["spec"]["submitterPodTemplate"]["spec"]  # needs no S3
        for group, pod in _pod_specs(job):
            assert pod["serviceAccountName"] == account["metadata"]["name"], group
            for container in pod["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
                assert "envFrom" not in container and "AWS_DEFAULT_REGION" in names, group
    trust = _iam("kuberay-irsa-trust-policy.json")["Statement"][0]["Condition"]["StringEquals"]
    subject = f"system:serviceaccount:default:{account['metadata']['name']}"
    assert subject in trust.values()


def _network_problems(job: dict, policies: list[dict]) -> list[str]:
    """Why the job's head is reachable by pods other than the job's own (empty when it is not)."""
    job_label = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    head = _labels(job, "head")
    covering = [p for p in policies if _selects(p["spec"]["podSelector"], head)]
    if not covering:
        return ["no NetworkPolicy selects the head"]
    problems = []
    for policy in covering:
        if "Ingress" not in policy["spec"]["policyTypes"]:
            problems.append(f"{policy['metadata']['name']} does not restrict ingress")
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from") or [{}]
            for peer in peers:
                same_job = (
                    "namespaceSelector" not in peer
                    and peer.get("podSelector", {}).get("matchLabels") == job_label
                )
                operator_only = (
                    "namespaceSelector" in peer
                    and rule.get("ports") == [{"protocol": "TCP", "port": 8265}]
                    and peer.get("podSelector")
                )
                if not (same_job or operator_only):
                    problems.append(f"{policy['metadata']['name']} admits {peer or 'everyone'}")
    for group, _ in _pod_specs(job):
        if not _selects({"matchLabels": job_label}, _labels(job, group)):
            problems.append(f"{group} pods lack the job label, so they cannot reach the head")
    if not _selects({"matchLabels": job_label}, job["spec"]["submitterPodTemplate"]["metadata"]["labels"]):
        problems.append("the submitter lacks the job label")
    return problems


def test_kuberay_network_policy_lets_only_the_jobs_pods_reach_the_head():
    """A NetworkPolicy selects each head; it admits that job's pods, and the operator on 8265 only."""
    policies = _docs_of("NetworkPolicy")
    for job in _rayjobs():
        assert _network_problems(job, policies) == [], job["metadata"]["name"]
    job = _rayjobs()[0]
    opened = copy.deepcopy(policies)
    for policy in opened:
        policy["spec"]["ingress"].append({})
    assert any("admits everyone" in p for p in _network_problems(job, opened))
    assert _network_problems(job, []) == ["no NetworkPolicy selects the head"]


def test_kuberay_head_protected_from_consolidation():
    """The head carries karpenter.sh/do-not-disrupt and a PodDisruptionBudget allows no head eviction;
    spot workers stay disruptable."""
    budgets = _docs_of("PodDisruptionBudget")
    for job in _rayjobs():
        cluster = job["spec"]["rayClusterSpec"]
        assert (
            cluster["headGroupSpec"]["template"]["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"]
            == "true"
        )
        head_budgets = [b for b in budgets if _selects(b["spec"]["selector"], _labels(job, "head"))]
        assert [b["spec"]["maxUnavailable"] for b in head_budgets] == [0], job["metadata"]["name"]
        for group in cluster["workerGroupSpecs"]:
            assert "karpenter.sh/do-not-disrupt" not in group["template"].get("metadata", {}).get(
                "annotations", {}
            )
            assert not any(_selects(b["spec"]["selector"], _labels(job, group["groupName"])) for b in budgets)


def test_kuberay_workers_drain_in_ray_before_eviction():
    """Each spot worker's preStop drains its Ray node (preemption reason) with a deadline inside its grace
    period, which fits in the two-minute spot notice."""
    for job in _rayjobs():
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            grace = pod["terminationGracePeriodSeconds"]
            script = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
            assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in script
            deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", script).group(1))
            wait = int(re.search(r"sleep (\d+)", script).group(1))
            assert wait < deadline < grace <= 120, (group["groupName"], wait, deadline, grace)


# --- Image: pinned dependencies, pinned by digest in the docs -----------------------------------------------


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[a-z0-9-]+", name), f"not an exact pin: {line!r}"
            pins[name] = version
    return pins


def test_constraints_pin_every_runtime_dependency_within_pyproject():
    """cluster/constraints.txt pins each runtime dependency exactly, inside pyproject's range; Ray and torch
    as pinned by pyproject and the Makefile; test tools stay out."""
    from packaging.requirements import Requirement

    pins = _constraints()
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert pins["ray"] == _pinned_ray()
    makefile_torch = re.search(r"TORCH_PIN \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert pins["torch"] == makefile_torch
    assert not {"pytest", "ruff", "moto", "hypothesis"} & set(pins)
    assert len(pins) > 3 * len(
        PYPROJECT["project"]["dependencies"]
    )  # the transitive closure, not just the top


def test_dockerfile_installs_with_the_constraints_and_ships_the_spot_watcher():
    """Every pip install in the image uses cluster/constraints.txt; the spot watcher is copied in."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all(re.search(r"-c \S*cluster/constraints\.txt", i) for i in installs), installs
    assert re.search(r"^COPY .*cluster/constraints\.txt", text, re.MULTILINE)
    assert re.search(r"^COPY .*cluster/spot_drain\.py", text, re.MULTILINE)


def test_readme_documents_digest_pinning_auth_and_head_loss():
    """cluster/README.md deploys by digest, names the constraints, the token, the IAM files and GCS FT."""
    text = (ROOT / "cluster" / "README.md").read_text()
    assert re.search(rf"{IMAGE_NAME}:{VERSION}@sha256:", text)
    for needle in (
        "constraints.txt",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "gcsFaultToleranceOptions",
        "DRAIN_NODE_REASON_PREEMPTION",
        "preStop",
        "spot_drain.py",
    ):
        assert needle in text, needle
    for path in IAM.glob("*.json"):
        assert path.name in text, f"cluster/README.md does not say what {path.name} is for"


def test_aws_spot_workers_start_the_notice_watcher_from_the_image():
    """Every worker (not the on-demand head) starts cluster/spot_drain.py from where the image puts it,
    detached from the setup shell, and Ray's config preparation keeps the command."""
    config = _aws()
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    (command,) = [c for c in config["worker_setup_commands"] if "spot_drain.py" in c]
    assert f"python {workdir}/cluster/spot_drain.py" in command
    assert command.startswith("setsid nohup ") and command.rstrip().endswith("&")
    assert not any("spot_drain" in c for c in config["head_setup_commands"])
    prepared = _prepared_aws(config)
    assert command in prepared["worker_setup_commands"] and command not in prepared["head_setup_commands"]
