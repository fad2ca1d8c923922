#!/usr/bin/env bash
# The in-place upgrade end to end on real infrastructure: a kind management cluster running
# Cluster API with CAPD and capd-inplace, and a ClusterClass workload cluster of real kindest/node
# containers that is bumped one Kubernetes minor version and must be upgraded in place.
#
#   1. kind management cluster with the host's Docker socket (e2e/kind/kind-management.yaml)
#   2. clusterctl init --infrastructure docker, with EXP_IN_PLACE_UPDATES, EXP_RUNTIME_SDK and
#      CLUSTER_TOPOLOGY on (clusterctl also installs cert-manager)
#   3. build the capd-inplace image, kind load it, apply config/default
#   4. wait until CAPI has discovered the extension (ExtensionConfig condition Discovered)
#   5. create the workload cluster at KUBERNETES_VERSION_FROM (3 control-plane + 2 worker
#      Machines by default) and install Calico
#   6. record every Machine's name and its container's ID, bump spec.topology.version to
#      KUBERNETES_VERSION_TO, and wait until every Machine is UpToDate
#   7. assert: the same Machine names, the same container IDs, every Node's kubelet at the new
#      version and schedulable
#
# It needs a machine that can pull images (Docker Hub, registry.k8s.io, quay.io for Calico) and
# reach GitHub (clusterctl's provider manifests), plus kind, kubectl, clusterctl, docker and curl.
# It checks all of that first and stops with a clear message when something is missing.
#
# Settings: e2e/kind/e2e.env (every value can be overridden from the environment).
# It uses its own kubeconfig files in a temporary directory and never touches ~/.kube/config.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
# shellcheck source=SCRIPTDIR/../e2e/kind/e2e.env
source "$repo_root/e2e/kind/e2e.env"

EXTENSION_NAMESPACE=capd-inplace-system
EXTENSION_DEPLOYMENT=capd-inplace-controller-manager
EXTENSION_CONFIG=capd-inplace
POLL_SECONDS=10

