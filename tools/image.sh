#!/usr/bin/env bash
# embedd's container image: `tools/image.sh build` (make image) and `tools/image.sh run`
# (make image-run). Works with podman or docker, whichever answers (ENGINE=podman|docker to
# choose). What it handles, so that `make image` works offline on a plain Debian machine:
#   - the base: BASE if given, else python:3.11-slim (local or pulled), else a Debian bookworm
#     base made from Debian's packages with mmdebstrap (no registry needed);
#   - llama-cpp-python: a wheel built once on this machine (pip's cache makes it instant) when
#     the machine's glibc is not newer than the base's, else the image compiles it;
#   - podman's defaults where root lacks CAP_SYS_RESOURCE or cgroups are mixed (a
#     containers.conf with this machine's ulimits and runc), pip trusting this machine's CA
#     bundle (a build secret: nothing of it stays in the image).
# The Containerfile's header explains the image itself; the README's "Running it for others"
# shows it in use.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/embedd:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
PYTHON_BASE=docker.io/library/python:3.11-slim
DEBIAN_BASE=localhost/embedd-base:bookworm
BASE_GLIBC=2.36 # Debian bookworm's (python:3.11-slim's is newer)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BUILD=build
WHEELS=$BUILD/wheels

die() {
	echo "image: $*" >&2
	exit 1
}
note() { echo "image: $*" >&2; }

need() { # need TOOL PACKAGE: fails naming the apt command that installs TOOL
	command -v "$1" >/dev/null || die "$1 is not installed: apt-get install -y $2"
}

# podman's defaults fail on some machines (crun: "setrlimit RLIMIT_NOFILE: Operation not
# permitted" when root lacks CAP_SYS_RESOURCE; "cgroups in hybrid mode not supported"): a
# containers.conf asking for no more than this machine's hard limits, and runc when present.
podman_conf() {
	[[ -n ${CONTAINERS_CONF:-} ]] && return
	local conf=$BUILD/containers.conf nofile nproc ulimits
	mkdir -p "$BUILD"
	nofile=$(ulimit -Hn)
	nproc=$(ulimit -Hu)
	# runc could not set this machine's own hard nproc (96364) but could set 32768.
	[[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
	ulimits=()
	[[ $nofile != unlimited ]] && ulimits+=("\"nofile=$nofile:$nofile\"")
	ulimits+=("\"nproc=$nproc:$nproc\"")
	{
		echo "[containers]"
		echo "default_ulimits = [$(
			IFS=,
			echo "${ulimits[*]}"
		)]"
		if command -v runc >/dev/null; then
			printf '[engine]\nruntime = "runc"\n'
		fi
	} >"$conf"
	export CONTAINERS_CONF=$PWD/$conf
}

# Sets E to the engine that works, not merely one on PATH (a docker client without a daemon
# is common).
engine() {
	local candidates=(podman docker) candidate
	E=""
	[[ -n ${ENGINE:-} ]] && candidates=("$ENGINE")
	for candidate in "${candidates[@]}"; do
		command -v "$candidate" >/dev/null || continue
		[[ $candidate == podman ]] && podman_conf
		if "$candidate" info >/dev/null 2>&1; then
			E=$candidate
			return
		fi
		note "$candidate is installed but does not answer ('$candidate info' fails)"
	done
	die "no working container engine: apt-get install -y podman runc"
}

image_exists() { "$E" image inspect "$1" >/dev/null 2>&1; }

# A Debian bookworm base from Debian's own packages: what `FROM python:3.11-slim` gives
# elsewhere (python3 is 3.11 in bookworm), when no registry answers.
debian_base() {
	need mmdebstrap mmdebstrap
	local tar=$BUILD/debian-base.tar
	mkdir -p "$BUILD"
	note "no base image: building $DEBIAN_BASE with mmdebstrap from $DEBIAN_MIRROR"
	mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
		bookworm "$tar" \
		"deb $DEBIAN_MIRROR bookworm main" \
		"deb $DEBIAN_MIRROR bookworm-updates main" \
		"deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
	"$E" import --change 'CMD ["/bin/bash"]' "$tar" "$DEBIAN_BASE" >/dev/null
	rm -f "$tar"
}

base() {
	if [[ -n ${BASE:-} ]]; then
		echo "$BASE"
	elif image_exists "$PYTHON_BASE"; then
		echo "$PYTHON_BASE"
	elif image_exists "$DEBIAN_BASE"; then
		echo "$DEBIAN_BASE"
	elif timeout 120 "$E" pull -q "$PYTHON_BASE" >/dev/null 2>&1; then
		echo "$PYTHON_BASE"
	else
		debian_base
		echo "$DEBIAN_BASE"
	fi
}

