"""What deploy/ holds is usable as written: the ECS task definitions, IAM and queue policies and the
bucket notification are accepted by AWS's APIs (moto's server), every setting the code reads is
set, the Helm values render the same instance as deploy/k8s/dagster.yaml, and the images install
through the same script as make and CI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import boto3
import yaml

from lora_assets.settings import ENV_VARS

PROJECT = Path(__file__).resolve().parents[1]
ECS = PROJECT / "deploy" / "ecs"
K8S = PROJECT / "deploy" / "k8s"
ACCOUNT, REGION = "123456789012", "us-east-1"  # moto's account


def _filled(path: Path, bucket: str) -> dict:
    text = path.read_text()
    for name, value in {"ACCOUNT_ID": ACCOUNT, "REGION": REGION, "BUCKET": bucket, "PG_HOST": "db.internal",
                        "IMAGE": "registry/lora-assets:1", "GPU_IMAGE": "registry/lora-assets:1-cuda"}.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text, f"{path}: unknown placeholder"
    return json.loads(text)


def _instance_env_vars(config_path: Path) -> set[str]:
    """Every ``env: X`` an instance config reads."""
    return set(re.findall(r"env:\s*([A-Z_][A-Z0-9_]*)", config_path.read_text()))


# What a deployment on S3 must set (the rest of ENV_VARS have defaults).
REQUIRED_SETTINGS = {"LORA_ASSETS_HOME", "LORA_ASSETS_BACKEND", "LORA_ASSETS_S3_BUCKET", "AWS_REGION",
                     "LORA_ASSETS_SQS_QUEUE_URL", "LORA_ASSETS_SQS_DLQ_URL"}


def test_ecs_task_definitions_policies_and_notifications_are_accepted_and_set_every_setting(aws):
    def client(service: str):
        return boto3.client(service, endpoint_url=aws["endpoint"], region_name=REGION)

    ecs, iam = client("ecs"), client("iam")
    needed = REQUIRED_SETTINGS | _instance_env_vars(ECS / "dagster.yaml") | {"DAGSTER_HOME"}
    families = set()
    for path in sorted((ECS / "task-definitions").glob("*.json")):
        definition = _filled(path, aws["bucket"])
        registered = ecs.register_task_definition(**definition)["taskDefinition"]
        families.add(registered["family"])
        (container,) = registered["containerDefinitions"]
        names = {e["name"] for e in container["environment"]} | {s["name"] for s in container.get("secrets", [])}
        assert needed <= names, f"{path.name}: missing {sorted(needed - names)}"
        assert names - {"DAGSTER_HOME"} <= set(ENV_VARS.values()) | _instance_env_vars(ECS / "dagster.yaml"), path.name
        home = next(e["value"] for e in container["environment"] if e["name"] == "DAGSTER_HOME")
        assert (PROJECT / home.removeprefix("/opt/lora_assets/") / "dagster.yaml").is_file(), "DAGSTER_HOME in the image"
    assert families == {"lora-assets-webserver", "lora-assets-daemon", "lora-assets-code-server", "lora-assets-run"}
    run = _filled(ECS / "task-definitions" / "run-worker.json", aws["bucket"])
    launcher = yaml.safe_load((ECS / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert run["containerDefinitions"][0]["name"] == launcher["container_name"]
    assert {"type": "GPU", "value": "1"} in run["containerDefinitions"][0]["resourceRequirements"]

    for path in sorted((ECS / "iam").glob("*-policy.json")):
        iam.create_policy(PolicyName=f"lora-assets-{path.stem}", PolicyDocument=json.dumps(_filled(path, aws["bucket"])))
    assert len(iam.list_policies(Scope="Local")["Policies"]) >= 5

    # The queue policy lets the bucket send, and the notification announces user-store writes.
    queue_arn = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue"], AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = _filled(ECS / "sqs-queue-policy.json", aws["bucket"])
    assert policy["Statement"][0]["Resource"] == queue_arn
    aws["sqs"].set_queue_attributes(QueueUrl=aws["queue"], Attributes={"Policy": json.dumps(policy)})
    notification = _filled(ECS / "bucket-notification.json", aws["bucket"])
    aws["s3"].put_bucket_notification_configuration(Bucket=aws["bucket"], NotificationConfiguration=notification)
    from lora_assets_tests.test_scale_out import drain

    drain(aws)
    aws["s3"].put_object(Bucket=aws["bucket"], Key="users/deploy-check/mail/seg-000001.parquet", Body=b"x")
    aws["s3"].put_object(Bucket=aws["bucket"], Key="drive/deploy-check/not-announced", Body=b"x")
    bodies = [m["Body"] for m in drain(aws)]
    assert len(bodies) == 1 and "users%2Fdeploy-check%2Fmail%2Fseg-000001.parquet" in bodies[0]
    for key in ("users/deploy-check/mail/seg-000001.parquet", "drive/deploy-check/not-announced"):
        aws["s3"].delete_object(Bucket=aws["bucket"], Key=key)
    drain(aws)


def _camel_to_snake(value):
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): _camel_to_snake(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_to_snake(v) for v in value]
    return value


def test_helm_values_render_the_k8s_instance_and_the_settings_configmap_is_complete(monkeypatch):
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    values = yaml.safe_load((K8S / "values.yaml").read_text())
    instance = yaml.safe_load((K8S / "dagster.yaml").read_text())
    configmap = yaml.safe_load((K8S / "settings-configmap.yaml").read_text())

    assert set(configmap["data"]) == set(ENV_VARS.values()) | {"LORA_ASSETS_SENSOR_INTERVAL_S"}
    assert all(configmap["data"][k] for k in REQUIRED_SETTINGS), "required settings have values"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "lora_assets.definitions"]
    name = configmap["metadata"]["name"]
    assert deployment["envConfigMaps"] == [{"name": name}]

    launcher = instance["run_launcher"]["config"]
    helm_launcher = _camel_to_snake(values["runLauncher"]["config"]["k8sRunLauncher"])
    assert [m["name"] for m in helm_launcher["env_config_maps"]] == launcher["env_config_maps"] == [name]
    assert helm_launcher["run_k8s_config"] == launcher["run_k8s_config"]
    monkeypatch.setenv("LORA_ASSETS_IMAGE", "registry/lora-assets:1")
    monkeypatch.setenv("LORA_ASSETS_K8S_NAMESPACE", "lora")
    processed = process_config(K8sRunLauncher.config_type(), launcher)
    assert processed.success, processed.errors

    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    runs = instance["concurrency"]["runs"]
    assert queue["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert queue["tagConcurrencyLimits"] == runs["tag_concurrency_limits"]
    assert queue["dequeueIntervalSeconds"] == instance["run_coordinator"]["config"]["dequeue_interval_seconds"]
    assert _camel_to_snake(values["dagsterDaemon"]["runRetries"]) == instance["run_retries"]
    assert _camel_to_snake(values["dagsterDaemon"]["runMonitoring"]) == instance["run_monitoring"]
    pg = values["postgresql"]
    assert pg["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    assert instance["storage"]["postgres"]["postgres_db"]["port"] == {"env": "DAGSTER_PG_PORT"}
    s3_logs = values["computeLogManager"]["config"]["s3ComputeLogManager"]
    assert s3_logs["prefix"] == instance["compute_logs"]["config"]["prefix"]

    # Training runs ask for a GPU node through their job's tag; the K8s launcher reads it.
    from dagster_k8s.job import get_user_defined_k8s_config

    from lora_assets.orchestration.batches import adapter_batch_job, dataset_batch_job

    training = get_user_defined_k8s_config(adapter_batch_job.tags)
    assert training.container_config["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert training.pod_spec_config["node_selector"] == {"lora-assets/pool": "gpu"}
    assert get_user_defined_k8s_config(dataset_batch_job.tags).container_config == {}


def test_images_install_through_the_same_script_as_make_and_ci():
    install = "scripts/install.sh"
    assert install in (PROJECT / "Makefile").read_text()
    assert "make test" in (PROJECT / ".ci" / "run").read_text()
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (PROJECT / dockerfile).read_text()
        runs = [line for line in text.splitlines() if line.startswith("RUN ")]
        assert any(f"{install} /opt/venv prod" in line for line in runs), dockerfile
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (PROJECT / source).exists(), f"{dockerfile}: COPY {source}"
    assert "cu1" in (PROJECT / "Dockerfile.cuda").read_text() and "whl/cpu" in (PROJECT / "Dockerfile").read_text()
