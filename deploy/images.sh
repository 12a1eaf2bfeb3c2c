#!/usr/bin/env bash
# Build the worker and orchestrator images from the working tree (`make images`), with whatever
# builds images here: podman, else buildah, else docker (a running daemon). No registry is needed:
# both images build on a Debian base made here with debootstrap (once; it is reused while it
# exists), with plain `openmm` (CPU) instead of the CUDA extra. The base is Debian 13 (trixie,
# Python 3.13): Debian 12's python3 is 3.11.2, older than the 3.11.4 whose tarfile extraction
# filters (PEP 706) relaymd unpacks job bundles with.
#
#   deploy/images.sh          build what is missing or stale, then print sizes and build times
#   deploy/images.sh env      print the variables that point podman at this project's store
#                             (eval "$(deploy/images.sh env)"; podman images)
#
# podman and buildah use a store and a configuration of their own under build/containers (left
# out of the build context by .dockerignore, removed by `make clean`):
#   containers.conf  runc, the cgroupfs cgroup manager (root) and no default ulimits: what
#                    works in unprivileged VMs and CI containers too (CONTAINERS_CONF)
#   storage.conf     overlay where the kernel mounts it, else vfs (CONTAINERS_STORAGE_CONF)
#   env              the variables and image names, for tests/test_images.py
#   logs/            each build's full output
#
# Settings (environment):
#   IMAGE_TOOL          podman, buildah or docker (default: the first of them that is usable)
#   BASE_IMAGE          build both on this instead of the debootstrap base (e.g. python:3.11-slim
#                       where a registry is reachable)
#   DEBIAN_SUITE        the debootstrap base's release (default trixie); DEBIAN_MIRROR its mirror
#   WORKER_IMAGE        default localhost/relaymd-worker:dev
#   ORCHESTRATOR_IMAGE  default localhost/relaymd-orchestrator:dev
#   OPENMM_PIP          the worker's OpenMM (default openmm==<the pin in requirements.lock>)
#   STORAGE_DRIVER      overlay or vfs (default: overlay where it mounts; kept once chosen)
#   IMAGES_STATE        instead of build/containers
#   CA_BUNDLE           the CA certificates RUN steps trust on the Debian base (default this
#                       machine's /etc/ssl/certs/ca-certificates.crt: a TLS-inspecting proxy's
#                       CA included)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${IMAGES_STATE:-${ROOT}/build/containers}"
WORKER_IMAGE="${WORKER_IMAGE:-localhost/relaymd-worker:dev}"
ORCHESTRATOR_IMAGE="${ORCHESTRATOR_IMAGE:-localhost/relaymd-orchestrator:dev}"
DEBIAN_SUITE="${DEBIAN_SUITE:-trixie}"
DEBIAN_BASE="localhost/relaymd-base:${DEBIAN_SUITE}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
OPENMM_VERSION="$(sed -n 's/^[Oo]pen[Mm][Mm]==//p' "${ROOT}/requirements.lock")"
OPENMM_PIP="${OPENMM_PIP:-openmm==${OPENMM_VERSION}}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

die() {
  echo "images: $*" >&2
  exit 1
}

pick_tool() {
  if [ -n "${IMAGE_TOOL:-}" ]; then
    command -v "${IMAGE_TOOL}" >/dev/null || die "IMAGE_TOOL=${IMAGE_TOOL} is not installed"
    echo "${IMAGE_TOOL}"
  elif command -v podman >/dev/null; then
    echo podman
  elif command -v buildah >/dev/null; then
    echo buildah
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo docker
  else
    die "no podman, buildah or running docker here (as root, \`make images\` installs podman)"
  fi
}

# Does the kernel let us mount overlayfs (root only; rootless podman gets vfs)?
overlay_works() {
  [ "$(id -u)" = 0 ] || return 1
  local probe
  probe="$(mktemp -d)"
  mkdir -p "${probe}/lower" "${probe}/upper" "${probe}/work" "${probe}/merged"
  if mount -t overlay overlay \
      -o "lowerdir=${probe}/lower,upperdir=${probe}/upper,workdir=${probe}/work" \
      "${probe}/merged" 2>/dev/null; then
    umount "${probe}/merged"
    rm -rf "${probe}"
    return 0
  fi
  rm -rf "${probe}"
  return 1
}

