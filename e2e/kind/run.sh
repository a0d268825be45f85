#!/usr/bin/env bash
# lmforge on kind: real kubelets and real containers instead of kwok's simulated pods.
#
#   e2e/kind/run.sh            create a kind cluster, build + load the images, install the chart,
#                              run the scenarios below, delete the cluster
#   e2e/kind/run.sh --check    only say whether this machine can run it ("SKIP: <why>" or "ready")
#
# Without Docker (a reachable daemon) or kind it prints "SKIP: <why>" and exits 0.
# Environment: KIND_CLUSTER (default lmforge-e2e), KEEP_CLUSTER=1 (leave it running),
# LMFORGE_KIND_RUNTIME=1 (also build the CUDA runtime image: several GB, needs no GPU to build),
# KIND_NODE_IMAGE (kind's --image), TIMEOUT (per wait, default 180s).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-lmforge-e2e}"
TAG="e2e"
TIMEOUT="${TIMEOUT:-180s}"
RELEASE="lmforge"
SYSTEM_NS="lmforge-system"
WORK_NS="lmforge-kind-e2e"
OPERATOR_IMAGE="ghcr.io/lmforge/operator:${TAG}"
RUNTIME_IMAGE="ghcr.io/lmforge/runtime:${TAG}"
# kubectl and helm: from PATH, else the ones `lmforge cluster up` built
CACHE_BIN="$(find "${LMFORGE_CACHE_DIR:-$HOME/.cache/lmforge}/bin" -mindepth 1 -maxdepth 1 -type d -name 'v*' 2>/dev/null \
  | sort | tail -n 1 || true)"
export PATH="${PATH}:${CACHE_BIN}"

skip() { echo "SKIP: $*"; exit 0; }
log() { echo ">> $*"; }

preflight() {
  command -v docker >/dev/null 2>&1 || skip "docker is not installed: the kind e2e needs Docker (the local-cluster e2e in e2e/ covers the rest)"
  docker info >/dev/null 2>&1 || skip "no Docker daemon reachable ('docker info' failed): the kind e2e needs one"
  command -v kind >/dev/null 2>&1 || skip "kind is not installed (https://kind.sigs.k8s.io): the kind e2e needs it"
  command -v kubectl >/dev/null 2>&1 || skip "kubectl not found on PATH nor in ${CACHE_BIN:-the lmforge cache}"
  command -v helm >/dev/null 2>&1 || skip "helm not found on PATH nor in ${CACHE_BIN:-the lmforge cache}"
}

preflight
if [[ "${1:-}" == "--check" ]]; then
  echo "ready"
  exit 0
fi

KUBECONFIG="$(mktemp -d)/kubeconfig"
export KUBECONFIG
OPERATOR_LOG="$(mktemp)"

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "FAILED; operator logs:"
    kubectl -n "$SYSTEM_NS" logs "deployment/${RELEASE}" --all-containers --tail=200 2>/dev/null || true
    kubectl -n "$WORK_NS" get all,trainjobs,events 2>/dev/null | tail -n 60 || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != "1" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else
    log "cluster kept: kind get kubeconfig --name $CLUSTER"
  fi
  exit $rc
}
trap cleanup EXIT

log "kind cluster ${CLUSTER}"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"

log "building ${OPERATOR_IMAGE}"
DOCKER_BUILDKIT=1 docker build -f "$ROOT/images/operator/Dockerfile" -t "$OPERATOR_IMAGE" "$ROOT"
kind load docker-image "$OPERATOR_IMAGE" --name "$CLUSTER"
if [[ "${LMFORGE_KIND_RUNTIME:-0}" == "1" ]]; then
  log "building ${RUNTIME_IMAGE}"
  DOCKER_BUILDKIT=1 docker build -f "$ROOT/images/runtime/Dockerfile" -t "$RUNTIME_IMAGE" "$ROOT"
  kind load docker-image "$RUNTIME_IMAGE" --name "$CLUSTER"
  docker run --rm "$RUNTIME_IMAGE" --help >/dev/null
