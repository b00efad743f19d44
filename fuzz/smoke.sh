#!/usr/bin/env bash
# Runs every fuzz target for ${FUZZ_SECONDS:-10} seconds, starting from fuzz/seeds/TARGET
# when present, and exits non-zero if any target crashes (or fails to build).
#
# Uses `cargo +nightly fuzz` when a nightly toolchain is installed. Without one it falls
# back to the default toolchain with RUSTC_BOOTSTRAP=1 and `--sanitizer none` (the
# sanitizer runtimes ship with nightly only); panics and assertion failures are still found.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_TARGETS (space-separated subset),
# FUZZ_NIGHTLY=0 (use the fallback even when nightly exists), CARGO_TARGET_DIR (honoured by
# cargo as usual).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
seconds="${FUZZ_SECONDS:-10}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi

if [ "${FUZZ_NIGHTLY:-1}" != 0 ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
    build_flags=()
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    build_flags=(--sanitizer none)
fi

targets="${FUZZ_TARGETS:-$("${fuzz[@]}" list)}"
echo "smoke.sh: ${fuzz[*]} ${build_flags[*]}; ${seconds}s per target"
"${fuzz[@]}" build "${build_flags[@]}"

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
for t in $targets; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    dirs=("$corpus")
    if [ -d "seeds/$t" ]; then
        dirs+=("seeds/$t")
    fi
    if "${fuzz[@]}" run "${build_flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 >"$logs/$t.log" 2>&1; then
        summary="$(grep -E '^Done [0-9]+ runs' "$logs/$t.log" | tail -n 1 || true)"
        echo "ok    $t: ${summary:-done}"
    else
        echo "FAIL  $t (log below; reproducer under fuzz/artifacts/$t/)"
        tail -n 40 "$logs/$t.log"
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "smoke.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "smoke.sh: all targets ran ${seconds}s without a crash"
