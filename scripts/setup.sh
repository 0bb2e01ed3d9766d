#!/usr/bin/env bash
# Idempotent project setup: a project-local Python venv with exactly the PyTorch that
# tch 0.24.0 is built against (2.11.0) and transformers (for the interop test), and the
# `.libtorch` link that .cargo/config.toml points LIBTORCH at. About 90 s and 4.8 GB the
# first time; instant afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.24.0
PYTHON=${PYTHON:-python3}
VENV=.venv

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found; install Python 3.9+ (or set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust from https://rustup.rs" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

have=$("$VENV/bin/python" -c 'import numpy, torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" != "$TORCH_VERSION" ]; then
  # PyPI's Linux torch wheel brings its CUDA libraries: 4.7 GB installed. Say so up front
  # rather than let pip fail half-way with ENOSPC; --no-cache-dir keeps pip from holding
  # a second copy of the wheels.
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
    echo "setup: torch==$TORCH_VERSION needs about 6 GB free in $(pwd) (4.7 GB installed plus" \
      "unpacking); only $((free_kb / 1024)) MB are free. Free some space (old target/ or" \
      "temporary clones) and run scripts/setup.sh again." >&2
    exit 1
  fi
  echo "setup: installing torch==$TORCH_VERSION into $VENV (about 60 s, 4.7 GB, once)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    "torch==$TORCH_VERSION" numpy
fi

# transformers: the Hugging Face interop test (tests/hf_cli.rs) checks our exports and
# imports against it.
have=$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)
if [ "$have" != "$TRANSFORMERS_VERSION" ]; then
  echo "setup: installing transformers==$TRANSFORMERS_VERSION into $VENV (once)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    "transformers==$TRANSFORMERS_VERSION"
fi

# grafana-foundation-sdk (Grafana's dashboard builders, no dependencies):
# deploy/grafana/dashboard.py generates the dashboard with it and tests/deploy_cli.rs
# checks the committed JSON is its output (the check says it skipped without it).
GRAFANA_SDK_VERSION='1769699796!10.4.0'
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("grafana-foundation-sdk"))' 2>/dev/null || true)
if [ "$have" != "$GRAFANA_SDK_VERSION" ]; then
  echo "setup: installing grafana-foundation-sdk==$GRAFANA_SDK_VERSION into $VENV (once)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    "grafana-foundation-sdk==$GRAFANA_SDK_VERSION" \
    || echo "setup: could not install grafana-foundation-sdk; the dashboard generator check will be skipped" >&2
fi

# promtool (Debian's prometheus package): tests/deploy_cli.rs checks deploy/prometheus with
# it. Installed only where this can (root with apt-get); elsewhere that test says it skipped.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing prometheus (promtool) from Debian (once)" >&2
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || echo "setup: could not install prometheus; the promtool checks will be skipped" >&2
fi

# deploy/kubernetes: tests/kubernetes_cli.rs renders the kustomizations with pykustomize
# (kustomize's Go library, bundled; its metadata asks for Python 3.14 but it is plain
# Python over cffi and runs on 3.11, hence --ignore-requires-python) and validates them
# with kubernetes-validate (the Kubernetes API schemas, bundled); PodMonitors against the
# Prometheus Operator CRD schema from npm's @kubernetes-models/prometheus-operator, in
# .venv/npm. Without them that test says it skipped.
K8S_VALIDATE_VERSION=1.37.0
PYKUSTOMIZE_VERSION=0.1.4
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"), m.version("pykustomize"))' 2>/dev/null || true)
if [ "$have" != "$K8S_VALIDATE_VERSION $PYKUSTOMIZE_VERSION" ]; then
  echo "setup: installing kubernetes-validate==$K8S_VALIDATE_VERSION and pykustomize==$PYKUSTOMIZE_VERSION into $VENV (once)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --ignore-requires-python \
    "kubernetes-validate==$K8S_VALIDATE_VERSION" "pykustomize==$PYKUSTOMIZE_VERSION" "cffi==2.1.1" \
    || echo "setup: could not install kubernetes-validate/pykustomize; the Kubernetes manifest checks will be skipped" >&2
fi
PROM_OPERATOR_MODELS_VERSION=6.0.0
have=$(cat "$VENV/npm/node_modules/@kubernetes-models/prometheus-operator/package.json" 2>/dev/null \
  | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["version"])' 2>/dev/null || true)
if [ "$have" != "$PROM_OPERATOR_MODELS_VERSION" ] && command -v npm >/dev/null; then
  echo "setup: installing @kubernetes-models/prometheus-operator@$PROM_OPERATOR_MODELS_VERSION into $VENV/npm (once)" >&2
  mkdir -p "$VENV/npm"
  npm install --prefix "$VENV/npm" --no-audit --no-fund --silent \
    "@kubernetes-models/prometheus-operator@$PROM_OPERATOR_MODELS_VERSION" >/dev/null 2>&1 \
    || echo "setup: could not install @kubernetes-models/prometheus-operator; PodMonitor validation will be skipped" >&2
fi

# Slurm and munge (Debian's slurm-wlm): tests/slurm_cli.rs runs deploy/slurm's batch script on
# a private slurmctld + slurmd + munged. Installed only where this can (root with apt-get);
# elsewhere that test says it skipped. The test starts daemons of its own (own config, key,
# socket and ports); the packages' system services are not used.
if { [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ] \
  || ! command -v sbatch >/dev/null; } && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing slurm-wlm and munge from Debian (once)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || echo "setup: could not install slurm-wlm/munge; the Slurm test will be skipped" >&2
fi

torch_dir=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
if [ "$(readlink .libtorch 2>/dev/null || true)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" .libtorch
fi
echo "setup: libtorch $TORCH_VERSION at $torch_dir" >&2
