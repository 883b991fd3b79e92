#!/usr/bin/env python3
"""Time to first token of turn 10 of a conversation through the OpenAI-compatible HTTP API.

Usage: .venv/bin/python bench/openai_ttft.py [--kls build/services/cli/kls] [--turns 10]
           [--user-chars 200] [--reply-tokens 64] [--repeats 5] [--out bench/results/...jsonl]

Starts `kls serve` on a fresh tiny model (CPU backend) and runs the same greedy conversation
three ways: /v1/chat/completions re-sending the full history every turn (stateless: one
ephemeral session per request, so the whole history is prefilled again), the same with
X-KLS-Session (only the new user message is fed), and /v1/responses with previous_response_id.
For the last turn it measures the time from sending the request to the first streamed event
that carries text (kls sends a reply's headers and first event once the first text exists).
Each way runs `repeats` fresh conversations; the JSON line has the median and all samples.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

MODEL = "kls-tiny"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_text(turn, chars):
    words = f"Turn {turn}: please continue the story about the river and the mountain. "
    return (words * (chars // len(words) + 1))[:chars]


def chat_turn(client, messages, max_tokens, headers=None):
    """Streams one chat turn; returns (ttft seconds, reply text)."""
    start = time.perf_counter()
    ttft = None
    text = ""
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True, extra_headers=headers)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None and ttft is None:
            ttft = time.perf_counter() - start
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return ttft, text


def responses_turn(client, text, previous, max_tokens):
    start = time.perf_counter()
    ttft = None
    response_id = None
    for event in client.responses.create(model=MODEL, input=text, max_output_tokens=max_tokens,
                                         temperature=0, stream=True,
                                         previous_response_id=previous):
        if event.type == "response.created":
            response_id = event.response.id
        if ttft is None and event.type in ("response.output_text.delta",
                                           "response.output_item.added"):
            ttft = time.perf_counter() - start
    return ttft, response_id


def run(args):
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "tiny")
        subprocess.run([args.kls, "make-model", "--preset", "tiny", "--out", model, "--seed", "1"],
                       check=True, stderr=subprocess.DEVNULL)
        port = free_port()
        log = open(os.path.join(work, "serve.log"), "w")
        proc = subprocess.Popen([args.kls, "serve", "--model", model, "--data-dir",
                                 os.path.join(work, "data"), "--listen",
                                 f"127.0.0.1:{free_port()}", "--http-listen",
                                 f"127.0.0.1:{port}", "--served-model-name", MODEL],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 60
            while True:
                try:
                    with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                   timeout=600)
            samples = {"full_history": [], "x_kls_session": [], "previous_response_id": []}
            prompt_tokens = {}
            for repeat in range(args.repeats):
                for way in ("full_history", "x_kls_session"):
                    headers = {"X-KLS-Session": f"bench-{repeat}"} if way == "x_kls_session" else None
                    messages = [{"role": "system", "content": "You are a storyteller."}]
                    for turn in range(1, args.turns + 1):
                        messages.append({"role": "user", "content": user_text(turn, args.user_chars)})
                        ttft, reply = chat_turn(client, messages, args.reply_tokens, headers)
                        messages.append({"role": "assistant", "content": reply})
                    samples[way].append(ttft * 1000)
                previous = None
                for turn in range(1, args.turns + 1):
                    ttft, previous = responses_turn(client, user_text(turn, args.user_chars),
                                                    previous, args.reply_tokens)
                samples["previous_response_id"].append(ttft * 1000)
                # The context of the last turn (the full-history prompt).
                last = client.chat.completions.create(model=MODEL, messages=messages[:-1],
                                                      max_tokens=1, temperature=0)
                prompt_tokens["full_history"] = last.usage.prompt_tokens
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    result = {"bench": "openai_ttft", "backend": "cpu", "model": "tiny", "turn": args.turns,
              "user_chars": args.user_chars, "reply_tokens": args.reply_tokens,
              "context_tokens_at_last_turn": prompt_tokens.get("full_history")}
    for way, values in samples.items():
        result[f"{way}_ttft_ms"] = round(statistics.median(values), 1)
    for way, values in samples.items():
        result[f"{way}_samples_ms"] = [round(v, 1) for v in values]
    result["speedup_session"] = round(result["full_history_ttft_ms"] /
                                      result["x_kls_session_ttft_ms"], 1)
    result["speedup_previous_response_id"] = round(result["full_history_ttft_ms"] /
                                                   result["previous_response_id_ttft_ms"], 1)
    return result


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kls", default=os.path.join(root, "build/services/cli/kls"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-chars", type=int, default=200)
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also append the JSON line to this file")
    args = parser.parse_args()
    line = json.dumps(run(args))
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
