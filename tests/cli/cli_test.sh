#!/usr/bin/env bash
# End-to-end checks of the kls program: make-model, generate (raw, chat, ids, backends), determinism and
# clear errors for bad input. Usage: cli_test.sh PATH_TO_KLS
set -uo pipefail
kls=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
pass() { passed=$((passed + 1)); }
fail() { echo "FAIL: $*" >&2; failed=$((failed + 1)); }

# expect_error NAME EXPECTED_EXIT NEEDLE -- COMMAND...: the command fails with that exit code
# and its stderr names the problem.
expect_error() {
  local name=$1 code=$2 needle=$3; shift 4
  "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  if [ "$rc" -ne "$code" ]; then fail "$name: exit $rc, expected $code; stderr: $(cat "$work/err")"; return; fi
  if ! grep -qF -- "$needle" "$work/err"; then fail "$name: stderr lacks '$needle': $(cat "$work/err")"; return; fi
  pass
}

model=$work/tiny
"$kls" make-model --preset tiny --out "$model" --seed 3 2>/dev/null || fail "make-model"
for f in config.json model.safetensors tiktoken.model tokenizer_config.json; do
  [ -s "$model/$f" ] && pass || fail "make-model did not write $f"
done

# Determinism: same seed, same ids; the ids line has exactly --max-tokens ids unless a stop hit.
a=$("$kls" generate --model "$model" --prompt "Hello" --max-tokens 16 --seed 9 --print-ids)
b=$("$kls" generate --model "$model" --prompt "Hello" --max-tokens 16 --seed 9 --print-ids)
[ -n "$a" ] && [ "$a" = "$b" ] && pass || fail "same seed gave '$a' and '$b'"
n=$(echo "$a" | wc -w)
[ "$n" -ge 1 ] && [ "$n" -le 16 ] && pass || fail "expected 1..16 ids, got $n"

# --prompt-ids of the byte-level encoding of "Hello" equals --prompt "Hello" (no BOS added).
c=$("$kls" generate --model "$model" --prompt-ids "72 101 108 108 111" --max-tokens 16 --seed 9 --print-ids)
[ "$a" = "$c" ] && pass || fail "--prompt-ids 'Hello' gave '$c', --prompt gave '$a'"

# Greedy is independent of the seed.
g1=$("$kls" generate --model "$model" --prompt "Hi" --max-tokens 8 --temperature 0 --seed 1 --print-ids)
g2=$("$kls" generate --model "$model" --prompt "Hi" --max-tokens 8 --temperature 0 --seed 2 --print-ids)
[ "$g1" = "$g2" ] && pass || fail "greedy depends on the seed: '$g1' vs '$g2'"

# --backend: where no GPU can be used, cuda fails before the model loads (exit 2, saying why)
# and auto is the CPU backend; where one can, the GPU runs the turn (greedy, 8 ids).
"$kls" generate --model "$work/none" --prompt hi --backend cuda >/dev/null 2>"$work/err"
rc=$?
if grep -qF -e "no CUDA device is visible" -e "this build has no CUDA backend" "$work/err"; then
  [ "$rc" -eq 2 ] && pass || fail "--backend cuda without a GPU: exit $rc, expected 2"
  cpu=$("$kls" generate --model "$model" --prompt "Hello" --max-tokens 16 --seed 9 --print-ids --backend cpu)
  [ "$cpu" = "$a" ] && pass || fail "--backend cpu gave '$cpu', auto (cpu here) gave '$a'"
else
  [ "$rc" -eq 1 ] && grep -qF config.json "$work/err" && pass \
    || fail "--backend cuda, missing model: exit $rc: $(cat "$work/err")"
  gpu=$("$kls" generate --model "$model" --prompt "Hi" --max-tokens 8 --temperature 0 --backend cuda --print-ids)
  [ "$(echo "$gpu" | wc -w)" -ge 1 ] && pass || fail "--backend cuda printed '$gpu'"
fi
expect_error "unknown backend" 2 "--backend" -- "$kls" generate --model "$model" --prompt hi --backend tpu

# Chat mode and text streaming run.
"$kls" generate --model "$model" --prompt "What is KDA?" --chat --max-tokens 8 >/dev/null 2>"$work/err" \
  && pass || fail "chat generate: $(cat "$work/err")"

