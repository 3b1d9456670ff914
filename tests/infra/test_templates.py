"""The Docker and Kubernetes work-pool templates: Prefect accepts them and its workers render them.

Each template goes through the server's own ``validate_base_job_template`` (what
``prefect work-pool create --base-job-template`` runs) and is rendered with the variables a
deployment would set by the worker's own job-configuration class.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = {"docker": REPO / "infra/docker/base-job-template.json",
             "kubernetes": REPO / "infra/kubernetes/base-job-template.json"}
CREDENTIAL = re.compile(r"secret_access_key|access_key_id|session_token|password", re.IGNORECASE)


def _render(template: dict, **values) -> dict:
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **values})


@pytest.mark.parametrize("kind", TEMPLATES)
def test_prefect_accepts_the_template(kind):
    template = json.loads(TEMPLATES[kind].read_text())
    assert validate_base_job_template(template) == template


@pytest.mark.parametrize("kind", TEMPLATES)
def test_no_template_variable_carries_credentials(kind):
    template = json.loads(TEMPLATES[kind].read_text())
    assert not [k for k in template["variables"]["properties"] if CREDENTIAL.search(k)]
    assert not CREDENTIAL.search(json.dumps(template["job_configuration"]))


def test_kubernetes_job_mounts_the_workspace_takes_credentials_from_a_secret_and_requests_gpus():
    kubernetes = pytest.importorskip("prefect_kubernetes.worker")
    template = json.loads(TEMPLATES["kubernetes"].read_text())
    config = kubernetes.KubernetesWorkerJobConfiguration(**_render(template, image="registry/slimforge:1", gpus=2))
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry/slimforge:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "slimforge-aws", "optional": True}}]
    mount = container["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["mountPath"] == container["workingDir"] == "/workspace"
    assert volume["persistentVolumeClaim"]["claimName"] == "slimforge-workspace"


def test_docker_container_runs_the_slimforge_image_with_the_workspace_volume():
    docker = pytest.importorskip("prefect_docker.worker")
    template = json.loads(TEMPLATES["docker"].read_text())
    config = docker.DockerWorkerJobConfiguration(**_render(template))
    assert config.image == "slimforge:latest"
    assert "slimforge-workspace:/workspace" in config.volumes


def test_the_dockerfile_copies_only_what_exists_and_pins_torch():
    text = (REPO / "infra/docker/Dockerfile").read_text()
    sources = [src for line in text.splitlines() if line.startswith("COPY ")
               for src in line.split()[1:-1]]
    assert sources and all((REPO / s).exists() for s in sources), [s for s in sources if not (REPO / s).exists()]
    assert '"torch==2.13.0"' in text  # a loose torch pulls a multi-GB CUDA build
    assert "AWS_SECRET" not in text and "AWS_ACCESS" not in text
