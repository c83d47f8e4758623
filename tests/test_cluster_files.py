"""The cluster files a user applies: Ray's launcher schema, KubeRay's required fields, the image's layers.

No cloud here: aws-gpu.yaml is validated against the schema the Ray package ships
(`ray/autoscaler/ray-schema.json`, what `ray up` validates against), the KubeRay
manifests against the fields their CRDs and Kubernetes require, and the Dockerfile by
the order of its instructions (`docker build` is not available on this machine). The
KubeRay MLflow server's flags are run: a real `mlflow server` on loopback with them must
answer the Host header the pods send.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import REPO
from mlflow_helpers import MlflowServer

from lth_search.cli import build_parser

CLUSTER = REPO / "cluster"


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _kube(name: str) -> dict[str, dict]:
    """The documents of a manifest by kind/name."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_aws_launcher_config_passes_rays_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_aws(), schema)


def test_aws_head_keeps_rays_autoscaler_role_and_workers_get_s3() -> None:
    config = _aws()
    nodes = config["available_node_types"]
    # a custom head profile would replace ray-autoscaler-v1 (EC2 rights to launch workers)
    assert "IamInstanceProfile" not in nodes[config["head_node_type"]]["node_config"]
    worker = nodes["gpu_worker"]["node_config"]["IamInstanceProfile"]
    assert worker["Arn"].endswith(":instance-profile/lth-search-worker")
    readme = (CLUSTER / "README.md").read_text()
    assert "iam:PassRole" in readme and "lth-search-worker" in readme