fi

log "helm install (2 replicas, peering, the chart's own RBAC)"
helm install "$RELEASE" "$ROOT/charts/lmforge" -n "$SYSTEM_NS" --create-namespace \
  --set image.tag="$TAG" --set image.pullPolicy=Never --set runtimeImage.tag="$TAG" \
  --wait --timeout "$TIMEOUT"
kubectl -n "$SYSTEM_NS" rollout status "deployment/${RELEASE}" --timeout "$TIMEOUT"

log "scenario 1: the real pods pass their probes as non-root with a read-only root filesystem"
uid="$(kubectl -n "$SYSTEM_NS" exec "deployment/${RELEASE}" -- python -c 'import os; print(os.getuid())')"
[[ "$uid" == "65532" ]] || { echo "operator runs as uid $uid"; exit 1; }
kubectl -n "$SYSTEM_NS" exec "deployment/${RELEASE}" -- python -c \
  "import sys; sys.exit(0 if any(f.split()[1] == '/' and 'ro' in f.split()[3].split(',') for f in open('/proc/mounts')) else 1)" \
  || { echo "the operator's root filesystem is not read-only"; exit 1; }
peers() { kubectl get clusterkopfpeering lmforge -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("status") or {}))'; }
for _ in $(seq 60); do [[ "$(peers 2>/dev/null || echo 0)" == "2" ]] && break; sleep 2; done
[[ "$(peers)" == "2" ]] || { echo "expected 2 peers in ClusterKopfPeering lmforge"; exit 1; }

log "scenario 2: a TrainJob gang of 2 real pods runs to Succeeded (bring-your-own command)"
kubectl create namespace "$WORK_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f - <<YAML
apiVersion: lmforge.dev/v1alpha1
kind: TrainJob
metadata: {name: hello, namespace: ${WORK_NS}}
spec:
  model: /tmp/model
  dataset: {source: /tmp/data.jsonl}
  output: {dir: /tmp/out}
  numNodes: 2
  image: ${OPERATOR_IMAGE}
  command: ["python", "-c", "import os; print('rank', os.environ['NODE_RANK'], 'of', os.environ['WORLD_SIZE'])"]
YAML
kubectl -n "$WORK_NS" wait trainjob/hello --for=jsonpath='{.status.phase}'=Succeeded --timeout "$TIMEOUT"
kubectl -n "$WORK_NS" get trainjob hello

log "scenario 3: an InferenceService gets its Deployment, Service and status"
kubectl apply -f - <<YAML
apiVersion: lmforge.dev/v1alpha1
kind: InferenceService
metadata: {name: chat, namespace: ${WORK_NS}}
spec:
  model: {source: /tmp}  # a node directory; the pod needs the runtime image to start
  replicas: 1
YAML
kubectl -n "$WORK_NS" wait lmisvc/chat --for=jsonpath='{.status.observedGeneration}'=1 --timeout "$TIMEOUT"
kubectl -n "$WORK_NS" get deployment/chat service/chat

log "scenario 4: the operator's own RBAC never refused it"
kubectl -n "$SYSTEM_NS" logs "deployment/${RELEASE}" --all-containers > "$OPERATOR_LOG" || true
for pod in $(kubectl -n "$SYSTEM_NS" get pods -l "app.kubernetes.io/instance=${RELEASE}" -o name); do
  kubectl -n "$SYSTEM_NS" logs "$pod" >> "$OPERATOR_LOG"
done
if grep -Eq '\b403\b|[Ff]orbidden|Not enough permissions' "$OPERATOR_LOG"; then
  grep -E '\b403\b|[Ff]orbidden|Not enough permissions' "$OPERATOR_LOG" | head -n 20
  exit 1
fi

kubectl -n "$WORK_NS" delete trainjob,lmisvc --all --timeout "$TIMEOUT"
helm uninstall "$RELEASE" -n "$SYSTEM_NS" --wait --timeout "$TIMEOUT"
log "kind e2e passed"
