#!/usr/bin/env bash
# Fuzz the server through its OpenAPI document with Schemathesis (issue 17): every operation, positive and negative
# data (wrong types, missing fields, huge numbers, unicode, empty lists, nulls), FUZZ_EXAMPLES examples per operation
# on top of the coverage phase's boundary cases, once on a server without an API key and once on one behind
# --api-key. The checks are tests/server/fuzz.toml's, as in CI's short pass (tests/server/test_fuzz.py): no 5xx,
# every response as the document says (status, content type, headers, body, each event of a stream), every error
# in OpenAI's shape, 401 without the key.
#
# Usage: scripts/fuzz.sh [MODEL]
#   MODEL            a model for `tokenloom serve` (a path, a hub id or an alias); default: a tiny random Gemma 3
#                    built here as tests/conftest.py builds the test models. It is served as "tiny".
#   FUZZ_EXAMPLES    examples per operation (default 500)
#   FUZZ_SEED        Schemathesis seed (default: fuzz.toml's)
#   FUZZ_SERVE_FLAGS more `tokenloom serve` flags (default for the tiny model: float32, 1 thread, a small KV cache)
# Prints Schemathesis's report of each run, then a summary; exits 1 if any check failed or a server logged a
# traceback. Needs the dev tools (scripts/setup.sh). About 3 minutes on 2 cores with the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
ST=$ROOT/.venv/bin/st
EXAMPLES=${FUZZ_EXAMPLES:-500}
KEY=sekrit
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PYTHONPATH=$ROOT TOKENLOOM_FUZZ_MODEL=tiny
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=$WORK/tiny
  echo "building a tiny random Gemma 3 in $MODEL"
  "$PY" - "$MODEL" <<'EOF' >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
import sys
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.conftest import _perturb_norms, _tiny_configs, _train_tokenizer

out = Path(sys.argv[1])
_train_tokenizer(out.with_name("tokenizer"))
torch.manual_seed(zlib.crc32(b"gemma3") % 1000)
model = AutoModelForCausalLM.from_config(_tiny_configs()["gemma3"], dtype=torch.float32)
_perturb_norms(model)
model.save_pretrained(out)
for f in out.with_name("tokenizer").iterdir():
    (out / f.name).write_bytes(f.read_bytes())
EOF
  DEFAULT_FLAGS="--dtype float32 --kv-cache-gib 0.05 --num-threads 1"
else
  DEFAULT_FLAGS=""
fi
# Each request generates little, however many tokens or prompts it asks for: the fuzzing tests the server.
read -r -a FLAGS <<< "${FUZZ_SERVE_FLAGS:-$DEFAULT_FLAGS} --served-model-name tiny --max-tokens-default 2 \
--max-tokens-limit 16 --max-prompts-per-request 4"

# start NAME [FLAGS...]: serve MODEL on a free port in the background; sets PORT once /health answers.
start() {
  local name=$1
  shift
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$PY" -m tokenloom.cli serve "$MODEL" --port "$PORT" "${FLAGS[@]}" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then return 0; fi
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then break; fi
    sleep 0.5
  done
  echo "the $name server did not start:" >&2
  tail -30 "$WORK/$name.log" >&2
  exit 1
}

# fuzz NAME CONFIG [CURL_ARGS...]: run Schemathesis over the document the server serves; records the outcome.
SUMMARY=()
STATUS=0
fuzz() {
  local name=$1 config=$2
  shift 2
  curl -sf "$@" "http://127.0.0.1:$PORT/openapi.json" >"$WORK/$name.json"
  local seed=() start=$SECONDS rc=0
  [ -n "${FUZZ_SEED:-}" ] && seed=(--seed "$FUZZ_SEED")
  echo
  echo "=== $name: $EXAMPLES examples per operation"
  # From $WORK, so Schemathesis's caches stay out of the checkout.
  (cd "$WORK" && "$ST" --config-file "$config" run "$WORK/$name.json" --url "http://127.0.0.1:$PORT" \
    --max-examples "$EXAMPLES" "${seed[@]}" --continue-on-failure) 2>&1 | tee "$WORK/$name.out" || rc=$?
  local tracebacks
  tracebacks=$(grep -c Traceback "$WORK/$name.log" || true)
  if [ "$tracebacks" != 0 ]; then
    echo "--- the $name server logged $tracebacks tracebacks:"
    grep -B2 -A30 Traceback "$WORK/$name.log" | tail -60
    rc=1
  fi
  local cases
  cases=$(grep -Eo '[0-9]+ generated.*' "$WORK/$name.out" | tail -1 || true)
  SUMMARY+=("$name: ${cases:-no test cases}; $tracebacks server tracebacks; $((SECONDS - start)) s; exit status $rc")
  [ "$rc" = 0 ] || STATUS=1
}

start open
fuzz open "$ROOT/tests/server/fuzz.toml"
kill "${PIDS[-1]}"

start keyed --api-key "$KEY"
{ cat "$ROOT/tests/server/fuzz.toml"; printf '\n[auth.openapi.bearerAuth]\nbearer = "%s"\n' "$KEY"; } >"$WORK/keyed.toml"
fuzz keyed "$WORK/keyed.toml" -H "Authorization: Bearer $KEY"

echo
echo "=== summary (schemathesis $("$PY" -c 'import schemathesis; print(schemathesis.__version__)'))"
printf '%s\n' "${SUMMARY[@]}"
exit $STATUS
