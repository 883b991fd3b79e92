#!/usr/bin/env python3
"""Validation of the kls Helm chart (helm/kls) without a cluster (docs/kubernetes.md).

For each example values file and Kubernetes version: `helm lint --strict`, `helm template`,
kubernetes-validate in strict mode (unknown fields are errors) on every rendered object, yamllint,
and structural checks of what the objects mean together: probes, GPUs, volumes, PDBs, ports,
addresses, grace periods, flags the kls binary really has. Then bad values, each of which must
fail with a message naming the value.

Run by ctest (tests/helm/CMakeLists.txt) with the venv of scripts/install-deps:
    .venv/bin/python tests/helm/chart_test.py --kls build/services/cli/kls
A missing helm, yamllint or kls binary is a failure, never a skip.
"""

import argparse
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kls"
HELM = ROOT / ".tools" / "helm" / "helm"
YAMLLINT_CONFIG = Path(__file__).resolve().parent / "yamllint.yaml"
EXAMPLES = {
    "cpu-small": CHART / "examples" / "values-cpu-small.yaml",
    "gpu-production": CHART / "examples" / "values-gpu-production.yaml",
}
# The oldest version the chart supports (Chart.yaml kubeVersion), one in between, and the first
# with image volumes on by default. Renders without a version use the last.
KUBE_VERSIONS = ["1.30.0", "1.33.0", "1.35.0"]
RELEASE = "r1"
NAMESPACE = "kls-test"
DOMAIN = "cluster.local"
# Kinds from CRDs, which kubernetes-validate has no schema for: checked structurally below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
KLS = None  # the kls binary (--kls)


def run(args, check=False):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def helm(*args):
    return run([HELM, *args])


@functools.lru_cache(maxsize=None)
def render(values_files=(), set_values=(), kube=KUBE_VERSIONS[-1]):
    """The rendered objects of `helm template` (cached), and the raw text."""
    args = ["template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", kube]
    for f in values_files:
        args += ["-f", f]
    for s in set_values:
        args += ["--set", s]
    result = helm(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}")
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return docs, result.stdout


def values_of(example):
    with open(EXAMPLES[example]) as f:
        return yaml.safe_load(f)


class Objects:
    """The rendered objects of one release, by kind and name, with the questions tests ask."""

    def __init__(self, docs):
        self.docs = docs
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

    def get(self, kind, name):
        return self.by_kind.get(kind, {}).get(name)

    def all(self, kind):
        return list(self.by_kind.get(kind, {}).values())

    def workloads(self):
        return self.all("Deployment") + self.all("StatefulSet")

    def workload(self, component):
        for w in self.workloads():
            if w["metadata"]["labels"].get("app.kubernetes.io/component") == component:
                return w
        raise AssertionError(f"no workload for component {component}")

    def selected_workloads(self, match_labels):
        return [w for w in self.workloads()
                if match_labels.items() <= w["spec"]["template"]["metadata"]["labels"].items()]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def container(workload, name=None):
    containers = pod_spec(workload)["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def port_of(c, name):
    for p in c.get("ports", []):
        if p["name"] == name:
            return p["containerPort"]
    raise AssertionError(f"container {c['name']} has no port named {name}")


def flags(c):
    """The container's args as {flag: value} (all rendered as --flag=value), plus the command."""
    args = c["args"]
    out = {}
    for a in args[1:]:
        assert a.startswith("--") and "=" in a, f"{c['name']}: arg {a!r} is not --flag=value"
        key, value = a.split("=", 1)
        out[key] = value
    return args[0], out


def listen_port(address):
    return int(address.rsplit(":", 1)[1])


@functools.lru_cache(maxsize=None)
def kls_flags(command):
    """The long options `kls COMMAND --help` lists."""
    result = run([KLS, command, "--help"], check=True)
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout))


def setUpModule():
    missing = []
    if not os.access(HELM, os.X_OK):
        missing.append(f"helm at {HELM} (run scripts/install-deps)")
    if shutil.which("yamllint") is None:
        missing.append("yamllint (Debian package yamllint; scripts/install-deps)")
    if KLS is None or not os.access(KLS, os.X_OK):
        missing.append(f"the kls binary (--kls {KLS})")
    if missing:
        raise RuntimeError("chart_test cannot run without: " + "; ".join(missing))