# llama-cpp-python has no binary wheel on PyPI: build it here once (pip's wheel cache makes
# later builds instant) instead of compiling it inside every cold image build. Only when this
# machine's glibc is not newer than the base's: a wheel linked against a newer glibc fails to
# load there. LLAMA_WHEEL=compile forces the compile in the image, and so does CMAKE_ARGS
# (pip's cached wheel was built without them), which the build passes on to llama.cpp.
llama_wheel() {
	local pin python glibc
	mkdir -p "$WHEELS"
	pin=$(sed -n 's/^ *"llama-cpp-python==\(.*\)",/\1/p' pyproject.toml)
	if [[ ${LLAMA_WHEEL:-} == compile || -n ${CMAKE_ARGS:-} ]]; then
		rm -f "$WHEELS"/llama_cpp_python-*.whl
		note "LLAMA_WHEEL=compile or CMAKE_ARGS given: the image compiles llama-cpp-python"
		return
	fi
	rm -f $(ls "$WHEELS"/llama_cpp_python-*.whl 2>/dev/null | grep -v -- "-$pin-") # other pins
	ls "$WHEELS"/llama_cpp_python-"$pin"-*.whl >/dev/null 2>&1 && return
	glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
	if [[ -z $glibc || $(printf '%s\n%s\n' "$glibc" "$BASE_GLIBC" | sort -V | tail -1) != "$BASE_GLIBC" ]]; then
		note "this machine's glibc ($glibc) is newer than the base's: the image compiles llama-cpp-python"
		return
	fi
	python=.venv/bin/python
	[[ -x $python ]] || python=$(command -v python3.11 || true)
	if [[ -z $python ]] || ! "$python" -m pip wheel -q --no-deps "llama-cpp-python==$pin" -w "$WHEELS"; then
		note "no llama-cpp-python wheel from this machine: the image compiles it"
	fi
}

build() {
	local base started ca args
	started=$(date +%s)
	base=$(base)
	llama_wheel
	args=(--build-arg "BASE=$base" -t "$IMAGE" -f Containerfile)
	# HEALTHCHECK is a Docker-format instruction; podman drops it from OCI images.
	[[ $E == podman ]] && args+=(--format docker)
	for ca in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
		if [[ -n $ca && -s $ca ]]; then
			args+=(--secret "id=hostca,src=$ca")
			break
		fi
	done
	[[ -n ${PIP_INDEX_URL:-} ]] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
	[[ -n ${CMAKE_ARGS:-} ]] && args+=(--build-arg "CMAKE_ARGS=$CMAKE_ARGS")
	note "building $IMAGE with $E on $base"
	"$E" build "${args[@]}" .
	note "built $IMAGE in $(($(date +%s) - started)) s; $("$E" image inspect --format '{{.Size}}' "$IMAGE") bytes"
}

# Detached, on the host ports EMBEDD_GRPC_PORT / EMBEDD_HTTP_PORT (the same ports inside),
# published on PUBLISH_ADDRESS (default 127.0.0.1; 0.0.0.0 for other machines). Other EMBEDD_*
# settings of this shell go along; MODELS=DIR mounts a models directory at /models.
run_image() {
	local grpc=${EMBEDD_GRPC_PORT:-50051} http=${EMBEDD_HTTP_PORT:-8080}
	local address=${PUBLISH_ADDRESS:-127.0.0.1} name=${NAME:-embedd-$http} args=() variable
	image_exists "$IMAGE" || die "no image $IMAGE: run 'make image' first"
	args+=(-e "EMBEDD_GRPC_PORT=$grpc" -e "EMBEDD_HTTP_PORT=$http")
	args+=(-p "$address:$grpc:$grpc" -p "$address:$http:$http")
	for variable in $(compgen -e | grep '^EMBEDD_' || true); do
		case $variable in
		EMBEDD_GRPC_PORT | EMBEDD_HTTP_PORT | EMBEDD_GRPC_HOST | EMBEDD_HTTP_HOST | EMBEDD_MODELS_DIR) ;;
		*) args+=(-e "$variable") ;;
		esac
	done
	[[ -n ${MODELS:-} ]] && args+=(-v "$(realpath "$MODELS"):/models:ro")
	"$E" run -d --name "$name" "${args[@]}" "$IMAGE" >/dev/null
	echo "$name"
}

case ${1:-} in
build)
	engine
	build
	;;
run)
	engine
	run_image
	;;
base) # the base image a build would use, made with mmdebstrap if need be
	engine
	base
	;;
env) # how to call the engine that works, as NAME=VALUE lines (the image test reads them)
	engine
	echo "ENGINE=$E"
	echo "CONTAINERS_CONF=${CONTAINERS_CONF:-}"
	echo "IMAGE=$IMAGE"
	;;
*) die "usage: tools/image.sh build|run|base|env" ;;
esac