# The project's own containers.conf and storage.conf, exported for podman/buildah.
configure() {
  mkdir -p "${STATE}/logs"
  local driver="${STORAGE_DRIVER:-}"
  if [ -z "${driver}" ] && [ -f "${STATE}/storage.conf" ]; then
    driver="$(sed -n 's/^driver = "\(.*\)"$/\1/p' "${STATE}/storage.conf")"  # keep the store's
  fi
  if [ -z "${driver}" ]; then
    if overlay_works; then driver=overlay; else driver=vfs; fi
  fi
  {
    echo "# Written by deploy/images.sh: podman/buildah settings for this project's images."
    echo "[containers]"
    echo "default_ulimits = []"
    echo "[engine]"
    if command -v runc >/dev/null; then echo 'runtime = "runc"'; fi
    if [ "$(id -u)" = 0 ]; then echo 'cgroup_manager = "cgroupfs"'; fi
    echo 'events_logger = "file"'
  } > "${STATE}/containers.conf"
  {
    echo "# Written by deploy/images.sh: this project's image store."
    echo "[storage]"
    echo "driver = \"${driver}\""
    echo "graphroot = \"${STATE}/storage\""
    echo "runroot = \"${STATE}/run\""
  } > "${STATE}/storage.conf"
  export CONTAINERS_CONF="${STATE}/containers.conf"
  export CONTAINERS_STORAGE_CONF="${STATE}/storage.conf"
}

image_exists() {
  case "${TOOL}" in
    podman) podman image exists "$1" ;;
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
  esac
}

image_size() {  # bytes (buildah alone: the sum of its layers' compressed sizes is unknown, 0)
  case "${TOOL}" in
    podman | docker) "${TOOL}" image inspect --format '{{.Size}}' "$1" ;;
    buildah) podman image inspect --format '{{.Size}}' "$1" 2>/dev/null || echo 0 ;;
  esac
}

# A Debian rootfs with python3 and venv (and nothing else but ca-certificates), as an image.
make_debian_base() {
  [ "$(id -u)" = 0 ] || die "making the Debian base needs root (debootstrap); or set BASE_IMAGE"
  command -v debootstrap >/dev/null || die "debootstrap is not installed (\`make images\` as root)"
  local rootfs="${STATE}/rootfs"
  rm -rf "${rootfs}"
  echo "images: debootstrap ${DEBIAN_SUITE} from ${DEBIAN_MIRROR} (log: ${STATE}/logs/base.log)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "${DEBIAN_SUITE}" "${rootfs}" "${DEBIAN_MIRROR}" > "${STATE}/logs/base.log" 2>&1; then
    tail -n 30 "${STATE}/logs/base.log" >&2
    die "debootstrap failed"
  fi
  rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
  : > "${rootfs}/etc/resolv.conf"
  echo relaymd > "${rootfs}/etc/hostname"
  local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  local changes=(--change "ENV=PATH=${path}" --change "ENV=LANG=C.UTF-8"
                 --change 'CMD=["/bin/bash"]')
  case "${TOOL}" in
    podman | docker)
      tar -C "${rootfs}" -c . | "${TOOL}" import "${changes[@]}" - "${DEBIAN_BASE}" >/dev/null ;;
    buildah)
      local ctr mnt
      ctr="$(buildah from scratch)"
      mnt="$(buildah mount "${ctr}")"
      cp -a "${rootfs}/." "${mnt}/"
      buildah umount "${ctr}" >/dev/null
      buildah config --env "PATH=${path}" --env LANG=C.UTF-8 --cmd /bin/bash "${ctr}"
      buildah commit --rm "${ctr}" "${DEBIAN_BASE}" >/dev/null ;;
  esac
  rm -rf "${rootfs}"
}