# Interactive: two turns on one session, then end of input.
printf 'first turn\nsecond turn\n' | "$kls" generate --model "$model" --interactive --max-tokens 4 \
  >/dev/null 2>"$work/err" && pass || fail "interactive: $(cat "$work/err")"
grep -c "session at" "$work/err" | grep -qx 2 && pass || fail "interactive did not run 2 turns: $(cat "$work/err")"

# Bad input: clear errors, right exit codes.
expect_error "unknown preset" 2 "unknown preset" -- "$kls" make-model --preset nope --out "$work/x"
expect_error "missing model dir" 1 "config.json" -- "$kls" generate --model "$work/none" --prompt hi
expect_error "no prompt" 2 "--prompt" -- "$kls" generate --model "$model"
expect_error "bad id" 2 "not a token id" -- "$kls" generate --model "$model" --prompt-ids "1 two 3"
expect_error "id out of range" 2 "outside the vocabulary" -- "$kls" generate --model "$model" --prompt-ids "1 99999"
expect_error "bad temperature" 2 "temperature" -- "$kls" generate --model "$model" --prompt hi --temperature -1
expect_error "bad top-p" 2 "top_p" -- "$kls" generate --model "$model" --prompt hi --top-p 0
long=$(head -c 70000 /dev/zero | tr '\0' 'a')
expect_error "prompt too long" 2 "context limit" -- "$kls" generate --model "$model" --prompt "$long"
expect_error "system without chat" 2 "--system needs" -- "$kls" generate --model "$model" --prompt hi --system be-brief
expect_error "chat with ids" 2 "excludes" -- "$kls" generate --model "$model" --prompt-ids "1 2" --chat
expect_error "48b weights" 1 "config-only" -- "$kls" make-model --preset kimi-linear-48b --out "$work/big"
"$kls" make-model --preset kimi-linear-48b --out "$work/big" --config-only 2>/dev/null && [ -s "$work/big/config.json" ] \
  && pass || fail "make-model --config-only of the 48b preset"
cp -r "$model" "$work/notok" && rm "$work/notok/tokenizer_config.json"
expect_error "missing tokenizer" 1 "tokenizer_config.json" -- "$kls" generate --model "$work/notok" --prompt hi
cp -r "$model" "$work/trunc" && truncate -s 1000 "$work/trunc/model.safetensors"
expect_error "truncated weights" 1 "model.safetensors" -- "$kls" generate --model "$work/trunc" --prompt hi

# The served path: kls serve, then kls chat (piped) and kls sessions against it.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr=127.0.0.1:$port
"$kls" serve --model "$model" --data-dir "$work/data" --listen "$addr" --http-listen 127.0.0.1:0 \
  2>"$work/serve.log" &
serve_pid=$!
ready=0
for _ in $(seq 1 300); do
  if "$kls" sessions ls --target "$addr" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.1
done
if [ "$ready" -eq 1 ]; then
  pass
  printf 'hello\n/session\n/fork branch\n/history\nsecond turn\n' |
    "$kls" chat --target "$addr" --temperature 0 --max-tokens 4 >"$work/chat.out" 2>"$work/chat.err" \
    && pass || fail "kls chat: $(cat "$work/chat.err")"
  grep -q 'branch' "$work/chat.out" "$work/chat.err" && pass || fail "chat /fork did not report the branch"
  grep -qF 'hello' "$work/chat.out" && pass || fail "chat /history lacks the first message"
  "$kls" sessions ls --target "$addr" >"$work/ls.out" 2>&1 && grep -q 'branch' "$work/ls.out" \
    && pass || fail "sessions ls: $(cat "$work/ls.out")"
  "$kls" sessions show branch --target "$addr" >/dev/null 2>&1 && pass || fail "sessions show"
  "$kls" sessions rm branch --target "$addr" >/dev/null 2>&1 && pass || fail "sessions rm"
  expect_error "show deleted" 1 "NOT_FOUND" -- "$kls" sessions show branch --target "$addr"
else
  fail "kls serve did not come up: $(tail -5 "$work/serve.log")"
fi
kill -TERM "$serve_pid" 2>/dev/null
wait "$serve_pid" && pass || fail "kls serve did not exit 0 on SIGTERM: $(tail -5 "$work/serve.log")"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
