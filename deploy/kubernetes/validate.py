#!/usr/bin/env python3
"""Renders kustomizations and validates every resource they produce, offline.

    .venv/bin/python deploy/kubernetes/validate.py [--json OUT] [--npm DIR] DIR...

Rendering is kustomize's own Go library (`pykustomize`, which bundles it), the same build
`kubectl apply -k` runs. Core kinds are validated against the Kubernetes API's OpenAPI
schema in strict mode (unknown fields are errors) with `kubernetes-validate`, for the oldest
and the newest Kubernetes it bundles that the manifests target. Prometheus Operator kinds
(monitoring.coreos.com) are validated against the operator's CRD schema as compiled in the
npm package `@kubernetes-models/prometheus-operator`, run with node from DIR/node_modules
(--npm; scripts/setup.sh installs it into .venv/npm); without node or the package they are
skipped with a line saying so. Prints one line per resource and version; exits 1 if any
is invalid. `--json OUT` writes {DIR: [resources]} for tests/kubernetes_cli.rs.
`--self-test` checks that broken resources are rejected.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys

import kubernetes_validate
from pykustomize import build_json

# Kubernetes versions to validate against: elastic Indexed Jobs and the completion-index pod
# label need 1.29 or later; the newest is whatever kubernetes-validate bundles.
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
OPERATOR_GROUP = "monitoring.coreos.com/"
PACKAGE = "@kubernetes-models/prometheus-operator"

NODE_CHECK = r"""
import { existsSync } from "node:fs";
import { pathToFileURL } from "node:url";
const [root] = process.argv.slice(1);
const resources = JSON.parse(await new Promise((ok) => {
  let s = ""; process.stdin.on("data", (d) => (s += d)); process.stdin.on("end", () => ok(s));
}));
const out = [];
for (const r of resources) {
  const file = `${root}/${r.apiVersion}/${r.kind}.js`;
  if (!existsSync(file)) { out.push(`no schema for ${r.apiVersion} ${r.kind} in the package`); continue; }
  const model = (await import(pathToFileURL(file).href))[r.kind];
  try { new model(r).validate(); out.push(null); } catch (e) { out.push(String(e.message || e)); }
}
console.log(JSON.stringify(out));
"""


def name(r):
    return f"{r.get('kind')}/{r.get('metadata', {}).get('name')}"


def check_core(resources, label):
    """Validates core kinds; returns the number of failures."""
    bad = 0
    for r in resources:
        if r.get("apiVersion", "").startswith(OPERATOR_GROUP):
            continue
        for version in VERSIONS:
            try:
                got = kubernetes_validate.validate(r, version, strict=True)
                print(f"ok {label} {name(r)} (Kubernetes {got}, strict)")
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                print(f"INVALID {label} {name(r)} (Kubernetes {e.version}): {path}: {e.message}")
                bad += 1
            except kubernetes_validate.SchemaNotFoundError as e:
                print(f"INVALID {label} {name(r)}: {e.message}")
                bad += 1
    return bad


def check_operator(resources, label, npm_dir):
    """Validates monitoring.coreos.com kinds; returns the number of failures."""
    crs = [r for r in resources if r.get("apiVersion", "").startswith(OPERATOR_GROUP)]
    if not crs:
        return 0
    root = os.path.join(npm_dir or "", "node_modules", PACKAGE)
    node = shutil.which("node")
    if node is None or not os.path.isdir(root):
        why = "node not found" if node is None else f"{PACKAGE} not installed (--npm DIR: DIR/node_modules)"
        for r in crs:
            print(f"SKIPPED: {label} {name(r)} not validated against the Prometheus Operator CRD schema: {why}")
        return 0
    with open(os.path.join(root, "package.json")) as f:
        version = json.load(f)["version"]
    run = subprocess.run(
        [node, "--input-type=module", "-e", NODE_CHECK, os.path.abspath(root)],
        input=json.dumps(crs), capture_output=True, text=True, check=False,
    )
    if run.returncode != 0:
        print(f"INVALID {label}: the CRD validator failed: {run.stderr.strip()}")
        return len(crs)
    bad = 0
    for r, err in zip(crs, json.loads(run.stdout)):
        if err is None:
            print(f"ok {label} {name(r)} (Prometheus Operator CRD schema, {PACKAGE} {version})")
        else:
            print(f"INVALID {label} {name(r)} (Prometheus Operator CRD schema): {err}")
            bad += 1
    return bad


def self_test(npm_dir):
    """Broken resources must be rejected (so a pass means something)."""
    def job(container):
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "broken"},
                "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                    {"name": "c", "image": "x", **container}]}}}}
    broken = [("an unknown field", job({"unknownField": 1})), ("args not a list", job({"args": "x"}))]
    for what, r in broken:
        if check_core([r], "self-test") != len(VERSIONS):
            print(f"FAIL self-test: kubernetes-validate accepted a Job with {what}")
            return 1
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "broken"},
               "spec": {"podMetricsEndpoints": [{"port": 9100, "interval": "often"}]}}
    root = os.path.join(npm_dir or "", "node_modules", PACKAGE)
    if check_operator([monitor], "self-test", npm_dir) != 1 and shutil.which("node") and os.path.isdir(root):
        print("FAIL self-test: the CRD validator accepted a broken PodMonitor")
        return 1
    print("self-test: broken resources are rejected")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="*")
    p.add_argument("--json", help="write the rendered resources here")
    p.add_argument("--npm", help="directory whose node_modules holds " + PACKAGE)
    p.add_argument("--self-test", action="store_true")
    a = p.parse_args()
    if a.self_test:
        return self_test(a.npm)
    rendered, bad = {}, 0
    for d in a.dirs:
        resources = asyncio.run(build_json(d)).resources
        print(f"rendered {d}: {len(resources)} resources")
        rendered[d] = resources
        bad += check_core(resources, d) + check_operator(resources, d, a.npm)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rendered, f)
    print(f"{'FAILED' if bad else 'valid'}: {bad} invalid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