def test_aws_syncs_the_source_only_and_installs_what_it_uses() -> None:
    config = _aws()
    assert ".gitignore" in config["rsync_filter"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert {".venv", "lth_runs/"} <= set(ignored)  # `.venv`, not `.venv/`: a linked venv is not synced either
    assert "**/.git" in config["rsync_exclude"]
    commands = [c for key in ("setup_commands", "head_setup_commands") for c in config[key]]
    for command in commands:
        if "apt-get install" in command:
            assert re.search(r"apt-get update.*&&.*apt-get install", command), command
    pip = [c for c in commands if "pip install" in c and "lth-search" in c]
    assert pip and all("[aws]" in c for c in pip)
    assert any("torch==2.13.0" in c for c in commands[: commands.index(pip[0])])
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^aws = \["boto3', pyproject, re.M)


def test_aws_keeps_mlflow_where_ray_down_does_not_reach() -> None:
    """`ray down` terminates the head and its root disk: MLflow's database lives on a kept EBS volume,
    mounted before the server starts, and its artifacts on S3."""
    config = _aws()
    setup = " ".join(config["head_setup_commands"])
    (mount,) = re.findall(r"cluster/aws-mlflow-volume\.sh VOLUME_ID (\S+)", setup)
    (server,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    words = shlex.split(server.replace("(", " ").replace(")", " "))
    database = words[words.index("--backend-store-uri") + 1]
    assert database.startswith(f"sqlite:///{mount}/"), database
    assert words[words.index("--artifacts-destination") + 1].startswith("s3://") and "--serve-artifacts" in words
    assert config["provider"]["availability_zone"]  # one zone: the volume's
    script = CLUSTER / "aws-mlflow-volume.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    readme = (CLUSTER / "README.md").read_text()
    survives = readme[readme.index("## What survives"):]
    assert "VOLUME_ID" in survives and "ray down" in survives and "PersistentVolumeClaim" in survives


def _containers(pod: dict) -> list[dict]:
    return pod["spec"]["containers"]


def test_kuberay_cluster_has_its_required_fields_and_writable_volumes() -> None:
    docs = _kube("kuberay-gpu.yaml")
    cluster = docs["RayCluster/lth-search"]
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    pods = [head["template"]] + [group["template"] for group in cluster["spec"]["workerGroupSpecs"]]
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    assert "rayStartParams" in head
    deployment = docs["Deployment/lth-search-mlflow"]
    pods.append(deployment["spec"]["template"])
    for pod in pods:
        assert all(c["name"] and c["image"] for c in _containers(pod))
        if any("persistentVolumeClaim" in v for v in pod["spec"].get("volumes", [])):
            # Ray's images run as gid 100; a root-owned fresh volume is writable only with fsGroup
            assert pod["spec"]["securityContext"]["fsGroup"] == 100
        for volume in pod["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or f"PersistentVolumeClaim/{claim}" in docs


def test_kuberay_mlflow_runs_in_its_own_container_with_probes() -> None:
    docs = _kube("kuberay-gpu.yaml")
    head = docs["RayCluster/lth-search"]["spec"]["headGroupSpec"]["template"]
    assert not any("mlflow" in json.dumps(c.get("lifecycle", {})) for c in _containers(head))
    deployment = docs["Deployment/lth-search-mlflow"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    (mlflow,) = _containers(deployment["spec"]["template"])
    assert mlflow["command"][:2] == ["mlflow", "server"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"] == {"path": "/health", "port": 5000}
    service = docs["Service/lth-search-mlflow"]
    assert service["spec"]["selector"] == labels
    env = {e["name"]: e.get("value") for c in _containers(head) for e in c.get("env", [])}
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:5000"


def test_kuberay_job_submits_a_valid_search_to_the_cluster() -> None:
    (job,) = _kube("kuberay-job.yaml").values()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "lth-search"}
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "lth-search"
    args = build_parser().parse_args(words[1:])  # the entrypoint is a command line lth-search accepts
    assert args.command == "run" and Path(args.config).name == "resnet20_cifar10.yaml"
    assert (REPO / "configs" / Path(args.config).name).exists()


def test_dockerfile_installs_torch_and_dependencies_before_the_source() -> None:
    lines = [l for l in (CLUSTER / "Dockerfile").read_text().splitlines() if l and not l.startswith("#")]
    torch = next(i for i, l in enumerate(lines) if "torch==2.13.0" in l)
    source = next(i for i, l in enumerate(lines) if re.match(r"COPY .*\s\.\s+\.$", l))
    deps = next(i for i, l in enumerate(lines) if l.startswith("COPY") and "pyproject.toml" in l)
    assert torch < deps < source, "editing the source must not invalidate the torch and dependency layers"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "lth_runs"} <= set(ignored)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "kuberay-gpu.yaml", "kuberay-job.yaml", "README.md"])
def test_cluster_files_launch_with_ray_job_submit_not_ray_client(name: str) -> None:
    text = (CLUSTER / name).read_text()
    assert not re.search(r"(--address[ =]|address: )ray://", text)
    assert "--address auto" not in text  # ray job submit sets RAY_ADDRESS; lth-search joins by itself


@pytest.mark.parametrize("command", ["run", "resume"])
def test_help_offers_no_ray_client_address(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "ray://" not in capsys.readouterr().out


class ManifestMlflow(MlflowServer):
    """`mlflow server` with the KubeRay Deployment's own flags, its places moved to loopback and tmp:
    the sqlite file under `root`, artifacts in a local folder instead of S3, 127.0.0.1 and a free port."""

    def __init__(self, root: Path, manifest_command: list[str]) -> None:
        super().__init__(root)
        local = {"--backend-store-uri": f"sqlite:///{self.db}", "--artifacts-destination": str(self.artifacts),
                 "--host": "127.0.0.1", "--port": str(self.port)}
        words = list(manifest_command)
        for flag, value in local.items():
            words[words.index(flag) + 1] = value
        assert words[:2] == ["mlflow", "server"]
        self.words = [str(Path(sys.executable).with_name("mlflow")), *words[1:], "--workers", "1"]

    def command(self) -> list[str]:
        return self.words


def _status(url: str, host: str) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_kuberay_mlflow_answers_the_pods_by_its_service_name(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """The pods call MLflow at http://lth-search-mlflow:5000; MLflow 3 refuses a Host it does not allow."""
    docs = _kube("kuberay-gpu.yaml")
    (container,) = _containers(docs["Deployment/lth-search-mlflow"]["spec"]["template"])
    service_host = f"{docs['Service/lth-search-mlflow']['metadata']['name']}:5000"
    command = container["command"]
    assert "--serve-artifacts" in command and command[command.index("--backend-store-uri") + 1] == "sqlite:////data/mlflow.db"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]  # the database on a kept volume
    (volume,) = [v for v in docs["Deployment/lth-search-mlflow"]["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    assert f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}" in docs
    # without the flag (the session's server: MLflow's defaults), the service's name is refused
    assert _status(mlflow_server.url, service_host) == 403
    server = ManifestMlflow(tmp_path, command).start()
    try:
        assert _status(server.url, service_host) == 200
        assert _status(server.url, "lth-search-mlflow.default.svc.cluster.local:5000") == 200
        assert _status(server.url, f"127.0.0.1:{server.port}") == 200  # kubectl port-forward, the UI
        assert _status(server.url, "elsewhere.example:5000") == 403
    finally:
        server.stop()