build() {
  local name="$1" dockerfile="$2" tag="$3"
  shift 3
  local log="${STATE}/logs/${name}.log"
  local cmd
  case "${TOOL}" in
    # docker format: an OCI image config cannot hold HEALTHCHECK or SHELL (podman drops them)
    podman) cmd=(podman build --format docker --isolation chroot --layers) ;;
    buildah) cmd=(buildah bud --format docker --isolation chroot --layers) ;;
    docker) cmd=(docker build) ;;
  esac
  # Builds on the Debian base trust what this machine trusts (a TLS-inspecting proxy's CA, say):
  # its CA bundle is mounted over the base's during RUN steps only, never stored in a layer.
  # (Nothing in those builds rewrites the bundle: python3 and ca-certificates come with the base.)
  if [ "${TOOL}" != docker ] && [ -z "${BASE_IMAGE:-}" ] && [ -f "${CA_BUNDLE}" ]; then
    cmd+=(--volume "${CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
  echo "images: building ${tag} (log: ${log})"
  if ! (cd "${ROOT}" && "${cmd[@]}" -f "${dockerfile}" "$@" -t "${tag}" .) > "${log}" 2>&1; then
    tail -n 40 "${log}" >&2
    die "building ${tag} failed"
  fi
}

human() {
  awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1000000 }'
}

main() {
  TOOL="$(pick_tool)"
  if [ "${TOOL}" != docker ]; then
    configure
  fi
  if [ "${1:-}" = env ]; then
    [ -f "${STATE}/env" ] || die "no images built yet: make images"
    local key value
    while IFS='=' read -r key value; do
      printf 'export %s=%q\n' "${key}" "${value}"
    done < "${STATE}/env"
    return
  fi
  [ -n "${OPENMM_VERSION}" ] || die "no OpenMM pin in requirements.lock"
  mkdir -p "${STATE}/logs"
  exec 9> "${STATE}/lock"
  flock 9  # one build at a time per tree

  local base="${BASE_IMAGE:-${DEBIAN_BASE}}" t0 base_s=cached worker_s orch_s
  if [ -z "${BASE_IMAGE:-}" ] && ! image_exists "${DEBIAN_BASE}"; then
    t0=${SECONDS}
    make_debian_base
    base_s=$((SECONDS - t0))s
  fi
  t0=${SECONDS}
  build worker deploy/docker/Dockerfile.worker "${WORKER_IMAGE}" \
    --build-arg "BASE_IMAGE=${base}" --build-arg "OPENMM_VERSION=${OPENMM_VERSION}" \
    --build-arg "OPENMM_PIP=${OPENMM_PIP}"
  worker_s=$((SECONDS - t0))s
  t0=${SECONDS}
  build orchestrator deploy/docker/Dockerfile.orchestrator "${ORCHESTRATOR_IMAGE}" \
    --build-arg "BASE_IMAGE=${base}"
  orch_s=$((SECONDS - t0))s

  {
    echo "IMAGE_TOOL=${TOOL}"
    if [ "${TOOL}" != docker ]; then
      echo "CONTAINERS_CONF=${CONTAINERS_CONF}"
      echo "CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF}"
    fi
    echo "BASE_IMAGE=${base}"
    echo "WORKER_IMAGE=${WORKER_IMAGE}"
    echo "ORCHESTRATOR_IMAGE=${ORCHESTRATOR_IMAGE}"
  } > "${STATE}/env.tmp"
  mv "${STATE}/env.tmp" "${STATE}/env"

  echo "images (${TOOL}, store ${STATE}):"
  printf '  %-40s %10s  %s\n' "${base}" "$(human "$(image_size "${base}")")" "${base_s}"
  printf '  %-40s %10s  %s\n' "${WORKER_IMAGE}" "$(human "$(image_size "${WORKER_IMAGE}")")" \
    "${worker_s}"
  printf '  %-40s %10s  %s\n' "${ORCHESTRATOR_IMAGE}" \
    "$(human "$(image_size "${ORCHESTRATOR_IMAGE}")")" "${orch_s}"
}

main "$@"