log() { printf '[e2e-kind %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------

# Prints "MAJOR MINOR PATCH" of a vX.Y.Z version, or fails.
semver_fields() {
  if [[ "$1" =~ ^v([0-9]+)\.([0-9]+)\.([0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[3]}"
  else
    return 1
  fi
}

check_prerequisites() {
  local missing=() tool
  for tool in kind kubectl clusterctl docker curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    die "missing tools: ${missing[*]}. Install kind (https://kind.sigs.k8s.io), kubectl, clusterctl v1.12 or newer (https://cluster-api.sigs.k8s.io), Docker and curl."
  fi
  if [ "${BASH_VERSINFO[0]}" -lt 4 ]; then
    die "bash 4 or newer is required (associative arrays)"
  fi
  docker info >/dev/null 2>&1 || die "no Docker Engine answers; start Docker first"
  if [ ! -S /var/run/docker.sock ]; then
    die "/var/run/docker.sock is not a socket on this host; the kind management cluster mounts it for CAPD and capd-inplace (rootless Docker and remote DOCKER_HOST are not supported)"
  fi

  local clusterctl_version fields major minor _patch
  clusterctl_version="$(clusterctl version -o short 2>/dev/null || true)"
  fields="$(semver_fields "$clusterctl_version")" ||
    die "cannot read clusterctl's version (got '${clusterctl_version}')"
  read -r major minor _patch <<<"$fields"
  if [ "$major" -lt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -lt 12 ]; }; then
    die "clusterctl ${clusterctl_version} is too old: in-place updates need Cluster API v1.12 or newer"
  fi

  local from_major from_minor from_patch to_major to_minor to_patch
  fields="$(semver_fields "$KUBERNETES_VERSION_FROM")" ||
    die "KUBERNETES_VERSION_FROM='${KUBERNETES_VERSION_FROM}' is not vMAJOR.MINOR.PATCH"
  read -r from_major from_minor from_patch <<<"$fields"
  fields="$(semver_fields "$KUBERNETES_VERSION_TO")" ||
    die "KUBERNETES_VERSION_TO='${KUBERNETES_VERSION_TO}' is not vMAJOR.MINOR.PATCH"
  read -r to_major to_minor to_patch <<<"$fields"
  if [ "$from_major" -ne "$to_major" ] ||
    [ $((to_minor - from_minor)) -gt 1 ] ||
    [ $((to_minor * 100000 + to_patch)) -le $((from_minor * 100000 + from_patch)) ]; then
    die "${KUBERNETES_VERSION_FROM} -> ${KUBERNETES_VERSION_TO} is not an upgrade of at most one minor version"
  fi

  local url code
  for url in https://github.com https://registry.k8s.io/v2/ https://dl.k8s.io/release/stable.txt; do
    code="$(curl -s -o /dev/null -m 15 -w '%{http_code}' "$url" || true)"
    if [ -z "$code" ] || [ "$code" = "000" ]; then
      die "cannot reach ${url}: this script needs network access to GitHub, registry.k8s.io and dl.k8s.io"
    fi
  done
  # Pulling the node images now proves that this Docker Engine can pull, and saves CAPD the
  # wait later (it creates the node containers through the same engine).
  local image
  for image in "kindest/node:${KUBERNETES_VERSION_FROM}" "kindest/node:${KUBERNETES_VERSION_TO}"; do
    log "pulling ${image}"
    docker pull -q "$image" >/dev/null ||
      die "cannot pull ${image}: this script needs a Docker Engine that can pull from Docker Hub (and a kindest/node image for that version)"
  done

  if kind get clusters 2>/dev/null | grep -qx "$MANAGEMENT_CLUSTER_NAME"; then
    die "a kind cluster named ${MANAGEMENT_CLUSTER_NAME} already exists; delete it (kind delete cluster --name ${MANAGEMENT_CLUSTER_NAME}) or set MANAGEMENT_CLUSTER_NAME"
  fi
  case "$IMAGE_BUILD" in
    docker | local) ;;
    *) die "IMAGE_BUILD must be 'docker' or 'local', not '${IMAGE_BUILD}'" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

# wait_until DESCRIPTION TIMEOUT_SECONDS COMMAND...: runs COMMAND every POLL_SECONDS until it
# succeeds; fails the run after TIMEOUT_SECONDS.
wait_until() {
  local description="$1" timeout="$2"
  shift 2
  local deadline=$((SECONDS + timeout))
  log "waiting up to ${timeout}s: ${description}"
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "timed out after ${timeout}s: ${description}"
    fi
    sleep "$POLL_SECONDS"
  done
}

workload_kubectl() {
  kubectl --kubeconfig "$workdir/workload.kubeconfig" "$@"
}

# "name providerID version" for each Machine of the workload cluster.
list_machines() {
  kubectl get machines -n "$WORKLOAD_NAMESPACE" \
    -l "cluster.x-k8s.io/cluster-name=${WORKLOAD_CLUSTER_NAME}" \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.providerID}{" "}{.spec.version}{"\n"}{end}'
}

# The status of condition $2 on Machine $1 (v1beta2 conditions), or empty.
machine_condition() {
  kubectl get machine "$1" -n "$WORKLOAD_NAMESPACE" \
    -o jsonpath="{.status.conditions[?(@.type==\"$2\")].status}"
}

container_id() {
  docker inspect -f '{{.Id}}' "$1"
}

workload_kubeconfig_ready() {
  clusterctl get kubeconfig "$WORKLOAD_CLUSTER_NAME" -n "$WORKLOAD_NAMESPACE" \
    >"$workdir/workload.kubeconfig" 2>/dev/null || return 1
  # The kubeconfig names the load balancer's address on the Docker network; point it at the
  # port Docker publishes on the host instead, which works on Linux and on Docker Desktop.
  local published
  published="$(docker port "${WORKLOAD_CLUSTER_NAME}-lb" 6443/tcp 2>/dev/null | head -n1)" || return 1
  [ -n "$published" ] || return 1
  published="${published/0.0.0.0/127.0.0.1}"
  kubectl config set-cluster "$WORKLOAD_CLUSTER_NAME" --kubeconfig "$workdir/workload.kubeconfig" \
    --server "https://${published}" >/dev/null
  workload_kubectl get --raw /readyz >/dev/null 2>&1
}

machines_ready() {
  local count=0 name _provider _version
  while read -r name _provider _version; do
    [ -n "$name" ] || continue
    count=$((count + 1))
    [ "$(machine_condition "$name" Ready)" = "True" ] || return 1
  done < <(list_machines)
  [ "$count" -eq "$expected_machines" ]
}

# Fails the whole run as soon as a Machine appears that was not there before the bump: that is
# CAPI replacing a Machine, which means the extension declined or was not asked.
no_replacement_machines() {
  local name _provider _version
  while read -r name _provider _version; do
    [ -n "$name" ] || continue
    if [ -z "${container_before[$name]+set}" ]; then
      die "Machine ${name} was created during the upgrade: CAPI fell back to a rollout instead of updating in place (see the extension's logs and the Machines' UpToDate and Updating conditions)"
    fi
  done < <(list_machines)
}

machines_upgraded() {
  no_replacement_machines
  local count=0 done_count=0 name _provider version
  while read -r name _provider version; do
    [ -n "$name" ] || continue
    count=$((count + 1))
    if [ "$version" = "$KUBERNETES_VERSION_TO" ] &&
      [ "$(machine_condition "$name" UpToDate)" = "True" ] &&
      [ "$(machine_condition "$name" Updating)" != "True" ]; then
      done_count=$((done_count + 1))
    fi
  done < <(list_machines)
  if [ $((SECONDS - last_progress)) -ge 60 ]; then
    log "progress: ${done_count}/${expected_machines} Machines up to date at ${KUBERNETES_VERSION_TO}"
    last_progress=$SECONDS
  fi
  [ "$count" -eq "$expected_machines" ] && [ "$done_count" -eq "$expected_machines" ]
}

on_exit() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -n "${workdir:-}" ] && [ -f "$workdir/management.kubeconfig" ]; then
    log "diagnostics (clusters kept; KUBECONFIG=${workdir}/management.kubeconfig):"
    kubectl get machines -A -o wide >&2 || true
    kubectl get extensionconfig "$EXTENSION_CONFIG" -o yaml >&2 || true
    kubectl -n "$EXTENSION_NAMESPACE" logs "deploy/${EXTENSION_DEPLOYMENT}" --tail=200 >&2 || true
    log "clean up with: kubectl delete cluster ${WORKLOAD_CLUSTER_NAME} -n ${WORKLOAD_NAMESPACE}; kind delete cluster --name ${MANAGEMENT_CLUSTER_NAME}"
  fi
}

# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

log "checking prerequisites"
check_prerequisites

workdir="$(mktemp -d "${TMPDIR:-/tmp}/capd-inplace-e2e-kind.XXXXXX")"
export KUBECONFIG="$workdir/management.kubeconfig"
trap on_exit EXIT
expected_machines=$((CONTROL_PLANE_MACHINE_COUNT + WORKER_MACHINE_COUNT))
log "work directory ${workdir}"

log "1/7 creating the kind management cluster ${MANAGEMENT_CLUSTER_NAME}"
kind create cluster --name "$MANAGEMENT_CLUSTER_NAME" --config e2e/kind/kind-management.yaml \
  --kubeconfig "$KUBECONFIG" --wait 180s

log "2/7 clusterctl init with CAPD and the in-place feature gates (installs cert-manager too)"
provider_args=(--infrastructure "docker${CAPI_VERSION:+:${CAPI_VERSION}}")
if [ -n "$CAPI_VERSION" ]; then
  provider_args+=(--core "cluster-api:${CAPI_VERSION}" --bootstrap "kubeadm:${CAPI_VERSION}"
    --control-plane "kubeadm:${CAPI_VERSION}")
fi
EXP_IN_PLACE_UPDATES=true EXP_RUNTIME_SDK=true CLUSTER_TOPOLOGY=true \
  clusterctl init "${provider_args[@]}" --wait-providers --wait-provider-timeout "$TIMEOUT_PROVIDERS"
kubectl -n cert-manager wait deployment --all --for=condition=Available --timeout="${TIMEOUT_PROVIDERS}s"
for manager in capi-system/capi-controller-manager \
  capi-kubeadm-control-plane-system/capi-kubeadm-control-plane-controller-manager; do
  args="$(kubectl -n "${manager%%/*}" get deployment "${manager#*/}" -o jsonpath='{.spec.template.spec.containers[0].args}')"
  [[ "$args" == *InPlaceUpdates=true* ]] ||
    die "${manager} does not run with InPlaceUpdates=true (its args: ${args}); Cluster API v1.12 or newer is needed"
