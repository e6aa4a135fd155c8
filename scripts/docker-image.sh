#!/usr/bin/env bash
# Builds a local image of rebalancer without a registry: a root filesystem holding the
# binary and the shared libraries it links, imported with `docker import`. The tests and
# the Docker scaling demo use it; on a machine that reaches a registry the Dockerfile at the
# top of the repository builds the image for users.
#
#   scripts/docker-image.sh [BINARY] [TAG]     (default: target/debug/rebalancer rebalancer:local)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/debug/rebalancer}
tag=${2:-rebalancer:local}
[ -x "$bin" ] || { echo "docker-image: $bin is not built (cargo build)" >&2; exit 1; }
fs=$(mktemp -d /tmp/rebalancer-rootfs.XXXXXX)
trap 'rm -rf "$fs"' EXIT
mkdir -p "$fs/usr/local/bin" "$fs/tmp" "$fs/etc/rebalancer"
cp "$bin" "$fs/usr/local/bin/rebalancer"
for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
  mkdir -p "$fs$(dirname "$lib")"
  cp -L "$lib" "$fs$lib"
done
cp -r "$root/pipelines" "$fs/etc/rebalancer/pipelines"
chmod 1777 "$fs/tmp"
# The image this tag named before: removed once replaced (unless a container still uses
# it), so rebuilding does not pile up untagged images.
old=$(docker images -q "$tag" 2>/dev/null || true)
tar -C "$fs" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/rebalancer"]' \
  --change 'CMD ["run", "--pipeline", "/etc/rebalancer/pipelines/default.toml"]' \
  - "$tag" >/dev/null
if [ -n "$old" ] && [ "$old" != "$(docker images -q "$tag")" ]; then
  docker rmi "$old" >/dev/null 2>&1 || true
fi
echo "docker-image: built $tag from $bin"