class LintTest(unittest.TestCase):
    def test_each_example_passes_strict_lint(self):
        for example, path in EXAMPLES.items():
            for kube in KUBE_VERSIONS:
                with self.subTest(example=example, kube=kube):
                    result = helm("lint", "--strict", CHART, "-f", path, "--kube-version", kube)
                    self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                    self.assertIn("0 chart(s) failed", result.stdout)

    def test_values_files_pass_yamllint(self):
        for path in [CHART / "values.yaml", CHART / "Chart.yaml", *EXAMPLES.values()]:
            result = run(["yamllint", "--strict", "-c", YAMLLINT_CONFIG, path])
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class SchemaValidationTest(unittest.TestCase):
    """kubernetes-validate --strict on every rendered object, and proof that it is strict."""

    def test_every_rendered_object_is_valid(self):
        for example, path in EXAMPLES.items():
            for kube in KUBE_VERSIONS:
                docs, _ = render((str(path),), kube=kube)
                for doc in docs:
                    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                        continue
                    with self.subTest(example=example, kube=kube, kind=doc["kind"],
                                      name=doc["metadata"]["name"]):
                        try:
                            kubernetes_validate.validate(doc, kube, strict=True)
                        except kubernetes_validate.ValidationError as e:
                            self.fail(f"{e.message} at {'.'.join(map(str, e.path))}")

    def test_no_unexpected_kinds(self):
        # Everything rendered has a schema here, or is one of the CRDs checked structurally.
        for example, path in EXAMPLES.items():
            docs, _ = render((str(path),))
            for doc in docs:
                if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                    continue
                try:
                    kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
                except kubernetes_validate.SchemaNotFoundError as e:
                    self.fail(f"{example}: {e.message}")

    def test_validator_rejects_unknown_fields_and_wrong_types(self):
        docs, _ = render((str(EXAMPLES["gpu-production"]),))
        worker = Objects(docs).workload("worker")
        kubernetes_validate.validate(worker, KUBE_VERSIONS[-1], strict=True)  # the baseline
        mutations = {
            "unknown probe field": lambda d: container(d)["livenessProbe"]["grpc"].update(
                servce="kls.v1.Worker"),
            "unknown spec field": lambda d: d["spec"].update(replica=2),
            "string port": lambda d: container(d)["ports"][0].update(containerPort="grpc"),
            "probe port by name": lambda d: container(d)["readinessProbe"]["grpc"].update(
                port="grpc"),
        }
        for name, mutate in mutations.items():
            with self.subTest(mutation=name):
                bad = copy.deepcopy(worker)
                mutate(bad)
                with self.assertRaises(kubernetes_validate.ValidationError):
                    kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


class RenderedYamlTest(unittest.TestCase):
    def test_rendered_manifests_pass_yamllint(self):
        with tempfile.TemporaryDirectory() as tmp:
            for example, path in EXAMPLES.items():
                _, text = render((str(path),))
                out = Path(tmp) / f"{example}.yaml"
                out.write_text(text)
                result = run(["yamllint", "--strict", "-c", YAMLLINT_CONFIG, out])
                self.assertEqual(result.returncode, 0, f"{example}:\n{result.stdout}")


