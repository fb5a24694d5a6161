"""deploy/ validated where it can be without a cloud: every YAML parses, the cluster launcher config passes Ray's own
schema, the KubeRay manifests use only fields of the KubeRay CRDs (pinned below), the image pins are pyproject's,
no token is written anywhere, and the RayJob's entrypoint is a command the CLI accepts."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from rankmerge.service.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# ---- the KubeRay CRD fields we check against -------------------------------------------------------------------------
# Target: KubeRay v1.1 and later, API ray.io/v1. Field names per level as in ray-project/kuberay
# ray-operator/config/crd/bases/ray.io_rayjobs.yaml (rayClusterSpec embeds the RayCluster spec) at commit 0074129 —
# the fields every later release keeps. Only the Ray-specific levels are pinned exactly (additionalProperties:
# false); pod templates are core/v1 PodTemplateSpec, checked for the fields these manifests use.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT = {"type": "integer", "minimum": 0}
ENV = {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                  "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": {"type": "object"}}}}
QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
CONTAINER = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "command": {"type": "array"}, "args": {"type": "array"},
    "env": ENV, "ports": {"type": "array"}, "imagePullPolicy": {"type": "string"}, "lifecycle": {"type": "object"},
    "resources": {"type": "object", "additionalProperties": False, "properties": {"requests": QUANTITIES, "limits": QUANTITIES}},
    "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}}}}
POD_TEMPLATE = {"type": "object", "additionalProperties": False, "properties": {
    "metadata": {"type": "object"},
    "spec": {"type": "object", "required": ["containers"], "additionalProperties": False, "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER}, "volumes": {"type": "array"},
        "tolerations": {"type": "array"}, "nodeSelector": STRING_MAP, "restartPolicy": {"type": "string"},
        "serviceAccountName": {"type": "string"}}}}}
HEAD_GROUP = {"type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False, "properties": {
    "enableIngress": {"type": "boolean"}, "headService": {"type": "object"}, "rayStartParams": STRING_MAP, "template": POD_TEMPLATE}}
WORKER_GROUP = {"type": "object", "required": ["groupName", "rayStartParams", "template"], "additionalProperties": False, "properties": {
    "groupName": {"type": "string"}, "maxReplicas": INT, "minReplicas": INT, "rayStartParams": STRING_MAP, "replicas": INT,
    "scaleStrategy": {"type": "object"}, "template": POD_TEMPLATE}}
RAY_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "autoscalerOptions": {"type": "object"}, "enableInTreeAutoscaling": {"type": "boolean"}, "headGroupSpec": HEAD_GROUP,
    "headServiceAnnotations": STRING_MAP, "rayVersion": {"type": "string"}, "suspend": {"type": "boolean"},
    "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP}}}
RAY_JOB_SPEC = {"type": "object", "required": ["entrypoint"], "additionalProperties": False, "properties": {
    "activeDeadlineSeconds": INT, "clusterSelector": STRING_MAP, "entrypoint": {"type": "string"},
    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
    "jobId": {"type": "string"}, "metadata": STRING_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC, "runtimeEnvYAML": {"type": "string"},
    "shutdownAfterJobFinishes": {"type": "boolean"}, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode"]},
    "submitterPodTemplate": POD_TEMPLATE, "suspend": {"type": "boolean"}, "ttlSecondsAfterFinished": INT}}


def resource(spec_schema: dict, kind: str) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False, "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": {"type": "object", "required": ["name"]},
        "spec": spec_schema}}


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.name for f in files} >= {"cluster-gpu.yaml", "raycluster.yaml", "rayjob.yaml", "storage.yaml"}
    for path in files:
        assert all(isinstance(doc, dict) for doc in yaml.safe_load_all(path.read_text())), path


def test_cluster_launcher_config_passes_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load("cluster-gpu.yaml")
    jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema really is strict
        jsonschema.validate({**config, "head_node": {}}, schema)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if c.strip().startswith(("RAY_AUTH_MODE", "ray start")))
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("gpu" in name for name in config["available_node_types"])


@pytest.mark.parametrize("name,kind,schema", [("kuberay/raycluster.yaml", "RayCluster", RAY_CLUSTER_SPEC),
                                              ("kuberay/rayjob.yaml", "RayJob", RAY_JOB_SPEC)])
def test_kuberay_manifests_use_only_crd_fields(name, kind, schema):
    manifest = load(name)
    jsonschema.validate(manifest, resource(schema, kind))
    with pytest.raises(jsonschema.ValidationError):  # a misspelt field is caught
        jsonschema.validate({**manifest, "spec": {**manifest["spec"], "rayStartParam": {}}}, resource(schema, kind))


def test_ray_cluster_runs_the_pinned_ray_with_token_auth_and_gpus():
    spec = load("kuberay/raycluster.yaml")["spec"]
    ray_pin = next(d for d in pyproject()["dependencies"] if d.startswith("ray["))
    assert spec["rayVersion"] in SpecifierSet(ray_pin.split("]", 1)[1])
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"])]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for c in containers)


def test_no_token_is_written_in_deploy():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[0-9a-f]{16,}", text), path
            assert not re.search(r"value:\s*['\"]?[0-9a-f]{32,}", text), path


def test_image_pins_match_pyproject():
    text = (DEPLOY / "Dockerfile").read_text()
    block = text.split("# BEGIN pins", 1)[1].split("# END pins", 1)[0]
    assert re.findall(r'"([^"]+)"', block) == pyproject()["dependencies"]
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-cudnn-runtime-", text, re.M)
    images = {m for p in DEPLOY.rglob("*.yaml") for m in re.findall(r"image:\s*(\S+)", p.read_text())}
    assert images == {f"REGISTRY/rankmerge:{pyproject()['version']}"}


def test_rayjob_entrypoint_is_a_driver_command_the_cli_accepts():
    words = shlex.split(load("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert words[0] == "rankmerge"
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.executor, args.address, args.resume) == ("run", "ray", "auto", True)


def test_guide_names_every_deploy_file_and_the_token_settings():
    guide = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(DEPLOY)) in guide, path
    for word in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token", "rankmerge submit"):
        assert word in guide
    assert "KubeRay v1.1" in guide
