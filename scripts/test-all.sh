#!/usr/bin/env bash
# Run the test suite on every Python 3.10..3.13 found (pyenv's or the system's), each in its own
# venv (.venv-3.X). Usage: scripts/test-all.sh [--ends] [VERSION...]
#   --ends      only the oldest and the newest version found (what CI runs)
#   VERSION...  the versions to try (default: 3.10 3.11 3.12 3.13)
# Exit status 1 when a version's suite fails or no version is found; versions not found are listed.
set -uo pipefail
cd "$(dirname "$0")/.."

ends=0
if [ "${1:-}" = "--ends" ]; then ends=1; shift; fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)

# The first interpreter that really runs as python3.X: on PATH (a pyenv shim that is not selected
# fails to run, so each candidate is tried), then pyenv's versions, then /usr/local and /usr.
find_python() {
    local version=$1 candidate
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for candidate in "$(command -v "python$version" 2>/dev/null)" \
                     "$pyenv_root"/versions/"$version".*/bin/"python$version" \
                     /usr/local/bin/"python$version" /usr/bin/"python$version"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        if "$candidate" -c "import sys, venv; assert sys.version_info[:2] == tuple(map(int, '$version'.split('.')))" \
            >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

found=()
interpreters=()
missing=()
for version in "${versions[@]}"; do
    if python=$(find_python "$version"); then
        found+=("$version")
        interpreters+=("$python")
    else
        missing+=("$version")
    fi
done
if [ ${#found[@]} -eq 0 ]; then
    echo "test-all: no Python among ${versions[*]} was found" >&2
    exit 1
fi
if [ $ends -eq 1 ] && [ ${#found[@]} -gt 2 ]; then
    found=("${found[0]}" "${found[-1]}")
    interpreters=("${interpreters[0]}" "${interpreters[-1]}")
fi

results=()
status=0
for i in "${!found[@]}"; do
    version=${found[$i]}
    python=${interpreters[$i]}
    echo "=== Python $version ($python): make test VENV=.venv-$version"
    if make --no-print-directory test PYTHON="$python" VENV=".venv-$version" PYTEST_ARGS="${PYTEST_ARGS:-}"; then
        results+=("Python $version: passed")
    else
        results+=("Python $version: FAILED")
        status=1
    fi
done
echo "=== test-all summary"
printf '%s\n' "${results[@]}"
[ ${#missing[@]} -eq 0 ] || echo "not found (not tested): ${missing[*]}"
exit $status
