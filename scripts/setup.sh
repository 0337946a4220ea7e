#!/usr/bin/env bash
# Idempotent set-up: a virtualenv with pinned dependencies, CometBFT (pinned) in .tools/bin,
# and the ABCI protobuf classes generated from the pinned module's .proto files into .gen/.
# A second run with nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

COMETBFT_VERSION=v0.38.21
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
TOOLS=$ROOT/.tools/bin
GEN=$ROOT/.gen/proto
STAMP_DIR=$ROOT/.tools/stamps
mkdir -p "$TOOLS" "$STAMP_DIR"

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# 1. Python virtualenv and pinned dependencies.
deps_hash=$(hash_of requirements.lock pyproject.toml)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP_DIR/python" 2>/dev/null)" != "$deps_hash" ]; then
  echo "setup: installing Python dependencies into .venv" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.lock
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
  echo "$deps_hash" > "$STAMP_DIR/python"
fi

# 2. CometBFT, built from the pinned module's source with one small patch of ours
#    (scripts/patches/, see BENCHMARKS.md): v0.38's socket ABCI client creates its flush timer
#    with flushThrottleMS = 20 as a Duration, i.e. 20 ns instead of the 20 ms it means, and
#    spins whenever the application is busy. The patch multiplies by time.Millisecond.
COMETBFT_PATCH=scripts/patches/cometbft-$COMETBFT_VERSION-flush-throttle.patch
comet_stamp="$COMETBFT_VERSION $(hash_of "$COMETBFT_PATCH")"
if [ ! -x "$TOOLS/cometbft" ] || [ "$(cat "$STAMP_DIR/cometbft" 2>/dev/null)" != "$comet_stamp" ]; then
  echo "setup: building cometbft $COMETBFT_VERSION from its module source, patched" >&2
  comet_src=$(go mod download -json "github.com/cometbft/cometbft@$COMETBFT_VERSION" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  build_dir=$ROOT/.tools/src/cometbft-$COMETBFT_VERSION
  rm -rf "$build_dir"
  mkdir -p "$(dirname "$build_dir")"
  cp -r "$comet_src" "$build_dir"
  chmod -R u+w "$build_dir"
  (cd "$build_dir" && git apply -p1 "$ROOT/$COMETBFT_PATCH")
  # Built beside the old binary and renamed over it: a node still running the old one is
  # not disturbed.
  (cd "$build_dir" && GOFLAGS=-mod=mod go build -o "$TOOLS/cometbft.new" ./cmd/cometbft)
  mv -f "$TOOLS/cometbft.new" "$TOOLS/cometbft"
  rm -rf "$build_dir"
  echo "$comet_stamp" > "$STAMP_DIR/cometbft"
fi

# 3. Protobuf classes from the pinned module's own .proto files (never committed).
gen_hash=$(echo "$COMETBFT_VERSION $(hash_of requirements.lock scripts/setup.sh)")
if [ ! -f "$GEN/tendermint/abci/types_pb2.py" ] || [ "$(cat "$STAMP_DIR/proto" 2>/dev/null)" != "$gen_hash" ]; then
  echo "setup: generating protobuf classes for cometbft $COMETBFT_VERSION" >&2
  comet_dir=$(go mod download -json "github.com/cometbft/cometbft@$COMETBFT_VERSION" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  comet_mod=$(go mod download -json "github.com/cometbft/cometbft@$COMETBFT_VERSION" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  gogo_version=$(awk '$1=="github.com/cosmos/gogoproto" {print $2; exit}' "$comet_mod")
  gogo_dir=$(go mod download -json "github.com/cosmos/gogoproto@$gogo_version" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  well_known=$("$VENV/bin/python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
  rm -rf "$GEN" && mkdir -p "$GEN"
  protos=$(cd "$comet_dir/proto" && find tendermint -name '*.proto' ! -path '*/rpc/*' | sort)
  (cd "$comet_dir/proto" && "$VENV/bin/python" -m grpc_tools.protoc -I . -I "$gogo_dir" -I "$well_known" \
      --python_out="$GEN" --pyi_out="$GEN" $protos gogoproto/gogo.proto)
  for d in $(cd "$GEN" && find . -type d); do touch "$GEN/$d/__init__.py"; done
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$GEN" > "$site/medledger_generated_proto.pth"
  echo "$gen_hash" > "$STAMP_DIR/proto"
fi

# 4. Debian's Chromium for the portal's browser tests (Playwright drives it; we never run
#    `playwright install`, which would download a browser build of its own).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium (Debian) for the browser tests" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || { echo "setup: apt-get could not install chromium (needed by the browser tests)" >&2; exit 1; }
  else
    echo "setup: /usr/bin/chromium is missing and apt-get (as root) is not available:" \
      "the browser tests (tests/web/test_portal_browser.py) will be skipped" >&2
  fi
fi
