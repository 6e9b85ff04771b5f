"""Running on a real cluster: the launcher YAMLs and KubeRay manifests, cloud storage, two nodes.

- cluster/aws.yaml and cluster/gcp.yaml go through the validation `ray up` runs (prepare_config +
  validate_config against Ray's ray-schema.json).
- cluster/kuberay/*.yaml are checked field by field against the ray.io/v1 API (RayCluster, RayJob).
- Outputs and checkpoints go to s3:// on a local S3 server (moto) on loopback; training resumes from
  the checkpoint stored there after Ray restarts.
- A 2-node local cluster (`ray start --head` + `ray start --address`) runs `ray job submit ...
  jobs/train.py` with 2 workers that must land on different nodes.
"""
import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from local_ray import start_local_ray
from rayablate.job import shutdown_ray
from test_jobs import OUTPUT_FILES, TINY, check_metrics, stop_ray_under

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUCKET = "rayablate-test"


def _pins() -> dict:
    """package (with extras) -> version, from pyproject's dependencies."""
    return dict(d.split("==", 1) for d in PYPROJECT["project"]["dependencies"])


def _ray_version() -> str:
    return _pins()["ray[default,train,tune,data]"]


# --- cluster launcher YAMLs -----------------------------------------------------------------------

def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_up_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill defaults, then schema + consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_ray_up_validation_with_cpu_head_and_autoscaling_gpu_workers(name):
    cfg = _ray_up_validate(_launcher(name))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not offer GPUs (it runs no training)"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for t, spec in workers.items():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1, t
        assert spec["resources"]["GPU"] >= 1, t
    assert 0 < cfg["idle_timeout_minutes"] <= 60
    assert cfg["max_workers"] >= max(s["max_workers"] for s in workers.values())
    # The dashboard's port is not opened to the outside: no ingress rule names it.
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    for r in rules:
        assert not (r.get("FromPort", 0) <= 8265 <= r.get("ToPort", 0)), r
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head_start and "--head" in head_start


