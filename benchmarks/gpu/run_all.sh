#!/usr/bin/env bash
# Run the four GPU benchmarks; reports (JSON) and logs go to the directory given as $1.
#   benchmarks/gpu/run_all.sh OUTDIR [extra args passed to every script, e.g. --tiny --device cpu]
# A failing script does not stop the others; the exit status is 1 if any failed.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [args for every script]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
status=0
for name in kernel model_step copies e2e; do
    echo "== $name -> $OUT/$name.json" >&2
    start=$(date +%s)
    if ! "$PY" "benchmarks/gpu/$name.py" --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "== $name FAILED (see $OUT/$name.log)" >&2
        status=1
    fi
    echo "== $name took $(( $(date +%s) - start )) s" >&2
done
exit $status