class StructureTest(unittest.TestCase):
    """What the objects must mean together, for every example."""

    @staticmethod
    def each():
        """(example name, its values, its rendered objects) for every example."""
        return [(example, values_of(example), Objects(render((str(path),))[0]))
                for example, path in EXAMPLES.items()]

    def test_probes_are_grpc_health_on_the_grpc_port(self):
        # A `grpc:` probe is the kubelet's grpc.health.v1.Health/Check; `service` is the name.
        for example, _, objs in self.each():
            with self.subTest(example=example):
                for w in objs.workloads():
                    component = w["metadata"]["labels"]["app.kubernetes.io/component"]
                    c = container(w)
                    grpc_port = port_of(c, "grpc")
                    services = {}
                    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                        self.assertIn(probe, c, f"{example}: {component} has no {probe}")
                        handlers = set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"}
                        self.assertEqual(handlers, {"grpc"}, f"{example}: {component} {probe}")
                        self.assertEqual(c[probe]["grpc"]["port"], grpc_port,
                                         f"{component} {probe}")
                        services[probe] = c[probe]["grpc"]["service"]
                    # Readiness of a worker is "weights loaded, engine healthy, not draining": the
                    # kls.v1.Worker status, which the drain turns NOT_SERVING. Liveness is "".
                    want = "kls.v1.Worker" if component == "worker" else ""
                    self.assertEqual(services["readinessProbe"], want, f"{example}: {component}")
                    self.assertEqual(services["livenessProbe"], "", f"{example}: {component}")
                    self.assertEqual(services["startupProbe"], "", f"{example}: {component}")

    def test_gpu_limits_follow_the_backend(self):
        for example, values, objs in self.each():
            with self.subTest(example=example):
                worker = objs.workload("worker")
                c = container(worker)
                _, f = flags(c)
                gpus = values["worker"].get("gpus", 0)
                limits = c["resources"].get("limits", {})
                requests = c["resources"].get("requests", {})
                if values["worker"]["backend"] == "cuda":
                    self.assertGreaterEqual(gpus, 1)
                    self.assertEqual(limits.get("nvidia.com/gpu"), gpus, example)
                    self.assertEqual(f["--backend"], "cuda")
                    self.assertIn(values["worker"]["image"]["repository"], c["image"])
                    # Every running turn holds its session and a checkpoint on the GPU.
                    gpu_sessions = int(f["--gpu-max-sessions"])
                    self.assertEqual(gpu_sessions, values["worker"]["gpuMaxSessions"])
                    self.assertGreaterEqual(gpu_sessions, int(f["--max-running-turns"]))
                else:
                    self.assertEqual(f["--backend"], "cpu")
                    self.assertNotIn("--gpu-max-sessions", f, example)
                    self.assertNotIn("nvidia.com/gpu", limits, example)
                    self.assertNotIn("nvidia.com/gpu", requests, example)
                # No other container anywhere asks for a GPU.
                for w in objs.workloads():
                    for other in pod_spec(w)["containers"] + pod_spec(w).get("initContainers", []):
                        if other is c:
                            continue
                        self.assertNotIn("nvidia.com/gpu", str(other.get("resources", {})))

    def test_store_keeps_its_data_on_claims(self):
        for example, values, objs in self.each():
            with self.subTest(example=example):
                store = objs.workload("store")
                self.assertEqual(store["kind"], "StatefulSet")
                templates = {t["metadata"]["name"]: t
                             for t in store["spec"]["volumeClaimTemplates"]}
                self.assertIn("data", templates, example)
                claim = templates["data"]["spec"]
                self.assertEqual(claim["resources"]["requests"]["storage"],
                                 values["store"]["persistence"]["size"])
                self.assertEqual(claim["accessModes"], ["ReadWriteOnce"])
                mounts = {m["name"]: m["mountPath"] for m in container(store)["volumeMounts"]}
                _, f = flags(container(store))
                self.assertTrue(f["--data-dir"].startswith(mounts["data"] + "/"),
                                f"{example}: --data-dir {f['--data-dir']} is not on the claim")
                self.assertEqual(store["spec"]["persistentVolumeClaimRetentionPolicy"],
                                 {"whenDeleted": "Retain", "whenScaled": "Retain"})

    def test_pdbs_cover_every_component(self):
        for example, _, objs in self.each():
            with self.subTest(example=example):
                covered = set()
                for pdb in objs.all("PodDisruptionBudget"):
                    selected = objs.selected_workloads(pdb["spec"]["selector"]["matchLabels"])
                    self.assertEqual(len(selected), 1, f"{example}: {pdb['metadata']['name']}")
                    covered.add(selected[0]["metadata"]["labels"]["app.kubernetes.io/component"])
                    self.assertGreaterEqual(pdb["spec"]["maxUnavailable"], 1)
                want = {"worker", "store"} | ({"router"} if example == "gpu-production" else set())
                self.assertTrue(want <= covered, f"{example}: PDBs cover {covered}")

    def test_service_ports_match_container_ports(self):
        for example, _, objs in self.each():
            with self.subTest(example=example):
                for svc in objs.all("Service"):
                    name = svc["metadata"]["name"]
                    selected = objs.selected_workloads(svc["spec"]["selector"])
                    self.assertEqual(len(selected), 1, f"{example}: Service {name}")
                    c = container(selected[0])
                    for p in svc["spec"]["ports"]:
                        target = p["targetPort"]
                        self.assertIsInstance(target, str, f"{name}: use named target ports")
                        self.assertEqual(port_of(c, target), p["port"],
                                         f"{example}: {name}/{target}")
                        self.assertEqual(p["name"], target)

    def test_worker_grace_period_outlasts_the_drain(self):
        for example, values, objs in self.each():
            with self.subTest(example=example):
                worker = objs.workload("worker")
                _, f = flags(container(worker))
                drain = int(f["--drain-timeout"])
                self.assertEqual(drain, values["worker"]["drainTimeoutSeconds"])
                grace = pod_spec(worker)["terminationGracePeriodSeconds"]
                self.assertGreaterEqual(grace, drain + 10,
                                        f"{example}: grace {grace}, drain {drain}")

    def test_router_grace_period_outlasts_its_shutdown(self):
        # After the preStop sleep: up to 10 s for HTTP requests, then up to 5 s for gRPC calls.
        for example, _, objs in self.each():
            with self.subTest(example=example):
                router = objs.workload("router")
                sleep = container(router)["lifecycle"]["preStop"]["sleep"]["seconds"]
                self.assertGreaterEqual(sleep, 1, example)
                grace = pod_spec(router)["terminationGracePeriodSeconds"]
                self.assertGreaterEqual(grace, sleep + 15, f"{example}: grace {grace}")

    def test_backend_choices_exist_in_the_binary(self):
        with open(CHART / "values.schema.json") as f:
            schema = json.load(f)
        choices = schema["properties"]["worker"]["properties"]["backend"]["enum"]
        help_text = run([KLS, "worker", "--help"], check=True).stdout
        match = re.search(r"--backend TEXT:\{([a-z,]+)\}", help_text)
        self.assertIsNotNone(match, help_text)
        self.assertLessEqual(set(choices), set(match.group(1).split(",")))

    def test_workers_address_every_store_shard_by_its_stable_name(self):
        for example, values, objs in self.each():
            with self.subTest(example=example):
                store = objs.workload("store")
                replicas = store["spec"]["replicas"]
                self.assertEqual(replicas, values["store"]["replicas"])
                svc = objs.get("Service", store["spec"]["serviceName"])
                self.assertIsNotNone(svc, f"{example}: no Service {store['spec']['serviceName']}")
                self.assertEqual(svc["spec"]["clusterIP"], "None")  # headless: per-pod DNS
                self.assertTrue(svc["spec"]["publishNotReadyAddresses"])
                self.assertEqual(objs.selected_workloads(svc["spec"]["selector"]), [store])
                store_port = port_of(container(store), "grpc")
                _, f = flags(container(objs.workload("worker")))
                sts, headless = store["metadata"]["name"], svc["metadata"]["name"]
                want = [f"{sts}-{i}.{headless}.{NAMESPACE}.svc.{DOMAIN}:{store_port}"
                        for i in range(replicas)]
                self.assertEqual(f["--store"].split(","), want)
                replication = int(f["--store-replication"])
                self.assertEqual(replication, values["store"]["replication"])
                self.assertLessEqual(replication, replicas)
                self.assertEqual(listen_port(flags(container(store))[1]["--listen"]), store_port)

    def test_routers_find_the_workers_through_their_headless_service(self):
        for example, _, objs in self.each():
            with self.subTest(example=example):
                worker = objs.workload("worker")
                router = objs.workload("router")
                _, rf = flags(container(router))
                match = re.fullmatch(rf"dns:///([a-z0-9-]+)\.{NAMESPACE}\.svc\.{DOMAIN}:(\d+)",
                                     rf["--workers"])
                self.assertIsNotNone(match, rf["--workers"])
                svc = objs.get("Service", match.group(1))
                self.assertIsNotNone(svc, f"{example}: no Service {match.group(1)}")
                self.assertEqual(svc["spec"]["clusterIP"], "None")
                self.assertEqual(objs.selected_workloads(svc["spec"]["selector"]), [worker])
                wc = container(worker)
                self.assertEqual(int(match.group(2)), port_of(wc, "grpc"))
                _, wf = flags(wc)
                self.assertEqual(listen_port(wf["--listen"]), port_of(wc, "grpc"))
                self.assertEqual(listen_port(wf["--metrics-listen"]), port_of(wc, "metrics"))
                rc = container(router)
                self.assertEqual(listen_port(rf["--listen"]), port_of(rc, "grpc"))
                self.assertEqual(listen_port(rf["--http-listen"]), port_of(rc, "http"))

    def test_args_use_only_flags_the_kls_binary_has(self):
        for example, _, objs in self.each():
            with self.subTest(example=example):
                for w in objs.workloads():
                    spec = pod_spec(w)
                    for c in spec["containers"] + spec.get("initContainers", []):
                        command, f = flags(c)
                        unknown = set(f) - kls_flags(command)
                        self.assertFalse(unknown,
                                         f"{example}: kls {command} has no {sorted(unknown)}")

    def test_pods_run_unprivileged_with_read_only_roots(self):
        for example, _, objs in self.each():
            with self.subTest(example=example):
                for w in objs.workloads():
                    spec = pod_spec(w)
                    name = w["metadata"]["name"]
                    self.assertTrue(spec["securityContext"]["runAsNonRoot"], name)
                    self.assertGreater(spec["securityContext"]["runAsUser"], 0, name)
                    self.assertFalse(spec["automountServiceAccountToken"], name)
                    volumes = {v["name"]: v for v in spec["volumes"]}
                    for c in spec["containers"] + spec.get("initContainers", []):
                        sc = c["securityContext"]
                        self.assertTrue(sc["readOnlyRootFilesystem"], f"{name}/{c['name']}")
                        self.assertFalse(sc["allowPrivilegeEscalation"], f"{name}/{c['name']}")
                        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                    mounts = {m["mountPath"]: m["name"] for m in container(w)["volumeMounts"]}
                    self.assertIn("/tmp", mounts, f"{example}: {name} has no writable /tmp")
                    self.assertIn("emptyDir", volumes[mounts["/tmp"]])
                    self.assertIn("resources", container(w))

    def test_model_volume_is_read_only_and_matches_model_flag(self):
        for example, values, objs in self.each():
            with self.subTest(example=example):
                worker = objs.workload("worker")
                spec = pod_spec(worker)
                c = container(worker)
                _, f = flags(c)
                volumes = {v["name"]: v for v in spec["volumes"]}
                mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
                self.assertTrue(mount.get("readOnly"), example)
                self.assertTrue(f["--model"].startswith(mount["mountPath"]))
                source = values["model"]["source"]
                if source == "pvc":
                    pvc = volumes["model"]["persistentVolumeClaim"]
                    self.assertEqual(pvc["claimName"], values["model"]["pvc"]["claimName"])
                    self.assertTrue(pvc["readOnly"])
                    self.assertEqual(f["--model"], f"/models/{values['model']['path']}")
                elif source == "tiny":
                    init = spec["initContainers"][0]
                    command, initf = flags(init)
                    self.assertEqual(command, "make-model")
                    self.assertEqual(initf["--out"], f["--model"])
                    self.assertEqual(initf["--preset"], "tiny")

    def test_autoscalers_target_the_right_deployments(self):
        for example, values, objs in self.each():
            with self.subTest(example=example):
                for component in ("router", "worker"):
                    deployment = objs.workload(component)
                    hpa = objs.get("HorizontalPodAutoscaler", deployment["metadata"]["name"])
                    default = component == "router"  # values.yaml: routers autoscale
                    if not values[component].get("autoscaling", {}).get("enabled", default):
                        self.assertIsNone(hpa, f"{example}: {component}")
                        self.assertIn("replicas", deployment["spec"])
                        continue
                    self.assertIsNotNone(hpa, f"{example}: {component} has no HPA")
                    # The HPA owns the count: the Deployment must not reset it on every upgrade.
                    self.assertNotIn("replicas", deployment["spec"], f"{example}: {component}")
                    self.assertEqual(hpa["spec"]["scaleTargetRef"],
                                     {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]})
                    metric = hpa["spec"]["metrics"][0]
                    if component == "worker":
                        self.assertEqual(metric["type"], "Pods")
                        self.assertEqual(metric["pods"]["metric"]["name"],
                                         "kls_worker_queued_turns")
                        scale_down = hpa["spec"]["behavior"]["scaleDown"]
                        self.assertEqual(scale_down["policies"][0]["value"], 1)
                    else:
                        self.assertEqual(metric["resource"]["name"], "cpu")
                        self.assertIn("cpu", container(deployment)["resources"]["requests"])

    def test_service_monitor_scrapes_the_workers_metrics_port(self):
        docs, _ = render((str(EXAMPLES["gpu-production"]),))
        objs = Objects(docs)
        monitors = objs.all("ServiceMonitor")
        self.assertEqual(len(monitors), 1)
        monitor = monitors[0]
        self.assertEqual(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack")
        services = [s for s in objs.all("Service")
                    if monitor["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()]
        self.assertEqual(len(services), 1)
        self.assertIn("metrics", [p["name"] for p in services[0]["spec"]["ports"]])
        self.assertEqual(monitor["spec"]["endpoints"],
                         [{"port": "metrics", "path": "/metrics", "scheme": "http",
                           "interval": "15s"}])
        self.assertEqual(monitor["spec"]["namespaceSelector"], {"matchNames": [NAMESPACE]})
        self.assertEqual(Objects(render((str(EXAMPLES["cpu-small"]),))[0]).all("ServiceMonitor"),
                         [])

    def test_network_policies_isolate_store_and_workers(self):
        docs, _ = render((str(EXAMPLES["gpu-production"]),))
        objs = Objects(docs)
        policies = {}
        for p in objs.all("NetworkPolicy"):
            selected = objs.selected_workloads(p["spec"]["podSelector"]["matchLabels"])
            self.assertEqual(len(selected), 1)
            policies[selected[0]["metadata"]["labels"]["app.kubernetes.io/component"]] = p
        self.assertEqual(set(policies), {"router", "worker", "store"})

        def sources(rule):
            return [objs.selected_workloads(peer["podSelector"]["matchLabels"])[0]
                    ["metadata"]["labels"]["app.kubernetes.io/component"]
                    for peer in rule.get("from", []) if "podSelector" in peer]

        store_rules = policies["store"]["spec"]["ingress"]
        self.assertEqual(len(store_rules), 1)
        self.assertEqual(sources(store_rules[0]), ["worker"])
        self.assertEqual(store_rules[0]["ports"], [{"port": "grpc", "protocol": "TCP"}])
        grpc_rules = [r for r in policies["worker"]["spec"]["ingress"]
                      if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
        self.assertEqual(len(grpc_rules), 1)
        self.assertEqual(sources(grpc_rules[0]), ["router"])
        metrics_rule = [r for r in policies["worker"]["spec"]["ingress"] if r not in grpc_rules]
        self.assertEqual(metrics_rule[0]["from"][0]["namespaceSelector"]["matchLabels"],
                         {"kubernetes.io/metadata.name": "monitoring"})
        self.assertEqual(Objects(render((str(EXAMPLES["cpu-small"]),))[0]).all("NetworkPolicy"), [])


class VariantTest(unittest.TestCase):
    """Settings the examples do not use: the defaults, image volumes, KEDA, External, R = 1."""

    def test_chart_defaults_with_only_a_model_source(self):
        docs, _ = render((), ("model.source=tiny",))
        objs = Objects(docs)
        for doc in docs:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
        self.assertEqual({w["metadata"]["name"] for w in objs.workloads()},
                         {f"{RELEASE}-kls-router", f"{RELEASE}-kls-worker", f"{RELEASE}-kls-store"})
        self.assertEqual(len(objs.all("PodDisruptionBudget")), 3)
        self.assertIsNotNone(objs.get("HorizontalPodAutoscaler", f"{RELEASE}-kls-router"))
        self.assertIsNone(objs.get("HorizontalPodAutoscaler", f"{RELEASE}-kls-worker"))
        result = helm("lint", "--strict", CHART, "--set", "model.source=tiny")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_image_volume_model(self):
        sets = ("model.source=image", "model.image.reference=registry.example.com/models/kimi:1",
                "model.path=weights")
        # 1.31-1.34 only with the feature gate acknowledged; from 1.35 without.
        for kube, gate in [("1.31.0", True), ("1.34.3", True), ("1.35.0", False),
                           ("1.35.0", True)]:
            docs, _ = render((str(EXAMPLES["cpu-small"]),),
                             sets + (f"model.image.featureGateEnabled={str(gate).lower()}",), kube)
            worker = Objects(docs).workload("worker")
            kubernetes_validate.validate(worker, kube, strict=True)
            volume = next(v for v in pod_spec(worker)["volumes"] if v["name"] == "model")
            self.assertEqual(volume["image"], {"reference": "registry.example.com/models/kimi:1",
                                               "pullPolicy": "IfNotPresent"})
            self.assertEqual(flags(container(worker))[1]["--model"], "/models/weights")
            self.assertNotIn("initContainers", pod_spec(worker))

    def test_keda_scaled_object_replaces_the_hpa(self):
        docs, _ = render((str(EXAMPLES["gpu-production"]),),
                         ("worker.autoscaling.enabled=false", "worker.keda.enabled=true"))
        objs = Objects(docs)
        worker = objs.workload("worker")
        name = worker["metadata"]["name"]
        self.assertIsNone(objs.get("HorizontalPodAutoscaler", name))
        self.assertNotIn("replicas", worker["spec"])
        scaled = objs.get("ScaledObject", name)
        self.assertIsNotNone(scaled)
        spec = scaled["spec"]
        self.assertEqual(spec["scaleTargetRef"], {"apiVersion": "apps/v1", "kind": "Deployment",
                                                  "name": name})
        self.assertLessEqual(spec["minReplicaCount"], spec["maxReplicaCount"])
        trigger = spec["triggers"][0]
        self.assertEqual(trigger["type"], "prometheus")
        self.assertEqual(set(trigger["metadata"]), {"serverAddress", "query", "threshold"})
        query = f'sum(kls_worker_queued_turns{{namespace="{NAMESPACE}",service="{name}"}})'
        self.assertEqual(trigger["metadata"]["query"], query)
        self.assertEqual(set(spec), {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                                     "pollingInterval", "cooldownPeriod", "advanced", "triggers"})

    def test_keda_with_a_custom_query_needs_no_service_monitor(self):
        query = 'sum(kls_worker_queued_turns{job="kls-workers"})'
        docs, _ = render(BASE, ("worker.keda.enabled=true", f"worker.keda.query={query}"))
        objs = Objects(docs)
        self.assertEqual(objs.all("ServiceMonitor"), [])
        scaled = objs.get("ScaledObject", objs.workload("worker")["metadata"]["name"])
        self.assertEqual(scaled["spec"]["triggers"][0]["metadata"]["query"], query)

    def test_boundaries_that_are_accepted(self):
        cases = [
            # Grace = preStop sleep + 15 s: exactly enough.
            (BASE, ("router.terminationGracePeriodSeconds=20",)),
            (BASE, ("router.preStopSleepSeconds=0", "router.terminationGracePeriodSeconds=15")),
            # As many GPU sessions as running turns.
            (GPU, ("worker.gpuMaxSessions=128",)),
            # The CPU backend has no GPU sessions to fit.
            (BASE, ("worker.gpuMaxSessions=1",)),
            (BASE, ("worker.keda.enabled=true", "worker.keda.cooldownPeriod=3600",
                    "serviceMonitor.enabled=true")),
        ]
        for files, sets in cases:
            with self.subTest(sets=sets):
                docs, _ = render(files, sets)
                for doc in docs:
                    if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
                        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)

    def test_external_metric_and_computed_grace_period(self):
        docs, _ = render((str(EXAMPLES["gpu-production"]),),
                         ("worker.autoscaling.metric.type=External",
                          "worker.autoscaling.metric.selector.queue=kls",
                          "worker.terminationGracePeriodSeconds=null",
                          "worker.drainTimeoutSeconds=200"))
        objs = Objects(docs)
        worker = objs.workload("worker")
        hpa = objs.get("HorizontalPodAutoscaler", worker["metadata"]["name"])
        kubernetes_validate.validate(hpa, KUBE_VERSIONS[-1], strict=True)
        self.assertEqual(hpa["spec"]["metrics"][0]["external"]["metric"],
                         {"name": "kls_worker_queued_turns",
                          "selector": {"matchLabels": {"queue": "kls"}}})
        self.assertEqual(pod_spec(worker)["terminationGracePeriodSeconds"], 230)

    def test_single_copy_store_and_no_pdbs(self):
        docs, _ = render((str(EXAMPLES["cpu-small"]),),
                         ("store.replicas=1", "store.replication=1", "worker.pdb.enabled=false",
                          "store.pdb.enabled=false"))
        objs = Objects(docs)
        self.assertEqual(objs.all("PodDisruptionBudget"), [])
        _, f = flags(container(objs.workload("worker")))
        self.assertEqual(len(f["--store"].split(",")), 1)


# Bad values: (name, --set values, the substrings the error must contain, kube version,
# whether `helm lint` must fail too). lint does not fail on template `fail` calls (Helm 4 logs
# them), so the rules it must catch live in values.schema.json; the rest fail `helm template`
# (and so install and upgrade) with the chart's own message.
BASE = (str(EXAMPLES["cpu-small"]),)
GPU = (str(EXAMPLES["gpu-production"]),)
BAD_VALUES = [
    ("negative worker replicas", BASE, ["worker.replicas=-1"], ["/worker/replicas", "minimum"],
     True),
    ("negative router replicas", BASE, ["router.replicas=-2"], ["/router/replicas"], True),
    ("zero store replicas", BASE, ["store.replicas=0"], ["/store/replicas"], True),
    ("string replicas", BASE, ["router.replicas=two"], ["/router/replicas", "want integer"], True),
    ("missing model source", (), [], ["/model/source"], True),
    ("unknown model source", BASE, ["model.source=s3"], ["/model/source"], True),
    ("pvc without claim", BASE, ["model.source=pvc"], ["/model/pvc/claimName"], True),
    ("image without reference", BASE, ["model.source=image"], ["/model/image/reference"], True),
    ("gpus without worker image", BASE, ["worker.backend=cuda", "worker.gpus=1"],
     ["/worker/image/repository"], True),
    ("cuda backend without gpus", GPU, ["worker.gpus=0"], ["/worker/gpus", "minimum"], True),
    ("gpus on the cpu backend", BASE, ["worker.gpus=2"], ["/worker/gpus", "maximum"], True),
    ("gpu resource on the cpu backend", BASE, ["worker.resources.limits.nvidia\\.com/gpu=1"],
     ["/worker/resources/limits/nvidia.com~1gpu"], True),
    ("unknown backend", BASE, ["worker.backend=rocm"], ["/worker/backend"], True),
    ("typo in a key", BASE, ["worker.replica=3"], ["/worker", "'replica'"], True),
    ("replication above shards", BASE, ["store.replication=4"],
     ["/store/replication", "maximum: got 4, want 3"], True),
    ("store pdb takes every copy", BASE, ["store.pdb.maxUnavailable=2"],
     ["/store/pdb/maxUnavailable"], True),
    ("hpa and keda together", BASE, ["worker.autoscaling.enabled=true", "worker.keda.enabled=true"],
     ["/worker/keda/enabled"], True),
    ("router hpa without cpu request", BASE,
     ["router.autoscaling.enabled=true", "router.resources.requests=null"],
     ["/router/resources", "requests"], True),
    ("stuck rolling update", BASE, ["worker.rollingUpdate.maxSurge=0"],
     ["/worker/rollingUpdate/maxUnavailable"], True),
    ("port out of range", BASE, ["worker.grpcPort=70000"], ["/worker/grpcPort"], True),
    ("bad listen address", BASE, ["listenAddress=localhost"], ["/listenAddress"], True),
    ("root pods", BASE, ["podSecurityContext.runAsNonRoot=false"],
     ["/podSecurityContext/runAsNonRoot"], True),
    ("bad extra arg", BASE, ["worker.extraArgs[0]=rm -rf"], ["/worker/extraArgs/0"], True),
    # Cross-value rules JSON Schema cannot express: `helm template` (install, upgrade) fails.
    ("grace period shorter than the drain", BASE,
     ["worker.terminationGracePeriodSeconds=40", "worker.drainTimeoutSeconds=60"],
     ["worker.terminationGracePeriodSeconds=40", "worker.drainTimeoutSeconds=60"], False),
    ("grace period equal to the drain", BASE,
     ["worker.terminationGracePeriodSeconds=30", "worker.drainTimeoutSeconds=30"],
     ["worker.terminationGracePeriodSeconds=30", "worker.drainTimeoutSeconds=30"], False),
    ("hpa min above max", GPU, ["worker.autoscaling.minReplicas=20"],
     ["worker.autoscaling.minReplicas=20", "worker.autoscaling.maxReplicas=16"], False),
    ("router ports collide", BASE, ["router.httpPort=50051"],
     ["router.grpcPort", "router.httpPort", "50051"], False),
    ("worker ports collide", BASE, ["worker.metricsPort=50061"],
     ["worker.grpcPort", "worker.metricsPort"], False),
    ("pods metric with a selector", GPU, ["worker.autoscaling.metric.selector.a=b"],
     ["worker.autoscaling.metric.selector"], False),
    ("two gpus per worker", GPU, ["worker.gpus=2"], ["/worker/gpus", "maximum"], True),
    ("gpu resource with the cuda backend", GPU, ["worker.resources.requests.nvidia\\.com/gpu=1"],
     ["/worker/resources/requests/nvidia.com~1gpu"], True),
    ("keda cooldown beyond the hpa window", BASE, ["worker.keda.cooldownPeriod=3601"],
     ["/worker/keda/cooldownPeriod", "maximum"], True),
    ("more running turns than gpu sessions", GPU, ["worker.gpuMaxSessions=127"],
     ["worker.maxRunningTurns=128", "worker.gpuMaxSessions=127"], False),
    ("keda default query without the service monitor", BASE, ["worker.keda.enabled=true"],
     ["worker.keda.query", "serviceMonitor.enabled"], False),
    ("router grace shorter than its shutdown", BASE, ["router.terminationGracePeriodSeconds=19"],
     ["router.terminationGracePeriodSeconds=19", "router.preStopSleepSeconds=5"], False),
    ("router grace shorter than its shutdown without a sleep", BASE,
     ["router.preStopSleepSeconds=0", "router.terminationGracePeriodSeconds=14"],
     ["router.terminationGracePeriodSeconds=14", "router.preStopSleepSeconds=0"], False),
]


class BadValuesTest(unittest.TestCase):
    def expect_failure(self, args, needles):
        result = helm(*args)
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, f"helm {args[0]} accepted it:\n{output[:2000]}")
        for needle in needles:
            self.assertIn(needle, output)

    def test_each_bad_value_fails_naming_it(self):
        for name, files, sets, needles, lint_too in BAD_VALUES:
            common = [CHART, "--kube-version", KUBE_VERSIONS[-1]]
            for f in files:
                common += ["-f", f]
            for s in sets:
                common += ["--set", s]
            with self.subTest(case=name, command="template"):
                self.expect_failure(["template", RELEASE, *common], needles)
            if lint_too:
                with self.subTest(case=name, command="lint"):
                    self.expect_failure(["lint", "--strict", *common], needles)

    def test_image_volume_needs_kubernetes_1_31(self):
        # Not even with the feature gate: the field does not exist before 1.31.
        result = helm("template", RELEASE, CHART, "-f", BASE[0], "--kube-version", "1.30.0",
                      "--set", "model.source=image", "--set", "model.image.reference=r/m:1",
                      "--set", "model.image.featureGateEnabled=true")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("model.source=image needs Kubernetes >= 1.31", result.stderr)

    def test_image_volume_before_1_35_needs_the_feature_gate(self):
        # The gate is off by default before 1.35: an API server without it drops `image:` and
        # rejects the pod, so the chart wants the user to say the gate is on.
        for kube in ("1.31.0", "1.33.0", "1.34.9"):
            with self.subTest(kube=kube):
                result = helm("template", RELEASE, CHART, "-f", BASE[0], "--kube-version", kube,
                              "--set", "model.source=image", "--set", "model.image.reference=r/m:1")
                self.assertNotEqual(result.returncode, 0, result.stdout[:2000])
                self.assertIn("model.image.featureGateEnabled=true", result.stderr)
                self.assertIn(f"Kubernetes v{kube}", result.stderr)

    def test_chart_refuses_clusters_older_than_its_kube_version(self):
        result = helm("template", RELEASE, CHART, "-f", BASE[0], "--kube-version", "1.29.0")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("1.29", result.stderr)


def main():
    global KLS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kls", required=True, help="the kls binary (for its flags)")
    args, rest = parser.parse_known_args()
    KLS = args.kls
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)


if __name__ == "__main__":
    main()