done

log "3/7 building ${IMAGE} (${IMAGE_BUILD}) and loading it into the management cluster"
if [ "$IMAGE_BUILD" = docker ]; then
  make image IMAGE="$IMAGE"
else
  scripts/build-image-local.sh "$IMAGE" >/dev/null
fi
kind load docker-image "$IMAGE" --name "$MANAGEMENT_CLUSTER_NAME"
# config/default names capd-inplace:dev; render it and point the Deployment at IMAGE.
kubectl kustomize config/default | sed "s|image: capd-inplace:dev|image: ${IMAGE}|" >"$workdir/capd-inplace.yaml"
kubectl apply -f "$workdir/capd-inplace.yaml"
if [ "$WORKLOAD_NAMESPACE" != default ]; then
  # The shipped namespaceSelector admits only `default`; admit the workload's namespace too.
  kubectl create namespace "$WORKLOAD_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
  kubectl patch extensionconfig "$EXTENSION_CONFIG" --type json -p \
    "[{\"op\":\"add\",\"path\":\"/spec/namespaceSelector/matchExpressions/0/values/-\",\"value\":\"${WORKLOAD_NAMESPACE}\"}]"
fi
kubectl -n "$EXTENSION_NAMESPACE" rollout status "deployment/${EXTENSION_DEPLOYMENT}" --timeout="${TIMEOUT_PROVIDERS}s"

log "4/7 waiting for CAPI to discover the extension"
kubectl wait "extensionconfig/${EXTENSION_CONFIG}" --for=condition=Discovered=True --timeout=300s
handlers="$(kubectl get extensionconfig "$EXTENSION_CONFIG" -o jsonpath='{.status.handlers[*].name}')"
for handler in can-update-machine can-update-machineset update-machine; do
  [[ " $handlers " == *" ${handler}.${EXTENSION_CONFIG} "* ]] ||
    die "CAPI did not discover handler ${handler} (discovered: ${handlers})"
done
[ -n "$(kubectl get extensionconfig "$EXTENSION_CONFIG" -o jsonpath='{.spec.clientConfig.caBundle}')" ] ||
  die "the ExtensionConfig has no caBundle: CA injection from the serving certificate's Secret did not happen"

log "5/7 creating workload cluster ${WORKLOAD_CLUSTER_NAME} at ${KUBERNETES_VERSION_FROM} (${CONTROL_PLANE_MACHINE_COUNT} control plane, ${WORKER_MACHINE_COUNT} workers)"
kubectl apply -n "$WORKLOAD_NAMESPACE" -f e2e/kind/clusterclass.yaml
export WORKLOAD_CLUSTER_NAME WORKLOAD_NAMESPACE KUBERNETES_VERSION_FROM CONTROL_PLANE_MACHINE_COUNT WORKER_MACHINE_COUNT
clusterctl generate yaml --from e2e/kind/cluster.yaml >"$workdir/cluster.yaml"
kubectl apply -f "$workdir/cluster.yaml"
wait_until "the workload cluster's API server answers" "$TIMEOUT_CLUSTER" workload_kubeconfig_ready
workload_kubectl apply -f "https://raw.githubusercontent.com/projectcalico/calico/${CALICO_VERSION}/manifests/calico.yaml" >/dev/null
wait_until "${expected_machines} Machines Ready at ${KUBERNETES_VERSION_FROM}" "$TIMEOUT_CLUSTER" machines_ready
workload_kubectl wait node --all --for=condition=Ready --timeout=300s >/dev/null

log "6/7 recording Machines and containers, then bumping to ${KUBERNETES_VERSION_TO}"
declare -A container_before=() container_of=()
while read -r name provider _version; do
  [ -n "$name" ] || continue
  container="${provider#docker:////}"
  if [ -z "$container" ] || [ "$container" = "$provider" ]; then
    die "Machine ${name} has no docker:////<container> providerID (${provider})"
  fi
  container_of[$name]="$container"
  container_before[$name]="$(container_id "$container")"
