#!/usr/bin/env bash
# Schemathesis against a live server (issue 18): every operation of the published /openapi.json, positive and
# negative (fuzzed) data, the token header on every call; fails on any 5xx or any answer that breaks the schema.
#   bash scripts/schemathesis.sh [EXAMPLES] [SEED]     EXAMPLES per operation and phase (default 200), SEED (default 1)
# It builds a small synthetic pipeline bundle with `rec-engine demo` (LightGCN + DeepFM, ~20 s) in a temp dir, starts
# `rec-engine serve` on a free loopback port (write token, event log, profiles), runs schemathesis with the checks
# not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance and
# response_headers_conformance, prints the totals (operations, cases, failures) and exits non-zero on any
# failure or error, or on a traceback in the server's log. Installs schemathesis into .venv when missing.
# Env: ST_WORKERS (schemathesis workers, default 4), ST_KEEP=1 keeps the temp dir (report.json, server.log).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
examples="${1:-200}"
seed="${2:-1}"
"$py" -c "import schemathesis" 2>/dev/null || "$py" -m pip install -q schemathesis
export PYTHONPATH="python:.devpath${PYTHONPATH:+:$PYTHONPATH}"
work="$(mktemp -d)"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  if [ "${ST_KEEP:-0}" = 1 ]; then echo "schemathesis: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "schemathesis: training a small bundle into $work"
"$py" -m rec_engine.cli demo --out "$work/demo" --users 200 --items 150 > "$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; exit 1; }      # the demo's pipeline bundle (LightGCN + DeepFM)

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="schemathesis-$RANDOM$RANDOM"
REC_ENGINE_TOKEN="$token" "$py" -m rec_engine.cli serve "$work/demo/pipeline" --host 127.0.0.1 --port "$port" \
  --events "$work/events" --profiles --log-level warning > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 150); do
  "$py" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" \
    2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done

echo "schemathesis: $examples examples per operation, seed $seed, server on 127.0.0.1:$port"
set +e
st="$PWD/.venv/bin/schemathesis"
(cd "$work" && "$st" run "http://127.0.0.1:$port/openapi.json" -H "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --mode all --max-examples "$examples" --seed "$seed" -w "${ST_WORKERS:-4}" \
  --report json --report-json-path "$work/report.json" > "$work/schemathesis.log" 2>&1)  # its cache: in $work
rc=$?
set -e
sed -n '/^=* *\(ERRORS\|FAILURES\) *=*$/,$p' "$work/schemathesis.log"
traces="$(grep -c '^Traceback' "$work/server.log" || true)"
"$py" - "$work/report.json" "$rc" "$traces" <<'EOF'
import json, sys

report, rc, traces = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
ops, cases = report["operations"], report["test_cases"]
accepted = rejected = 0
for phases in report.get("valid_rates", {}).values():
    for r in phases.values():
        accepted, rejected = accepted + r.get("accepted", 0), rejected + r.get("rejected", 0)
print(f"schemathesis: operations {ops['tested']}/{ops['total']} tested ({ops['errored']} errored), "
      f"cases {cases['generated']} generated, failures {cases['unique_failures']} "
      f"(cases with failures {cases['with_failures']}, errored {cases['errored']}), "
      f"accepted {accepted} / rejected {rejected} (2xx / 4xx), server tracebacks {traces}, "
      f"{report['running_time']:.0f} s, exit {rc}")
EOF
[ "$rc" -eq 0 ] && [ "$traces" -eq 0 ]
