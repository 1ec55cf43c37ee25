#!/usr/bin/env bash
# Coverage-guided fuzzing on stable Rust (docs/FUZZING.md).
#
#   scripts/fuzz.sh TARGET SECONDS [libFuzzer options...]
#   scripts/fuzz.sh all SECONDS        # each target in turn
#   scripts/fuzz.sh --list
#
# Builds fuzz/ with libFuzzer (libfuzzer-sys compiles it with the C++
# compiler) and the sanitizer-coverage pass rustc has on stable
# (`-Cpasses=sancov-module`, no -Z flag, no nightly), then runs TARGET for
# SECONDS. Seeds come from fuzz/corpus/TARGET and fuzz/regressions/TARGET;
# what libFuzzer learns goes to target/fuzz/corpus/TARGET (kept between
# runs, not committed); a crash is written to target/fuzz/artifacts/TARGET/
# and the script says how to keep it as a regression input.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(blkif netif virtio vhost_user control recovery vnet_ctrl)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${targets[@]}"
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 TARGET|all SECONDS [libFuzzer options...]  (targets: ${targets[*]})" >&2
  exit 2
fi
target=$1 seconds=$2
shift 2
if [ "$target" != all ] && [[ ! " ${targets[*]} " =~ " $target " ]]; then
  echo "fuzz.sh: unknown target $target (targets: ${targets[*]})" >&2
  exit 2
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  -Cdebug-assertions -Coverflow-checks -Cdebuginfo=1"
cargo build --locked --release -p shadowback-fuzz --features libfuzzer \
  --bin shadowback-fuzz --target "$triple" --target-dir target/fuzz
bin=target/fuzz/$triple/release/shadowback-fuzz

run() {
  local t=$1 work=target/fuzz/corpus/$1 artifacts=target/fuzz/artifacts/$1/
  shift
  mkdir -p "$work" "$artifacts" "fuzz/regressions/$t"
  echo "fuzz.sh: $t for ${seconds}s"
  local rc=0
  SHADOWBACK_FUZZ_TARGET=$t "$bin" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
    -artifact_prefix="$artifacts" "$@" "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" || rc=$?
  if [ $rc -ne 0 ]; then
    echo "fuzz.sh: $t found a failing input in $artifacts; fix it and keep the input:" >&2
    echo "  cp $artifacts/crash-* fuzz/regressions/$t/   (replayed by cargo test -p shadowback-fuzz)" >&2
  fi
  return $rc
}

if [ "$target" = all ]; then
  status=0
  for t in "${targets[@]}"; do run "$t" "$@" || status=1; done
  exit $status
fi
run "$target" "$@"
