"""Every manifest in k8s/ validates against the KubeRay CRD OpenAPI schemas (ray.io/v1).

The schemas are the CRDs' ``spec.versions[v1].schema.openAPIV3Schema`` from the KubeRay CRDs
vendored in ``tests/data/kuberay/`` (source, commit and licence in its SOURCE.md). Validation is
strict like ``kubectl apply --validate=strict``: an object schema that lists ``properties``
rejects unknown keys (unless it is marked ``x-kubernetes-preserve-unknown-fields``), so a
misspelt field fails instead of being pruned.
``x-kubernetes-int-or-string`` fields accept an integer or a string. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO / "tests" / "data" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))


def _strict(node):
    """Copy of an OpenAPI v3 (Kubernetes structural) schema as strict JSON Schema."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    if not SCHEMA_DIR.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {SCHEMA_DIR} (vendored in the repository "
                    "under tests/data/kuberay/)")
    out = {}
    for kind, name in CRDS.items():
        crd = yaml.load((SCHEMA_DIR / name).read_text(), Loader=_LOADER)
        assert crd["spec"]["names"]["kind"] == kind
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        schema = _strict(versions["v1"]["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def _errors(validators, doc: dict) -> list[str]:
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in validators:
        return [f"apiVersion/kind {doc.get('apiVersion')}/{kind}: expected ray.io/v1 "
                f"{' or '.join(CRDS)}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validators[kind].iter_errors(doc)]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-pipeline.yaml", "rayjob-eval.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(validators, path):
    docs = _docs(path)
    assert docs, f"{path}: empty"
    for doc in docs:
        errors = _errors(validators, doc)
        assert not errors, f"{path}:\n" + "\n".join(errors[:20])


def _gpu_group(cluster_spec: dict) -> dict:
    groups = cluster_spec["workerGroupSpecs"]
    gpu = [g for g in groups
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    return gpu[0]


def _secret_env(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_cluster_shape():
    """What the README promises: head + autoscaled GPU group, S3 credentials from a Secret."""
    (cluster,) = _docs(REPO / "k8s" / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    group = _gpu_group(spec)
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = group["template"]["spec"]["containers"][0]
    for c in (head, worker):
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= _secret_env(c)
        assert c["image"] == head["image"]
    for name in ("rayjob-pipeline.yaml", "rayjob-eval.yaml"):
        (job,) = _docs(REPO / "k8s" / name)
        js = job["spec"]
        assert js["shutdownAfterJobFinishes"] is True and js["entrypoint"]
        assert isinstance(yaml.safe_load(js["runtimeEnvYAML"]), dict)
        assert "qgscale" in js["entrypoint"]
        _gpu_group(js["rayClusterSpec"])
        # the head runs the driver only: no CPU of it is offered to tasks and actors
        assert js["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    (lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"), "is not of type 'boolean'"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
     "'groupName' is a required property"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="8"),
     "is not of type 'integer'"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
     ["containers"][0]["resources"]["limits"].update(cpu=[8]), "is not of type"),
    (lambda d: d.update(kind="RayService"), "expected ray.io/v1"),
])
def test_broken_manifest_rejected(validators, breakage, expected):
    (job,) = _docs(REPO / "k8s" / "rayjob-eval.yaml")
    assert not _errors(validators, job)
    broken = copy.deepcopy(job)
    breakage(broken)
    errors = _errors(validators, broken)
    assert errors and any(expected in e for e in errors), errors


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_operator_accepts_idle_timeouts(path):
    """KubeRay's own check (validateWorkerGroupIdleTimeout, v1.6+; not in the CRD schema): a
    worker group's ``idleTimeoutSeconds`` needs autoscaler v2 (``autoscalerOptions.version:
    v2``), else the operator rejects the whole cluster (InvalidRayClusterSpec) and starts no
    pod. The release timeout belongs in ``autoscalerOptions.idleTimeoutSeconds``."""
    for doc in _docs(path):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
        for group in spec.get("workerGroupSpecs", []):
            assert v2 or "idleTimeoutSeconds" not in group, group["groupName"]
        assert (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds") == 600


@pytest.mark.parametrize("name", ["rayjob-pipeline.yaml", "rayjob-eval.yaml"])
def test_job_cpu_actor_pools_fit_their_cluster(name):
    """The BM25 actors a RayJob's entrypoint asks for (its config with its ``--set``
    overrides) fit its cluster at its largest: the worker pods' CPUs (the head offers none).
    The eval job's cluster has 2 GPU pods, not the pipeline's 8: with the config's 56 actors
    its BM25 baseline failed (or waited forever) after the student eval."""
    import shlex

    from qgscale.config import load

    (job,) = _docs(REPO / "k8s" / name)
    words = shlex.split(job["spec"]["entrypoint"])
    overrides = [words[i + 1] for i, w in enumerate(words) if w in ("--set", "-s")]
    (path,) = [w for w in words if w.startswith("/app/configs/")]
    cfg = load(str(REPO / path.removeprefix("/app/")), overrides)
    cpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]
                                      ["limits"]["cpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.bm25.baseline and cfg.bm25.num_actors
    assert cfg.bm25.num_actors * cfg.bm25.cpus_per_actor <= cpus
