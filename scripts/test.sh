#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the test dependencies, then
# checks formatting and lints and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# Coverage-guided fuzzing for a bounded time (docs/FUZZING.md): a finding
# fails the run and names the input to keep as a regression.
scripts/fuzz.sh all "${SHADOWBACK_CI_FUZZ_SECONDS:-30}"
