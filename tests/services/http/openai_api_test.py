#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API of `kls serve`, driven by the official `openai` SDK.

Usage: openai_api_test.py PATH_TO_KLS [CHECK ...]   (the project's .venv python: openai, grpcio)

Starts `kls serve` on a fresh tiny model and checks: /v1/models; chat completions, plain and
streamed (with usage), equal to each other under greedy sampling; a 3-step previous_response_id
chain equal token for token to the same three turns through the gRPC Sessions API; branching
from an older response (equal to a gRPC fork at that version); streamed Responses events;
GET/DELETE of responses; store=false; X-KLS-Session conversations (only new messages are fed,
mismatching histories are refused); tool declarations and tool calls rendered with Kimi's special
tokens; a client that disconnects cancels its turn, streaming or not; racing continuations of one
response never replay each other (409 or their own turn); bodies nested too deeply are 400 and the
server survives; refused Responses/chat fields; ephemeral sessions carry a TTL and are deleted;
the documented errors (unknown response id, n > 1, bad JSON, unknown model, negative max_tokens,
413, 401 with API keys); and that the server keeps serving; 503 from a router without a ready
worker; 429 beyond --http-max-inflight; streams cut by a shutdown end with response.failed or a
chat error chunk. Every check that cannot run fails; nothing is skipped. Prints "N passed, M
failed".
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

import grpc
import openai

MODEL = "kls-tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# The tiny tokenizer's special ids: 256 byte tokens, then the Kimi specials (vocab_files.h).
TOOL_CALLS_SECTION_BEGIN_ID = 256 + 11
TOOL_CALL_BEGIN_ID = 256 + 13


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_stubs(work):
    """Python stubs of proto/kls/v1 with Debian's protoc and grpc_python_plugin."""
    out = os.path.join(work, "gen")
    os.makedirs(out)
    protos = [f"kls/v1/{name}.proto" for name in ("common", "sessions")]
    subprocess.run(["protoc", "-I", os.path.join(ROOT, "proto"), f"--python_out={out}",
                    f"--grpc_python_out={out}",
                    "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin", *protos],
                   check=True)
    sys.path.insert(0, out)
    from kls.v1 import common_pb2, sessions_pb2, sessions_pb2_grpc  # noqa: E402
    return common_pb2, sessions_pb2, sessions_pb2_grpc


class Server:
    """`kls serve` on its own data directory and ports; killed on close."""

    def __init__(self, kls, model, work, name, extra=()):
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log_path = os.path.join(work, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [kls, "serve", "--model", model, "--data-dir", os.path.join(work, f"{name}-data"),
             "--listen", f"127.0.0.1:{self.grpc_port}", "--http-listen",
             f"127.0.0.1:{self.http_port}", "--served-model-name", MODEL, *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.http_port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kls serve exited {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"kls serve did not become ready: {self.tail()}")

    def tail(self):
        with open(self.log_path) as f:
            return f.read()[-2000:]

    def close(self):
        code = self.proc.poll()
        if code is not None and code != 0:
            raise RuntimeError(f"kls serve had already died (exit {code}): {self.tail()}")
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise RuntimeError("kls serve did not exit on SIGTERM")
            if code != 0:
                raise RuntimeError(f"kls serve exited {code} on SIGTERM: {self.tail()}")


def raw_request(base, method, path, body=None, headers=None):
    """(status, parsed JSON or text) without the SDK, for bodies the SDK cannot send."""
    data = body if isinstance(body, (bytes, type(None))) else body.encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Checks:
    def __init__(self, kls, work):
        self.kls = kls
        self.work = work
        self.passed = 0
        self.failed = 0
        self.model = os.path.join(work, "tiny")
        subprocess.run([kls, "make-model", "--preset", "tiny", "--out", self.model, "--seed", "5"],
                       check=True, stderr=subprocess.DEVNULL)
        self.pb, self.spb, self.sgrpc = generate_stubs(work)
        self.server = Server(kls, self.model, work, "serve")
        self.client = openai.OpenAI(base_url=self.server.base + "/v1", api_key="unused",
                                    max_retries=0, timeout=120)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}")
        self.sessions = self.sgrpc.SessionsStub(self.channel)

    # ---- helpers ------------------------------------------------------------------------------

    def check(self, condition, message):
        if not condition:
            raise AssertionError(message)

    def run(self, name, fn):
        start = time.monotonic()
        try:
            fn()
            self.passed += 1
            print(f"ok   {name} ({time.monotonic() - start:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then the next check runs
            self.failed += 1
            print(f"FAIL {name} ({time.monotonic() - start:.1f} s)\n{traceback.format_exc()}")
            print(f"server log tail:\n{self.server.tail()}", flush=True)

    def grpc_turn(self, session_id, text, max_tokens):
        request = self.spb.GenerateRequest(session_id=session_id)
        request.messages.add(role="user", content=text)
        request.sampling.temperature = 0
        request.sampling.max_tokens = max_tokens
        ids, out = [], ""
        for response in self.sessions.Generate(request, timeout=120):
            ids += list(response.token_ids)
            out += response.text
        return ids, out

    def history(self, session_id):
        s = self.sessions.GetSession(
            self.spb.GetSessionRequest(session_id=session_id, include_history=True), timeout=30)
        return list(s.history_tokens), s

    @staticmethod
    def session_of(response_id):
        body = response_id[len("resp_"):]
        session, _, version = body.rpartition("_")
        return session, int(version)

    def expect_api_error(self, fn, status, code=None):
        try:
            fn()
        except openai.APIStatusError as e:
            self.check(e.status_code == status, f"expected HTTP {status}, got {e.status_code}: {e}")
            body = e.body if isinstance(e.body, dict) else {}
            error = body.get("error", body)
            self.check(isinstance(error, dict) and "message" in error and "type" in error,
                       f"not OpenAI's error shape: {e.body}")
            if code is not None:
                self.check(error.get("code") == code, f"expected code {code}: {e.body}")
            return
        raise AssertionError(f"expected HTTP {status}, the call succeeded")

    # ---- checks -------------------------------------------------------------------------------

    def models(self):
        ids = [m.id for m in self.client.models.list().data]
        self.check(ids == [MODEL], f"models: {ids}")
        self.check(self.client.models.retrieve(MODEL).id == MODEL, "models/{id}")

    def chat_plain_and_streamed(self):
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name three colors."}]
        plain = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                    temperature=0)
        choice = plain.choices[0]
        self.check(plain.object == "chat.completion", plain.object)
        self.check(choice.message.role == "assistant", choice.message.role)
        self.check(isinstance(choice.message.content, str), "no content")
        self.check(choice.finish_reason in ("stop", "length"), choice.finish_reason)
        self.check(1 <= plain.usage.completion_tokens <= 12, plain.usage)
        self.check(plain.usage.prompt_tokens > 10, plain.usage)
        self.check(plain.usage.total_tokens ==
                   plain.usage.prompt_tokens + plain.usage.completion_tokens, plain.usage)

        chunks = list(self.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                    and c.choices[0].finish_reason]
        self.check(text == choice.message.content,
                   f"streamed {text!r} != plain {choice.message.content!r}")
        self.check(finishes == [choice.finish_reason], finishes)
        self.check(chunks[0].choices[0].delta.role == "assistant", chunks[0])
        last = chunks[-1]
        self.check(last.choices == [] and last.usage is not None, f"usage chunk: {last}")
        self.check(last.usage.completion_tokens == plain.usage.completion_tokens, last.usage)
        self.check(all(c.usage is None for c in chunks[:-1]), "usage before the last chunk")

    def responses_chain_equals_grpc(self):
        inputs = ["Tell me about rivers.", "And mountains?", "Which is older?"]
        max_tokens = 10
        previous = None
        responses = []
        for text in inputs:
            r = self.client.responses.create(model=MODEL, input=text, max_output_tokens=max_tokens,
                                             temperature=0, previous_response_id=previous)
            responses.append(r)
            previous = r.id
        sessions = {self.session_of(r.id)[0] for r in responses}
        self.check(len(sessions) == 1, f"one session expected: {[r.id for r in responses]}")
        versions = [self.session_of(r.id)[1] for r in responses]
        self.check(versions == [1, 2, 3], versions)
        self.check(responses[1].previous_response_id == responses[0].id, responses[1])

        created = self.sessions.CreateSession(self.spb.CreateSessionRequest(), timeout=30)
        for text, r in zip(inputs, responses):
            _, grpc_text = self.grpc_turn(created.session_id, text, max_tokens)
            self.check(r.output_text == grpc_text,
                       f"turn text differs: {r.output_text!r} vs {grpc_text!r}")
        http_history, _ = self.history(sessions.pop())
        grpc_history, _ = self.history(created.session_id)
        self.check(http_history == grpc_history,
                   f"token histories differ ({len(http_history)} vs {len(grpc_history)} tokens)")
        self.check(responses[2].usage.input_tokens_details.cached_tokens > 0, responses[2].usage)
        self.chain = responses
        self.chain_grpc_session = created.session_id

    def branch_from_older_response(self):
        first, third = self.chain[0], self.chain[2]
        branch = self.client.responses.create(model=MODEL, input="What about lakes?",
                                              max_output_tokens=10, temperature=0,
                                              previous_response_id=first.id)
        branch_session, version = self.session_of(branch.id)
        self.check(branch_session != self.session_of(first.id)[0], "a branch is a new session")
        self.check(version == 2, branch.id)
        # The original conversation is untouched.
        _, original = self.history(self.session_of(third.id)[0])
        self.check(original.version == 3, original.version)
        # Equal to forking the gRPC twin at version 1 and running the same turn.
        fork = self.sessions.ForkSession(
            self.spb.ForkSessionRequest(session_id=self.chain_grpc_session, version=1), timeout=30)
        _, grpc_text = self.grpc_turn(fork.session_id, "What about lakes?", 10)
        self.check(branch.output_text == grpc_text, f"{branch.output_text!r} vs {grpc_text!r}")
        self.check(self.history(branch_session)[0] == self.history(fork.session_id)[0],
                   "branch history differs from the gRPC fork")
        # Continuing the branch is a plain turn on it.
        more = self.client.responses.create(model=MODEL, input="ok", max_output_tokens=4,
                                            temperature=0, previous_response_id=branch.id)
        self.check(self.session_of(more.id) == (branch_session, 3), more.id)

    def responses_streamed(self):
        events = list(self.client.responses.create(
            model=MODEL, input="Stream please.", max_output_tokens=8, temperature=0, stream=True,
            previous_response_id=self.chain[2].id))
        types = [e.type for e in events]
        self.check(types[:2] == ["response.created", "response.in_progress"], types)
        self.check(types[-1] in ("response.completed", "response.incomplete"), types)
        for t in ("response.output_item.added", "response.content_part.added",
                  "response.output_text.done", "response.content_part.done",
                  "response.output_item.done"):
            self.check(t in types, f"{t} missing: {types}")
        self.check([e.sequence_number for e in events] == list(range(len(events))), "sequence")
        final = events[-1].response
        self.check(final.id == events[0].response.id, "the response id changed")
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        self.check(final.output_text == deltas, f"{final.output_text!r} vs {deltas!r}")
        self.check(self.session_of(final.id) == (self.session_of(self.chain[2].id)[0], 4),
                   final.id)
        # The same turn, not streamed, from the same point (a fork) gives the same text.
        again = self.client.responses.create(model=MODEL, input="Stream please.",
                                             max_output_tokens=8, temperature=0,
                                             previous_response_id=self.chain[2].id)
        self.check(again.output_text == deltas, f"{again.output_text!r} vs {deltas!r}")

    def get_and_delete(self):
        second = self.chain[1]
        got = self.client.responses.retrieve(second.id)
        self.check(got.id == second.id, got.id)
        self.check(got.output_text == second.output_text,
                   f"{got.output_text!r} vs {second.output_text!r}")
        self.check(got.previous_response_id == self.chain[0].id, got.previous_response_id)
        self.check(got.status == second.status, f"{got.status} vs {second.status}")
        doomed = self.client.responses.create(model=MODEL, input="bye", max_output_tokens=2)
        self.client.responses.delete(doomed.id)
        self.expect_api_error(lambda: self.client.responses.retrieve(doomed.id), 404)
        self.expect_api_error(lambda: self.client.responses.delete(doomed.id), 404)
        # A version the session has not reached yet is unknown too.
        session, version = self.session_of(second.id)
        self.expect_api_error(
            lambda: self.client.responses.retrieve(f"resp_{session}_{version + 100}"), 404)

    def store_false(self):
        r = self.client.responses.create(model=MODEL, input="forget me", max_output_tokens=3,
                                         store=False)
        self.check(r.store is False, r.store)
        self.expect_api_error(lambda: self.client.responses.create(
            model=MODEL, input="x", max_output_tokens=2, previous_response_id=r.id), 404)
        # store=false on top of a stored conversation leaves it as it was.
        before = self.history(self.session_of(self.chain[0].id)[0])[1].version
        self.client.responses.create(model=MODEL, input="aside", max_output_tokens=2, store=False,
                                     previous_response_id=self.chain[0].id)
        after = self.history(self.session_of(self.chain[0].id)[0])[1].version
        self.check(before == after, f"{before} -> {after}")

    def session_header(self):
        headers = {"X-KLS-Session": "conv-1"}
        messages = [{"role": "system", "content": "Be short."},
                    {"role": "user", "content": "Hello there."}]
        contexts = []
        for turn in range(3):
            r = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                    temperature=0, extra_headers=headers)
            contexts.append(r.usage)
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
            messages.append({"role": "user", "content": f"Go on ({turn})."})
        _, session = self.history("conv-1")
        self.check(session.version == 3, session.version)
        # Turns 2 and 3 fed only the new message: the rest was cached in the session.
        self.check(contexts[0].prompt_tokens_details.cached_tokens == 0, contexts[0])
        for u in contexts[1:]:
            cached = u.prompt_tokens_details.cached_tokens
            self.check(cached > 0 and u.prompt_tokens - cached < 30, u)
        # A history that is not the session's is refused with 409, and the session is unchanged.
        edited = [dict(m) for m in messages]
        edited[1]["content"] = "Goodbye."
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=edited, max_tokens=2, extra_headers=headers), 409)
        no_reply = messages[:-2] + [messages[-1]]
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=no_reply, max_tokens=2, extra_headers=headers), 409)
        self.check(self.history("conv-1")[1].version == 3, "a refused request changed the session")
        # A session with gRPC-made turns is not mistaken for a chat.
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"X-KLS-Session": self.chain_grpc_session}), 409)
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"X-KLS-Session": "bad id!"}), 400)

    def tools_rendered_with_special_tokens(self):
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
        messages = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{
                "id": "functions.get_weather:0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        ]
        r = self.client.chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                                max_tokens=4, temperature=0,
                                                extra_headers={"X-KLS-Session": "tools-1"})
        self.check(r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r)
        ids, session = self.history("tools-1")
        text = session.history_text
        self.check(text.startswith('<|im_system|>tool_declare<|im_middle|>[{"type":"function",'
                                   '"function":{"name":"get_weather"'), text[:120])
        self.check("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                   '<|tool_call_argument_begin|>{"city":"Paris"}<|tool_call_end|>'
                   "<|tool_calls_section_end|><|im_end|>" in text, text)
        self.check("<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny"
                   in text, text)
        # The markers are the special tokens themselves, not their spelling as text.
        self.check(ids.count(TOOL_CALLS_SECTION_BEGIN_ID) == 1 and
                   ids.count(TOOL_CALL_BEGIN_ID) == 1, "tool-call markers are not special tokens")
        # The Responses API renders function calls and their outputs the same way.
        rr = self.client.responses.create(
            model=MODEL, max_output_tokens=3, temperature=0,
            tools=[{"type": "function", "name": "get_weather", "parameters": {}}],
            input=[{"role": "user", "content": "Weather?"},
                   {"type": "function_call", "call_id": "functions.get_weather:0",
                    "name": "get_weather", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "functions.get_weather:0",
                    "output": "rain"}])
        ids, session = self.history(self.session_of(rr.id)[0])
        self.check(ids.count(TOOL_CALL_BEGIN_ID) == 1, "responses: no tool-call token")
        self.check("## Return of functions.get_weather:0\nrain" in session.history_text,
                   session.history_text)

    def disconnect_cancels_the_turn(self):
        # A long streamed turn on a named session; the client reads one event and goes away.
        body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 8000, "temperature": 0,
                           "ignore_eos": True,
                           "messages": [{"role": "user", "content": "Talk for a long time."}]})
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "X-KLS-Session": "gone-1"})
        response = conn.getresponse()
        self.check(response.status == 200, response.status)
        first = response.readline()
        self.check(first.startswith(b"data: "), f"no first event: {first!r}")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.expect_rolled_back("gone-1")

    def expect_rolled_back(self, session):
        # After a client went away mid-turn: the session soon takes a new turn (409 while the
        # cancelled one winds down), holds none of the cancelled turn's tokens and is at version 1.
        started = time.time()
        while True:
            try:
                r = self.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=2,
                    extra_headers={"X-KLS-Session": session})
                break
            except openai.ConflictError:
                self.check(time.time() - started < 5, "the turn was not cancelled")
                time.sleep(0.05)
        self.check(r.usage.prompt_tokens_details.cached_tokens == 0,
                   f"the cancelled turn left tokens in the session: {r.usage}")
        self.check(self.history(session)[1].version == 1, "cancelled turn committed")

    def non_streaming_disconnect_cancels_the_turn(self):
        # A long non-streaming turn whose tokens keep coming: the client goes away before any
        # reply byte, and the turn is still cancelled and rolled back.
        body = json.dumps({"model": MODEL, "max_tokens": 8000, "temperature": 0,
                           "ignore_eos": True,
                           "messages": [{"role": "user", "content": "Talk for a long time."}]})
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "X-KLS-Session": "gone-2"})
        deadline = time.time() + 10
        while True:  # the handler made the session: the turn is about to run or running
            try:
                self.sessions.GetSession(self.spb.GetSessionRequest(session_id="gone-2"),
                                         timeout=30)
                break
            except grpc.RpcError as e:
                self.check(e.code() == grpc.StatusCode.NOT_FOUND and time.time() < deadline,
                           f"session gone-2 was not created: {e}")
                time.sleep(0.01)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.expect_rolled_back("gone-2")

    def concurrent_continuations_never_replay(self):
        # Racing continuations of one latest response: each request either gets its own turn
        # (on the session, or on a fork when it came after the winner) or 409 — never the
        # winner's output under the winner's id.
        latest = self.client.responses.create(model=MODEL, input="race", max_output_tokens=1,
                                              temperature=0)
        racers = 4
        for rnd in range(12):
            results = [None] * racers
            texts = [f"racer {rnd}-{i} " + "long input " * (100 * (i % 2)) for i in range(racers)]

            def go(i, previous=latest.id):
                try:
                    results[i] = self.client.responses.create(
                        model=MODEL, input=texts[i], max_output_tokens=1, temperature=0,
                        previous_response_id=previous)
                except openai.APIStatusError as e:
                    results[i] = e
            threads = [threading.Thread(target=go, args=(i,)) for i in range(racers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            won = [(i, r) for i, r in enumerate(results) if not isinstance(r, Exception)]
            for r in results:
                if isinstance(r, Exception):
                    self.check(r.status_code == 409, f"a lost race is 409, got {r}")
            self.check(won, f"round {rnd}: every racer failed: {results}")
            ids = [r.id for _, r in won]
            self.check(len(set(ids)) == len(ids), f"round {rnd}: a response was replayed: {ids}")
            for i, r in won:
                session, version = self.session_of(r.id)
                _, s = self.history(session)
                self.check(texts[i].strip() in s.history_text,
                           f"round {rnd}: {r.id} does not hold racer {i}'s input")
                got = self.client.responses.retrieve(r.id)
                self.check(got.output_text == r.output_text, f"GET {r.id}: {got.output_text!r}")
            on_session = [r for _, r in won
                          if self.session_of(r.id)[0] == self.session_of(latest.id)[0]]
            self.check(len(on_session) == 1, f"round {rnd}: {ids}")
            latest = on_session[0]

    def deep_nesting_is_400(self):
        base = self.server.base
        deep = 1_000_000
        # Nested objects in a tool's parameters (rendered into the prompt) and in arguments.
        params = '{"a":' * deep + "1" + "}" * deep
        chat = ('{"model": "%s", "messages": [{"role": "user", "content": "x"}], "tools": '
                '[{"type": "function", "function": {"name": "f", "parameters": %s}}]}'
                % (MODEL, params))
        responses = ('{"model": "%s", "input": "x", "tools": [{"type": "function", "name": "f", '
                     '"parameters": %s}]}' % (MODEL, params))
        arrays = '{"model": "%s", "messages": %s}' % (MODEL, "[" * deep + "]" * deep)
        for path, body in (("/v1/chat/completions", chat), ("/v1/responses", responses),
                           ("/v1/chat/completions", arrays)):
            status, reply = raw_request(base, "POST", path, body)
            self.check(status == 400 and reply["error"]["type"] == "invalid_request_error" and
                       "nest" in reply["error"]["message"], f"{path}: {status} {str(reply)[:300]}")
        # 64 levels are fine (the request object is the first).
        ok = ('{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, '
              '"tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]}'
              % (MODEL, '{"a":' * 59 + "1" + "}" * 59))
        status, reply = raw_request(base, "POST", "/v1/chat/completions", ok)
        self.check(status == 200, f"{status} {str(reply)[:300]}")
        r = self.client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                        "content": "hi"}],
                                                max_tokens=2)
        self.check(r.choices[0].message.content is not None, "the server stopped serving")

    def unsupported_fields_are_400(self):
        user = [{"role": "user", "content": "hi"}]
        for kwargs, field in (({"background": True}, "background"),
                              ({"truncation": "auto"}, "truncation"),
                              ({"parallel_tool_calls": False}, "parallel_tool_calls"),
                              ({"extra_body": {"stop": ["x"]}}, "stop")):
            try:
                self.client.responses.create(model=MODEL, input="x", max_output_tokens=2,
                                             **kwargs)
            except openai.BadRequestError as e:
                self.check(field in e.body["message"], f"{field}: {e.body}")
                continue
            raise AssertionError(f"responses {field}: expected 400")
        for kwargs, field in (({"parallel_tool_calls": False}, "parallel_tool_calls"),
                              ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens")):
            try:
                self.client.chat.completions.create(model=MODEL, messages=user, **kwargs)
            except openai.BadRequestError as e:
                self.check(field in e.body["message"], f"{field}: {e.body}")
                continue
            raise AssertionError(f"chat {field}: expected 400")
        # Accepted: the default truncation, parallel calls on, and equal token limits.
        r = self.client.responses.create(model=MODEL, input="x", max_output_tokens=2,
                                         truncation="disabled", parallel_tool_calls=True,
                                         background=False)
        self.check(r.parallel_tool_calls is True and r.truncation == "disabled", r)
        c = self.client.chat.completions.create(model=MODEL, messages=user, max_tokens=2,
                                                max_completion_tokens=2)
        self.check(c.usage.completion_tokens <= 2, c.usage)

    def ephemeral_sessions_expire(self):
        # A stateless request's session has a short TTL while it runs, and is gone after.
        body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 8000, "ignore_eos": True,
                           "messages": [{"role": "user", "content": "ephemeral"}]})
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        self.check(response.status == 200, response.status)
        self.check(response.readline().startswith(b"data: "), "no first event")
        now_ms = time.time() * 1000
        listed = self.sessions.ListSessions(self.spb.ListSessionsRequest(page_size=1000),
                                            timeout=30).sessions
        expiring = [s for s in listed if s.expire_time_ms > 0]
        self.check(expiring, "no session with a TTL: the running request's session never expires")
        ttls = [(s.expire_time_ms - now_ms) / 1000 for s in expiring]
        self.check(all(0 < t <= 305 for t in ttls) and max(ttls) > 280, f"TTLs {ttls} s")
        expiring = [s for s, t in zip(expiring, ttls) if t > 280]
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.time() + 5
        while True:
            try:
                self.sessions.GetSession(
                    self.spb.GetSessionRequest(session_id=expiring[0].session_id), timeout=30)
            except grpc.RpcError as e:
                self.check(e.code() == grpc.StatusCode.NOT_FOUND, e)
                break
            self.check(time.time() < deadline, "the ephemeral session was not deleted")
            time.sleep(0.05)

    def admission_and_errors_after_headers(self):
        # At most 2 turns in flight: the third request is 429. Then SIGTERM with a 1 s grace:
        # the running streams end with their API's error event (response.failed; an error
        # chunk for chat completions), since their status lines are gone.
        server = Server(self.kls, self.model, self.work, "limited",
                        ["--http-max-inflight", "2", "--drain-timeout", "1"])
        try:
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused",
                                   max_retries=0, timeout=120)
            started = threading.Barrier(3)
            outcome = {}

            def responses():
                events = []
                try:
                    for e in client.responses.create(model=MODEL, input="long", stream=True,
                                                     max_output_tokens=8000,
                                                     extra_body={"ignore_eos": True}):
                        if not events:
                            started.wait()
                        events.append(e)
                except Exception as e:  # noqa: BLE001 - recorded and checked below
                    outcome["responses_error"] = e
                outcome["responses"] = events

            def chat():
                chunks = []
                try:
                    for c in client.chat.completions.create(
                            model=MODEL, messages=[{"role": "user", "content": "long"}],
                            stream=True, max_tokens=8000, extra_body={"ignore_eos": True}):
                        if not chunks:
                            started.wait()
                        chunks.append(c)
                except Exception as e:  # noqa: BLE001 - recorded and checked below
                    outcome["chat_error"] = e
                outcome["chat"] = chunks
            threads = [threading.Thread(target=responses), threading.Thread(target=chat)]
            for t in threads:
                t.start()
            started.wait(timeout=60)
            self.expect_api_error(lambda: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2), 429,
                code="rate_limit_exceeded")
            self.expect_api_error(lambda: client.responses.create(
                model=MODEL, input="x", max_output_tokens=2), 429, code="rate_limit_exceeded")
            server.proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(timeout=60)
            events = outcome.get("responses", [])
            self.check("responses_error" not in outcome, outcome.get("responses_error"))
            self.check(events and events[-1].type == "response.failed",
                       f"last event: {events[-1] if events else None}")
            failed = events[-1].response
            self.check(failed.status == "failed" and failed.error is not None and
                       failed.error.message, failed)
            self.check(isinstance(outcome.get("chat_error"), openai.APIError),
                       f"chat stream: {outcome.get('chat_error')!r}")
            self.check(server.proc.wait(timeout=30) == 0, f"exit {server.proc.returncode}")
        finally:
            server.close()

    def errors(self):
        base = self.server.base
        user = [{"role": "user", "content": "hi"}]
        self.expect_api_error(lambda: self.client.responses.retrieve("resp_nosuch_1"), 404)
        self.expect_api_error(lambda: self.client.responses.retrieve("not-an-id"), 404)
        self.expect_api_error(lambda: self.client.responses.create(
            model=MODEL, input="x", previous_response_id="resp_nosuch_3"), 404)
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=user, n=2), 400)
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model="gpt-4o", messages=user), 404, code="model_not_found")
        self.expect_api_error(lambda: self.client.responses.create(model="gpt-4o", input="x"),
                              404, code="model_not_found")
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=user, max_tokens=-1), 400)
        self.expect_api_error(lambda: self.client.chat.completions.create(
            model=MODEL, messages=user, max_tokens=10 ** 6), 400)
        for body in ("{bad json", "[]", json.dumps({"model": MODEL})):
            status, reply = raw_request(base, "POST", "/v1/chat/completions", body)
            self.check(status == 400 and reply["error"]["type"] == "invalid_request_error",
                       f"{body}: {status} {reply}")
        status, reply = raw_request(base, "POST", "/v1/chat/completions",
                                    b"{" + b" " * (17 << 20) + b"}")
        self.check(status == 413 and reply["error"]["code"] == "request_too_large",
                   f"{status} {reply}")
        status, reply = raw_request(base, "GET", "/v1/nothing")
        self.check(status == 404 and "error" in reply, f"{status} {reply}")
        # Still serving.
        r = self.client.chat.completions.create(model=MODEL, messages=user, max_tokens=2)
        self.check(r.choices[0].message.content is not None, r)

    def no_worker_is_503(self):
        # A router whose only worker does not exist: not ready, and turns are 503.
        http_port = free_port()
        log_path = os.path.join(self.work, "router.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [self.kls, "router", "--workers", f"127.0.0.1:{free_port()}", "--listen",
                 f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http_port}",
                 "--served-model-name", MODEL], stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{http_port}"
            deadline = time.time() + 30
            while True:
                try:
                    with urllib.request.urlopen(base + "/healthz", timeout=1):
                        break
                except OSError:
                    self.check(time.time() < deadline and proc.poll() is None,
                               f"kls router did not come up: {open(log_path).read()[-2000:]}")
                    time.sleep(0.05)
            status, _ = raw_request(base, "GET", "/readyz")
            self.check(status == 503, f"/readyz {status}")
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
            self.expect_api_error(lambda: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2), 503,
                code="service_unavailable")
            self.expect_api_error(lambda: client.responses.create(model=MODEL, input="x"), 503)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        self.check(code == 0, f"kls router exited {code}")

    def api_keys(self):
        keys = os.path.join(self.work, "keys")
        with open(keys, "w") as f:
            f.write("sk-alice alice\nsk-bob bob\n")
        server = Server(self.kls, self.model, self.work, "keys", ["--api-keys", keys])
        try:
            def client(key):
                return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
            self.expect_api_error(lambda: client("sk-wrong").models.list(), 401,
                                  code="invalid_api_key")
            self.expect_api_error(lambda: client("sk-wrong").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2), 401)
            status, reply = raw_request(server.base, "GET", "/v1/models")
            self.check(status == 401 and reply["error"]["code"] == "invalid_api_key", reply)
            alice = client("sk-alice")
            self.check([m.id for m in alice.models.list().data] == [MODEL], "alice models")
            r = alice.responses.create(model=MODEL, input="mine", max_output_tokens=2)
            # Tenants are isolated: bob cannot see or continue alice's response.
            self.expect_api_error(lambda: client("sk-bob").responses.retrieve(r.id), 404)
            self.expect_api_error(lambda: client("sk-bob").responses.create(
                model=MODEL, input="x", previous_response_id=r.id), 404)
            self.check(alice.responses.retrieve(r.id).id == r.id, "alice's own response")
        finally:
            server.close()


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    kls = os.path.abspath(sys.argv[1])
    only = set(sys.argv[2:])  # while developing: run only these checks
    with tempfile.TemporaryDirectory() as work:
        checks = Checks(kls, work)
        try:
            for name in ("models", "chat_plain_and_streamed", "responses_chain_equals_grpc",
                         "branch_from_older_response", "responses_streamed", "get_and_delete",
                         "store_false", "session_header", "tools_rendered_with_special_tokens",
                         "disconnect_cancels_the_turn",
                         "non_streaming_disconnect_cancels_the_turn",
                         "concurrent_continuations_never_replay", "deep_nesting_is_400",
                         "unsupported_fields_are_400", "ephemeral_sessions_expire", "errors",
                         "no_worker_is_503", "api_keys", "admission_and_errors_after_headers"):
                if not only or name in only:
                    checks.run(name, getattr(checks, name))
            checks.run("sigterm_exits_0", checks.server.close)
        finally:
            checks.channel.close()
            if checks.server.proc.poll() is None:
                checks.server.proc.kill()
        print(f"{checks.passed} passed, {checks.failed} failed")
        return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
