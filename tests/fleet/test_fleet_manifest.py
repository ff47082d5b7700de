"""`lmpack fleet manifest`: a KubeRay RayService whose serveConfigV2 builds the fleet's application."""

from __future__ import annotations

import importlib

import yaml


def test_the_manifest_is_a_rayservice_whose_application_serve_builds_as_deploy_would(lmpack_cli, tmp_path):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    result = lmpack_cli(
        "fleet", "manifest", "smollm2", "1.1.0", "--image", "registry.local/lmpack:1", "--workers", 3,
        "--replicas", 2, "--max-replicas", 4, "--threads", 2, "--prefix", "/opt/lmpack",
        "--token-secret", "fleet-token",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    resource = yaml.safe_load(result.stdout)
    assert (resource["apiVersion"], resource["kind"], resource["metadata"]["name"]) == (
        "ray.io/v1",
        "RayService",
        "smollm2",
    )
    cluster = resource["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas only on the workers
    workers = cluster["workerGroupSpecs"][0]
    assert workers["replicas"] == 3
    container = workers["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.local/lmpack:1"
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["lmpack-prefix"]["hostPath"]["path"] == "/opt/lmpack"
    assert volumes["fleet-token"]["secret"]["secretName"] == "fleet-token"

    serve_config = yaml.safe_load(resource["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["route_prefix"] == "/"
    # what Serve does with the application on the cluster: import the builder, call it with the args
    module, _, attribute = application["import_path"].partition(":")
    built = call_user_app_builder_with_args_if_necessary(
        getattr(importlib.import_module(module), attribute), application["args"]
    )
    assert isinstance(built, Application)
    deployment = built._bound_deployment  # Serve's own record of the deployment's options (private)
    assert deployment.name == "smollm2"
    config = deployment._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (2, 4)
    assert deployment._replica_config.max_replicas_per_node == 1
    assert deployment.ray_actor_options["num_cpus"] == 2
    spec = deployment.init_args[0]
    assert (spec.name, spec.version, spec.prefix, spec.settings.threads) == ("smollm2", "1.1.0", "/opt/lmpack", 2)