done < <(list_machines)
[ "${#container_before[@]}" -eq "$expected_machines" ] ||
  die "found ${#container_before[@]} Machines, expected ${expected_machines}"
before_versions="$(workload_kubectl get nodes -o jsonpath='{range .items[*]}{.status.nodeInfo.kubeletVersion}{"\n"}{end}' | sort -u)"
[ "$before_versions" = "$KUBERNETES_VERSION_FROM" ] ||
  die "before the bump the Nodes run ${before_versions//$'\n'/, }, expected ${KUBERNETES_VERSION_FROM}"

upgrade_started=$SECONDS
last_progress=$SECONDS
kubectl patch cluster "$WORKLOAD_CLUSTER_NAME" -n "$WORKLOAD_NAMESPACE" --type merge \
  -p "{\"spec\":{\"topology\":{\"version\":\"${KUBERNETES_VERSION_TO}\"}}}"
wait_until "every Machine UpToDate at ${KUBERNETES_VERSION_TO}, none replaced" "$TIMEOUT_UPGRADE" machines_upgraded
upgrade_seconds=$((SECONDS - upgrade_started))

log "7/7 checking identities and Node versions"
failures=()
summary=()
while read -r name provider version; do
  [ -n "$name" ] || continue
  container="${provider#docker:////}"
  if [ -z "${container_before[$name]+set}" ]; then
    failures+=("Machine ${name} is new")
    continue
  fi
  [ "$container" = "${container_of[$name]}" ] ||
    failures+=("Machine ${name} now points at container ${container}, was ${container_of[$name]}")
  id_after="$(container_id "$container" 2>/dev/null || echo missing)"
  [ "$id_after" = "${container_before[$name]}" ] ||
    failures+=("container ${container} was recreated (${container_before[$name]:0:12} -> ${id_after:0:12})")
  summary+=("$(printf '%-45s %-10s %-14s' "$name" "$version" "${id_after:0:12}")")
done < <(list_machines)
for name in "${!container_before[@]}"; do
  kubectl get machine "$name" -n "$WORKLOAD_NAMESPACE" >/dev/null 2>&1 ||
    failures+=("Machine ${name} was deleted")
done
node_rows="$(workload_kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.nodeInfo.kubeletVersion}{" "}{.spec.unschedulable}{"\n"}{end}')"
node_count=0
while read -r node kubelet unschedulable; do
  [ -n "$node" ] || continue
  node_count=$((node_count + 1))
  [ "$kubelet" = "$KUBERNETES_VERSION_TO" ] ||
    failures+=("Node ${node} runs kubelet ${kubelet}, expected ${KUBERNETES_VERSION_TO}")
  [ "$unschedulable" != "true" ] || failures+=("Node ${node} is left cordoned")
done <<<"$node_rows"
[ "$node_count" -eq "$expected_machines" ] ||
  failures+=("the workload cluster has ${node_count} Nodes, expected ${expected_machines}")

echo
echo "capd-inplace e2e on kind: ${KUBERNETES_VERSION_FROM} -> ${KUBERNETES_VERSION_TO}, ${CONTROL_PLANE_MACHINE_COUNT} control plane + ${WORKER_MACHINE_COUNT} workers, upgrade took ${upgrade_seconds}s"
printf '%-45s %-10s %-14s\n' MACHINE VERSION CONTAINER
printf '%s\n' "${summary[@]}"
echo "Nodes:"
printf '  %s\n' "$node_rows"
if [ "${#failures[@]}" -gt 0 ]; then
  printf 'FAILED:\n'
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "PASSED: every Machine kept its name and container, every Node runs kubelet ${KUBERNETES_VERSION_TO}"

if [ "$KEEP_CLUSTERS" = true ]; then
  log "keeping both clusters (KUBECONFIG=${KUBECONFIG})"
else
  log "deleting the workload cluster, then the management cluster"
  kubectl delete cluster "$WORKLOAD_CLUSTER_NAME" -n "$WORKLOAD_NAMESPACE" --timeout=600s
  kind delete cluster --name "$MANAGEMENT_CLUSTER_NAME"
  rm -rf "$workdir"
fi
