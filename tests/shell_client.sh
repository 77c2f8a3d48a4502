#!/usr/bin/env bash
# A shell client of main.py: many prompts piped into ONE run, one JSON object per sample back.
#
#   tests/shell_client.sh PYTHON MAIN_PY CHECKPOINT [BATCH_SIZE]
#
# Generates 20 prompts of mixed length (ASCII, CJK, emoji, one long), pipes them into
#   main.py --prompt_file - --format jsonl --batch_size BATCH_SIZE --nsamples 2 --seed 11 --length 6
# checks every output line (40 lines; prompt_index 0..19 each with sample_index 0 and 1; the prompt
# echoed back; finish_reason eot/length/stop; the seed), then runs the same command again and checks
# that the output is byte-identical but for the measured tokens_per_second. BATCH_SIZE defaults to 4.
# Exits 0 when all is well, non-zero with a message on stderr otherwise. JSON is parsed with PYTHON's
# json module, so no jq is needed.
set -euo pipefail

if [[ $# -lt 3 || $# -gt 4 ]]; then
    echo "usage: $0 PYTHON MAIN_PY CHECKPOINT [BATCH_SIZE]" >&2
    exit 64
fi
PY=$1
MAIN=$2
CKPT=$3
BATCH=${4:-4}
NPROMPTS=20
NSAMPLES=2

fail() {
    echo "shell_client: $*" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

prompts() {
    local i
    for ((i = 0; i < NPROMPTS; i++)); do
        case $((i % 5)) in
            0) printf 'Prompt number %d about the weather\n' "$i" ;;
            1) printf '東京の天気は晴れ、%d度です\n' "$i" ;;
            2) printf 'Party time 🎉🎉 number %d 👩‍👩‍👧\n' "$i" ;;
            3) printf '%d\n' "$i" ;;
            4) if ((i == 9)); then  # the long one: a few hundred tokens
                   printf 'word%d ' $(seq 1 120)
                   printf 'end\n'
               else
                   printf 'Ünïcödé ✓ — naïve café %d\n' "$i"
               fi ;;
        esac
    done
}

prompts > "$work/prompts.txt"
[[ $(wc -l < "$work/prompts.txt") -eq $NPROMPTS ]] || fail "generated $(wc -l < "$work/prompts.txt") prompts"

run() {  # run N: pipe the prompts into one main.py run, stdout to out.N, stderr to err.N
    if ! "$PY" "$MAIN" --model "$CKPT" --prompt_file - --format jsonl --batch_size "$BATCH" \
            --nsamples "$NSAMPLES" --seed 11 --length 6 < "$work/prompts.txt" > "$work/out.$1" 2> "$work/err.$1"; then
        fail "run $1 failed: $(cat "$work/err.$1")"
    fi
}

run 1

"$PY" - "$work/out.1" "$work/prompts.txt" "$NPROMPTS" "$NSAMPLES" <<'EOF' || fail "run 1: bad output"
import json
import sys

out, prompts_file, nprompts, nsamples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(prompts_file, encoding="utf-8") as f:
    prompts = f.read().splitlines()
with open(out, "rb") as f:
    lines = f.read().split(b"\n")
errors = []
if lines[-1] != b"":
    errors.append("output does not end with a newline")
lines = lines[:-1]
if len(lines) != nprompts * nsamples:
    errors.append(f"{len(lines)} lines, expected {nprompts * nsamples}")
seen = {}
for number, line in enumerate(lines, 1):
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError as exc:
        errors.append(f"line {number}: not UTF-8 JSON: {exc}")
        continue
    p, s = record.get("prompt_index"), record.get("sample_index")
    if not (isinstance(p, int) and 0 <= p < nprompts and isinstance(s, int) and 0 <= s < nsamples):
        errors.append(f"line {number}: prompt_index {p!r}, sample_index {s!r} out of range")
        continue
    seen[p, s] = seen.get((p, s), 0) + 1
    if record.get("prompt") != prompts[p]:
        errors.append(f"line {number}: prompt {record.get('prompt')!r}, expected {prompts[p]!r}")
    if record.get("finish_reason") not in ("eot", "length", "stop"):
        errors.append(f"line {number}: finish_reason {record.get('finish_reason')!r}")
    if record.get("seed") != 11:
        errors.append(f"line {number}: seed {record.get('seed')!r}")
    tokens = record.get("tokens")
    if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) and len(tokens) <= 6):
        errors.append(f"line {number}: tokens {tokens!r}")
    if not isinstance(record.get("text"), str):
        errors.append(f"line {number}: text {record.get('text')!r}")
for p in range(nprompts):
    for s in range(nsamples):
        if seen.get((p, s)) != 1:
            errors.append(f"prompt_index {p} sample_index {s}: {seen.get((p, s), 0)} lines, expected 1")
for e in errors[:20]:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF

run 2
# tokens_per_second is a wall-clock measurement: the one field that may differ. It is the last key of each
# object; everything else must be byte-identical.
strip_rate() { sed -E 's/, "tokens_per_second": ([0-9.eE+-]+|null)\}$/}/' "$1"; }
[[ $(grep -c '"tokens_per_second": ' "$work/out.1") -eq $((NPROMPTS * NSAMPLES)) ]] \
    || fail "run 1: not every line has tokens_per_second"
if ! cmp -s <(strip_rate "$work/out.1") <(strip_rate "$work/out.2"); then
    fail "two runs with --seed 11 differ: $(diff <(strip_rate "$work/out.1") <(strip_rate "$work/out.2") | head -c 2000)"
fi

echo "shell_client: ok ($((NPROMPTS * NSAMPLES)) samples, batch size $BATCH, deterministic)"