@pytest.mark.parametrize("mutate,error", [
    (lambda c: c.update(max_wrokers=4), "Additional properties"),  # a typo `ray up` refuses
    (lambda c: c["available_node_types"][c["head_node_type"]].pop("resources"), "resources"),
    (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
])
def test_ray_up_validation_rejects_broken_launcher_yamls(mutate, error):
    """The check above is Ray's own and can fail: broken variants of aws.yaml are refused."""
    cfg = _launcher("aws.yaml")
    mutate(cfg)
    with pytest.raises(Exception, match=error):
        _ray_up_validate(cfg)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_installs_the_pins_of_pyproject_on_the_pinned_ray_image(name):
    cfg = _launcher(name)
    tokens = [t for cmd in cfg["setup_commands"] for t in shlex.split(cmd)]
    installed = dict(t.split("==", 1) for t in tokens if "==" in t)
    assert installed == _pins()
    py = re.search(r"3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(0).replace(".", "")
    for key in ("image", "head_image"):
        assert cfg["docker"][key].startswith(f"rayproject/ray:{_ray_version()}-py{py}-"), cfg["docker"][key]


# --- KubeRay manifests (ray.io/v1), field by field ----------------------------------------------

STR, INT, BOOL, NUM = str, int, bool, (int, float)
STR_MAP = ("map", str)  # map[string]string: KubeRay refuses numbers in rayStartParams
CONTAINER = {"name": STR, "image": STR, "imagePullPolicy": STR, "command": [STR], "args": [STR],
             "ports": [{"containerPort": INT, "name": STR, "protocol": STR}],
             "resources": {"requests": dict, "limits": dict},
             "env": [{"name": STR, "value": STR, "valueFrom": dict}], "envFrom": [dict],
             "volumeMounts": [{"name": STR, "mountPath": STR, "readOnly": BOOL, "subPath": STR}],
             "lifecycle": dict, "securityContext": dict, "workingDir": STR}
POD_TEMPLATE = {"metadata": {"labels": dict, "annotations": dict},
                "spec": {"containers": [CONTAINER], "volumes": [dict], "tolerations": [dict],
                         "nodeSelector": dict, "affinity": dict, "serviceAccountName": STR,
                         "restartPolicy": STR, "imagePullSecrets": [dict]}}
AUTOSCALER_OPTIONS = {"resources": dict, "image": STR, "imagePullPolicy": STR, "env": [dict], "envFrom": [dict],
                      "volumeMounts": [dict], "securityContext": dict, "idleTimeoutSeconds": INT,
                      "upscalingMode": ("enum", "Default", "Aggressive", "Conservative"), "version": STR}
HEAD_GROUP = {"serviceType": ("enum", "ClusterIP", "NodePort", "LoadBalancer"), "headService": dict,
              "enableIngress": BOOL, "rayStartParams": STR_MAP, "template": POD_TEMPLATE}
WORKER_GROUP = {"groupName": STR, "replicas": INT, "minReplicas": INT, "maxReplicas": INT, "numOfHosts": INT,
                "rayStartParams": STR_MAP, "template": POD_TEMPLATE, "scaleStrategy": dict, "suspend": BOOL}
RAY_CLUSTER_SPEC = {"headGroupSpec": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP], "rayVersion": STR,
                    "enableInTreeAutoscaling": BOOL, "autoscalerOptions": AUTOSCALER_OPTIONS,
                    "headServiceAnnotations": dict, "suspend": BOOL}
RAY_JOB_SPEC = {"activeDeadlineSeconds": INT, "backoffLimit": INT, "rayClusterSpec": RAY_CLUSTER_SPEC,
                "submitterPodTemplate": POD_TEMPLATE, "metadata": dict, "clusterSelector": dict,
                "submitterConfig": {"backoffLimit": INT}, "managedBy": STR, "deletionStrategy": dict,
                "entrypoint": STR, "runtimeEnvYAML": STR, "jobId": STR,
                "submissionMode": ("enum", "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
                "entrypointResources": STR, "entrypointNumCpus": NUM, "entrypointNumGpus": NUM,
                "ttlSecondsAfterFinished": INT, "shutdownAfterJobFinishes": BOOL, "suspend": BOOL}
REQUIRED = {"RayCluster": ["headGroupSpec"], "HeadGroupSpec": ["rayStartParams", "template"],
            "WorkerGroupSpec": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"]}
OBJECT = {"apiVersion": ("enum", "ray.io/v1"), "kind": ("enum", "RayCluster", "RayJob"),
          "metadata": {"name": STR, "namespace": STR, "labels": dict, "annotations": dict}, "spec": dict}


def api_errors(value, schema, where="") -> list[str]:
    """Where `value` departs from `schema`: unknown fields, wrong types, enum values outside the set."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        errs = []
        for k, v in value.items():
            if k not in schema:
                errs.append(f"{where}.{k}: unknown field")
            else:
                errs += api_errors(v, schema[k], f"{where}.{k}")
        return errs
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [e for i, v in enumerate(value) for e in api_errors(v, schema[0], f"{where}[{i}]")]
    if isinstance(schema, tuple) and schema[0] == "enum":
        return [] if value in schema[1:] else [f"{where}: {value!r} not one of {list(schema[1:])}"]
    if isinstance(schema, tuple) and schema[0] == "map":
        if not isinstance(value, dict):
            return [f"{where}: expected a map"]
        return [f"{where}.{k}: {v!r} must be a string" for k, v in value.items() if not isinstance(v, schema[1])]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:
        return [f"{where}: {value!r} is a bool"]
    return [] if isinstance(value, types) else [f"{where}: {value!r} is not {schema}"]


def cluster_spec_errors(spec: dict, where: str) -> list[str]:
    errs = api_errors(spec, RAY_CLUSTER_SPEC, where)
    missing = [k for k in REQUIRED["RayCluster"] if k not in spec]
    missing += [f"headGroupSpec.{k}" for k in REQUIRED["HeadGroupSpec"] if k not in spec.get("headGroupSpec", {})]
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        missing += [f"workerGroupSpecs[{i}].{k}" for k in REQUIRED["WorkerGroupSpec"] if k not in g]
    return errs + [f"{where}.{m}: required" for m in missing]


def manifest_errors(doc: dict) -> list[str]:
    errs = api_errors(doc, OBJECT, doc.get("kind", "?"))
    if doc.get("kind") == "RayCluster":
        errs += cluster_spec_errors(doc["spec"], "RayCluster.spec")
    elif doc.get("kind") == "RayJob":
        errs += api_errors(doc["spec"], RAY_JOB_SPEC, "RayJob.spec")
        if "rayClusterSpec" in doc["spec"]:
            errs += cluster_spec_errors(doc["spec"]["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
        elif "clusterSelector" not in doc["spec"]:
            errs.append("RayJob.spec: needs rayClusterSpec or clusterSelector")
    return errs


def _kuberay(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_matches_the_ray_io_v1_api_and_keeps_training_off_the_head(name):
    doc = _kuberay(name)
    assert manifest_errors(doc) == []
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _ray_version()
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress", False)  # dashboard not exposed
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "outputs-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for group in [head] + spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
        mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert {v["name"] for v in pod["volumes"]} <= mounted
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 < g["maxReplicas"] and g.get("replicas", 0) <= g["maxReplicas"]
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_runs_batch_ablate_with_files_that_exist_in_the_image():
    doc = _kuberay("rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/rayablate/jobs/batch_ablate.py"]
    # The Dockerfile copies the repository to /home/ray/rayablate: every path the job names exists here.
    for arg in argv:
        if arg.startswith("/home/ray/rayablate/"):
            assert (ROOT / arg.removeprefix("/home/ray/rayablate/")).exists(), arg
    assert "--output-dir" in argv and argv[argv.index("--output-dir") + 1].startswith("/mnt/outputs/")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])  # a YAML string, as the API wants
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_version()}-py311-gpu" in dockerfile
    assert "pip install --no-cache-dir -e /home/ray/rayablate" in dockerfile


@pytest.mark.parametrize("path,value,error", [
    (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "must be a string"),
    (("spec", "workerGroupSpec"), [], "unknown field"),
    (("spec", "headGroupSpec", "serviceType"), "Ingress", "not one of"),
    (("apiVersion",), "ray.io/v1alpha1", "not one of"),
])
def test_kuberay_check_refuses_manifests_the_api_would_not_take(path, value, error):
    doc = _kuberay("raycluster.yaml")
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    errs = manifest_errors(doc)
    assert any(error in e for e in errs), errs
    doc = _kuberay("raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert any("maxReplicas: required" in e for e in manifest_errors(doc))


# --- S3 on loopback ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point this process at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(S3_ENV, AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in list(env) + ["AWS_ENDPOINT_URL", "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"client": client, "env": env}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_outputs_round_trip_through_s3_with_a_custom_endpoint(s3, tmp_path):
    import pyarrow.fs as pafs

    from rayablate import storage

    src = tmp_path / "out"
    (src / "data").mkdir(parents=True)
    (src / "metrics.json").write_text('{"target": 0.0}')
    (src / "data" / "part-0.parquet").write_bytes(b"\x00" * 1000)
    assert storage.upload_dir(src, f"s3://{BUCKET}/runs/a/") == ["data/part-0.parquet", "metrics.json"]
    # Seen by an independent client (boto3), not only by pyarrow.
    assert [k for k in keys(s3["client"], "runs/a/") if not k.endswith("/")] == \
        ["runs/a/data/part-0.parquet", "runs/a/metrics.json"]
    r = subprocess.run([sys.executable, "-m", "rayablate.storage", "fetch", f"s3://{BUCKET}/runs/a", str(tmp_path / "back")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "metrics.json").read_text() == '{"target": 0.0}'
    assert (tmp_path / "back" / "data" / "part-0.parquet").stat().st_size == 1000
    path, fs = storage.train_storage(f"s3://{BUCKET}/ckpt")
    assert path == f"{BUCKET}/ckpt" and isinstance(fs, pafs.S3FileSystem)
    assert storage.train_storage("/tmp/x") == ("/tmp/x", None)
    storage.check_remote_dir(f"s3://{BUCKET}/new-prefix")
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        storage.check_remote_dir("s3://no-such-bucket/x")


def _init_ray():
    start_local_ray(300)


@pytest.mark.slow
def test_training_checkpoints_to_s3_and_resumes_from_there_after_a_restart(s3, tiny_sd_path, tmp_path):
    """Run 1 stops after its step-2 checkpoint in S3; Ray restarts and the local output is gone;
    run 2 (same storage, same run name) starts from step 2, not 0."""
    import ray

    from rayablate.config import AblationConfig
    from rayablate.train import run_training
    from test_train import _rows

    cfg = AblationConfig(steps=2, batch_size=4, num_workers=1, zero_stage=2, report_every=2, checkpoint_every=2,
                         lr_matcher=1e-3, seed=0, storage_path=f"s3://{BUCKET}/resume/ray")
    out = tmp_path / "out"
    _init_ray()  # its workers inherit the AWS_* variables
    try:
        first = run_training(cfg, ray.data.from_items(_rows()), str(tiny_sd_path), str(out), run_name="resume")
    finally:
        shutdown_ray()
    assert first["start_step"] == 0 and first["final_step"] == 2
    stored = keys(s3["client"], "resume/ray/resume/")
    assert any("checkpoint_step0000002/" in k and k.endswith("train_state.json") for k in stored), stored
    assert any(k.endswith("matcher_delta.safetensors") for k in stored)
    shutil.rmtree(out)  # nothing local survives the "restart"

    _init_ray()
    try:
        cfg4 = AblationConfig(**{**cfg.__dict__, "steps": 4, "checkpoint_every": 2})
        second = run_training(cfg4, ray.data.from_items(_rows()), str(tiny_sd_path), str(out), run_name="resume")
    finally:
        shutdown_ray()
    assert second["start_step"] == 2 and second["final_step"] == 4
    assert [m["step"] for m in second["metrics"]] == [2, 4]  # step 2's history came back from S3
    stored = keys(s3["client"], "resume/ray/resume/")
    assert any("checkpoint_step0000004/" in k for k in stored), stored
    assert (out / "matcher_delta.safetensors").exists()


def _without_progress_bars(log: str) -> str:
    """A job's log without Ray Data's progress lines and the blank lines they leave."""
    noise = ("Running Dataset", "ListFiles", "ReadFiles", "split(", "execution finished")
    lines = (re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", ln) for ln in log.splitlines())
    return "\n".join(ln for ln in lines if ln.strip() and not any(n in ln for n in noise))


# --- a 2-node local cluster -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_node_cluster_trains_on_both_nodes_with_outputs_and_checkpoints_in_s3(s3, tmp_path):
    """Head (2 CPUs) + a second node (1 CPU), each offering one `train_slot`; `ray job submit
    jobs/train.py --num-workers 2 --worker-resources '{"train_slot": 1}'` must put one worker on
    each node; outputs and checkpoints land in S3 (--output-dir s3://...)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, dash = free_port(), free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: unix socket paths < 107 bytes
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token",
               **s3["env"])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is ours
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    # Both nodes share one IP: each node's dashboard agent needs its own HTTP port (default 52365), or the
    # head's agent cannot bind and the job server answers "No available agent to submit job".
    head = [ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "2", "--resources", '{"train_slot": 1}',
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--object-store-memory", str(300 * 1024**2), *common]
    second = [ray_bin, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
              "--resources", '{"train_slot": 1, "node_b": 1}', "--object-store-memory", str(200 * 1024**2),
              "--dashboard-agent-listen-port", str(free_port()),
              # its own session folder, as on a real second machine: nodes that share one remove each other's
              # unpacked job working_dir when their own last user of it ends (the driver's cwd vanished)
              "--temp-dir", str(ray_tmp / "b"), *common]
    uri = f"s3://{BUCKET}/two-node"
    try:
        # A starved machine can miss the raylet's 30 s start-up deadline: one more try from scratch.
        for attempt in range(2):
            runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180) for cmd in (head, second)]
            if all(r.returncode == 0 for r in runs):
                break
            stop_ray_under(ray_tmp)
            if attempt == 1:
                pytest.fail("ray start failed:\n" + "\n".join(r.stdout[-2000:] + r.stderr[-2000:] for r in runs))
        address = f"http://127.0.0.1:{dash}"
        nodes = []
        for _ in range(60):  # the second node registers within seconds
            r = subprocess.run([ray_bin, "list", "nodes", "--address", address, "--format", "json"],
                               env=env, capture_output=True, text=True, timeout=60)
            nodes = [n for n in json.loads(r.stdout or "[]") if n["state"] == "ALIVE"] if r.returncode == 0 else []
            if len(nodes) == 2:
                break
            time.sleep(1)
        assert len(nodes) == 2, nodes
        node_b = [n["node_id"] for n in nodes if "node_b" in n["resources_total"]]
        assert len(node_b) == 1
        for _ in range(12):  # right after `ray start` the job agent may not be up yet ("No available agent")
            sub = subprocess.run([ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
                                  "python", "jobs/train.py", *TINY, "--output-dir", uri,
                                  "--worker-resources", '{"train_slot": 1}'],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
            if "No available agent" not in sub.stdout + sub.stderr:
                break
            time.sleep(5)
        if sub.returncode != 0:  # pytest.fail shows the job's log whole, where an assert would abbreviate it
            pytest.fail(f"job failed:\n{_without_progress_bars(sub.stdout)[-8000:]}\n{sub.stderr[-3000:]}")
        assert "succeeded" in (sub.stdout + sub.stderr).lower()
    finally:
        stop_ray_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stored = keys(s3["client"], "two-node/")
    for f in OUTPUT_FILES:
        assert f"two-node/{f}" in stored, (f, stored[:20])
    assert any(k.startswith("two-node/ray/striped/checkpoint_") for k in stored), stored[:40]
    assert not [k for k in stored if ".tmp" in k], stored
    metrics = check_metrics(json.loads(s3["client"].get_object(Bucket=BUCKET, Key="two-node/metrics.json")["Body"].read()))
    ids = metrics["worker_node_ids"]
    assert len(ids) == 2 and set(ids) == {n["node_id"] for n in nodes}, (ids, nodes)
    assert node_b[0] in ids
