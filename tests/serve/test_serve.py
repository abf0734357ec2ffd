#!/usr/bin/env python3
"""End-to-end test of `lowbit serve` (CTest: serve_openai), driven by the official `openai` client
and by curl: completions, chat, streaming, stop strings, reproducible seeds, 16 concurrent clients
whose greedy answers equal the same requests run alone, the bad-input cases (400/401/404/413),
a client disconnecting mid-stream, SIGTERM with requests in flight, and tensor-parallel serving
(--tp 2: the answers of one rank).

Models: stories260K (always, when ../shared is present) and SmolLM2-135M-Instruct where present.
Bounded in time (SIGALRM); every server started here is killed at the end. Exit status 77 = skipped
(python modules, curl or the shared models missing)."""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SKIP = 77


def skip(msg):
    print(f"SKIP: {msg}")
    sys.exit(SKIP)


try:
    import openai
except ImportError:
    skip("python module 'openai' missing (pip install openai; scripts/install-deps.sh installs it)")

servers = []


class Server:
    def __init__(self, lowbit, model, extra=(), tokenizer=None):
        args = [lowbit, "-q", "serve", "-m", model, "--port", "0"] + list(extra)
        if tokenizer:
            args += ["--tokenizer", tokenizer]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        servers.append(self)
        self.log = []
        deadline = time.time() + 120
        self.port = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.kill()
            raise RuntimeError("server did not start: " + "".join(self.log))
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=600)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}


def post(url, body, headers=None, raw=False):
    """POST; returns (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) else (body if raw else json.dumps(body)).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def curl(*args):
    r = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


failures = []


def check(cond, what):
    if cond:
        print(f"  ok: {what}")
    else:
        print(f"  FAIL: {what}")
        failures.append(what)


def greedy(client, prompt, n, **kw):
    r = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r.choices[0].text, r


def common_checks(srv, prompts, n_tokens, chat):
    c = srv.client()
    # /health and /v1/models with curl.
    check(json.loads(curl(srv.url + "/health")) == {"status": "ok"}, "GET /health")
    models = json.loads(curl(srv.url + "/v1/models"))
    check(models["object"] == "list" and len(models["data"]) == 1, "GET /v1/models lists the model")
    check([m.id for m in c.models.list().data] == [models["data"][0]["id"]], "openai models.list")

    # Completion, usage.
    text, r = greedy(c, prompts[0], n_tokens)
    check(len(text) > 0 and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
          and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "completion with usage")
    # Streaming (openai client) gives the same text; curl sees the SSE end marker.
    chunks = c.completions.create(model="m", prompt=prompts[0], max_tokens=n_tokens, temperature=0, stream=True)
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    check(streamed == text, "streamed completion equals the non-streamed one")
    sse = curl("-N", srv.url + "/v1/completions", "-d",
               json.dumps({"prompt": prompts[0], "max_tokens": 4, "temperature": 0, "stream": True}))
    check(sse.rstrip().endswith("data: [DONE]") and sse.startswith("data: {"), "curl stream ends with data: [DONE]")
    usage_chunks = [json.loads(l[6:]) for l in sse.splitlines() if l.startswith("data: {")]
    check(all("usage" not in u for u in usage_chunks), "no usage chunk without stream_options")

    # Stop strings: the text ends before the first occurrence; finish_reason stop.
    long_text, _ = greedy(c, prompts[0], 40)
    words = long_text.split()
    if len(words) >= 4:
        stop = words[3]
        r = c.completions.create(model="m", prompt=prompts[0], max_tokens=40, temperature=0, stop=[stop, "\u00a7never"])
        check(r.choices[0].text == long_text[:long_text.find(stop)] and r.choices[0].finish_reason == "stop",
              f"stop string {stop!r} cuts the text")
        st = c.completions.create(model="m", prompt=prompts[0], max_tokens=40, temperature=0, stop=stop, stream=True)
        check("".join(ch.choices[0].text for ch in st if ch.choices) == long_text[:long_text.find(stop)],
              "stop string while streaming")
    r = c.completions.create(model="m", prompt=prompts[0], max_tokens=3, temperature=0)
    check(r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 3, "max_tokens respected")

    # Seeds reproduce; another seed (almost surely) differs.
    def sampled(seed):
        return c.completions.create(model="m", prompt=prompts[1], max_tokens=24, temperature=1.0, top_p=0.95,
                                    seed=seed).choices[0].text
    a, b, d = sampled(1234), sampled(1234), sampled(99)
    check(a == b, "same seed, same text")
    check(a != d, "different seed, different text")

    # 16 concurrent clients, greedy: answers complete and equal to the same requests run alone.
    reqs = [prompts[i % len(prompts)] + (" " + str(i) if i >= len(prompts) else "") for i in range(16)]
    alone = [greedy(c, p, n_tokens)[0] for p in reqs]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda p: greedy(srv.client(), p, n_tokens)[0], reqs))
    same = sum(x == y for x, y in zip(alone, together))
    check(same == 16, f"16 concurrent greedy answers equal the ones run alone ({same}/16)")
    m = srv.metrics()
    check(m["lowbit_decode_rows_total"] > m["lowbit_decode_steps_total"], "sequences were decoded in batches")

    if chat:
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=16, temperature=0)
        answer = r.choices[0].message.content
        check(r.choices[0].message.role == "assistant" and len(answer) > 0 and r.usage.prompt_tokens > 10,
              f"chat completion ({answer!r})")
        st = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
        parts, usage = [], None
        for ch in st:
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
            if ch.usage:
                usage = ch.usage
        check("".join(parts) == answer and usage is not None and usage.completion_tokens == r.usage.completion_tokens,
              "streamed chat equals the non-streamed one, usage chunk at the end")
    else:
        try:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            check(False, "chat on a model without a chat template is refused")
        except openai.BadRequestError as e:
            check("chat template" in str(e), "chat on a model without a chat template: 400")


def bad_input_checks(srv, ctx, max_body):
    u = srv.url + "/v1/completions"
    cases = [
        ("malformed JSON", b"{\"prompt\": ", 400, None),
        ("not an object", b"[1, 2]", 400, None),
        ("prompt of the wrong type", {"prompt": 5}, 400, "prompt"),
        ("max_tokens a string", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
        ("max_tokens 0", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("temperature out of range", {"prompt": "a", "temperature": 5}, 400, "temperature"),
        ("top_p 0", {"prompt": "a", "top_p": 0}, 400, "top_p"),
        ("seed a float", {"prompt": "a", "seed": 1.5}, 400, "seed"),
        ("stop a number", {"prompt": "a", "stop": 3}, 400, "stop"),
        ("stream a string", {"prompt": "a", "stream": "yes"}, 400, "stream"),
        ("n = 2", {"prompt": "a", "n": 2}, 400, "n"),
        ("token id outside the vocabulary", {"prompt": [1, 99999999]}, 400, None),
        ("deep nesting", ("{\"prompt\": " + "[" * 5000 + "]" * 5000 + "}").encode(), 400, None),
    ]
    for what, body, status, param in cases:
        code, j = post(u, body if isinstance(body, bytes) else body)
        ok = code == status and isinstance(j.get("error", {}).get("message"), str)
        if param:
            ok = ok and j["error"].get("param") == param
        check(ok, f"{what}: {status} with an error object ({code}: {j.get('error', {}).get('message')})")
    code, j = post(srv.url + "/v1/chat/completions", {"messages": "hi"})
    check(code == 400 and j["error"]["param"] == "messages", "chat: messages of the wrong type: 400")
    long_prompt = list(range(3, 3 + ctx + 5))
    code, j = post(u, {"prompt": long_prompt, "max_tokens": 1})
    msg = j.get("error", {}).get("message", "")
    check(code == 400 and str(ctx + 5) in msg and str(ctx) in msg, f"prompt longer than the context: 400 naming both ({msg})")
    code, j = post(u, b"{\"prompt\": \"" + b"a" * (max_body + 10) + b"\"}")
    check(code == 413 and "error" in j, f"body over --max-body: 413 ({code})")
    try:
        with urllib.request.urlopen(srv.url + "/v1/nothing", timeout=10):
            check(False, "unknown path: 404")
    except urllib.error.HTTPError as e:
        check(e.code == 404 and "error" in json.loads(e.read().decode()), "unknown path: 404 with an error object")
    # Garbage on the socket does not hurt the server.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"\x00\xffGARBAGE / HTTP/9.9\r\n\r\n")
        try:
            s.recv(4096)
        except OSError:
            pass
    check(json.loads(curl(srv.url + "/health"))["status"] == "ok", "server alive after garbage and bad requests")


def disconnect_check(srv, prompt):
    before = srv.metrics()
    body = json.dumps({"prompt": prompt, "max_tokens": 100000, "temperature": 1.0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    deadline, m = time.time() + 20, None
    while time.time() < deadline:
        m = srv.metrics()
        if m["lowbit_requests_cancelled_total"] > before["lowbit_requests_cancelled_total"] and m["lowbit_active_slots"] == 0:
            break
        time.sleep(0.1)
    check(b"data: " in got and m["lowbit_requests_cancelled_total"] > before["lowbit_requests_cancelled_total"]
          and m["lowbit_active_slots"] == 0, "client disconnect mid-stream cancels the request and frees its slot")


def auth_checks(lowbit, model, tokenizer):
    srv = Server(lowbit, model, ["--api-key", "s3cret", "--threads", "1"], tokenizer)
    try:
        u = srv.url + "/v1/completions"
        code, _ = post(u, {"prompt": "Once", "max_tokens": 2})
        check(code == 401, "--api-key: no Authorization header: 401")
        code, _ = post(u, {"prompt": "Once", "max_tokens": 2}, {"Authorization": "Bearer wrong"})
        check(code == 401, "--api-key: wrong key: 401")
        code, j = post(u, {"prompt": "Once", "max_tokens": 2}, {"Authorization": "Bearer s3cret"})
        check(code == 200 and j["choices"][0]["text"] is not None, "--api-key: right key: 200")
        try:
            srv.client("wrong").models.list()
            check(False, "openai client with a wrong key is refused")
        except openai.AuthenticationError:
            check(True, "openai client with a wrong key: AuthenticationError")
        check(json.loads(curl(srv.url + "/health"))["status"] == "ok", "/health needs no key")
    finally:
        srv.kill()


def sigterm_check(lowbit, model, tokenizer, prompt):
    srv = Server(lowbit, model, ["--threads", "1", "--parallel", "2"], tokenizer)
    results = []

    def one(i):
        try:
            results.append(post(srv.url + "/v1/completions", {"prompt": prompt, "max_tokens": 400, "temperature": 1.0,
                                                                "seed": i}))
        except Exception as e:  # noqa: BLE001
            results.append((0, str(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while time.time() < deadline and srv.metrics()["lowbit_requests_total"] < 6:
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    try:
        rc = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        rc = None
    srv.kill()
    check(rc == 0, f"SIGTERM: exit status 0 ({rc})")
    check(len(results) == 6 and all(code == 200 and "choices" in j for code, j in results),
          f"SIGTERM: the requests in flight were answered ({[c for c, _ in results]})")
    check(any("shutting down" in l for l in srv.log), "SIGTERM: shutdown logged")


def tp_checks(lowbit, model, tokenizer, prompts, n_tokens):
    """serve --tp 2 (two ranks, CPU backend): greedy answers, alone and concurrent, equal one rank's;
    SIGTERM to the launcher drains rank 0 and ends both ranks with status 0."""
    extra = ["--parallel", "4", "--ctx", "128", "--threads", "1"]
    one = Server(lowbit, model, extra, tokenizer)
    try:
        alone = [greedy(one.client(), p, n_tokens)[0] for p in prompts]
    finally:
        one.kill()
    srv = Server(lowbit, model, extra + ["--tp", "2"], tokenizer)
    try:
        check(any("tensor-parallel over 2 ranks" in l for l in srv.log), "serve --tp 2 says so")
        check([greedy(srv.client(), p, n_tokens)[0] for p in prompts] == alone,
              "serve --tp 2: greedy answers equal one rank's")
        with ThreadPoolExecutor(len(prompts)) as ex:
            together = list(ex.map(lambda p: greedy(srv.client(), p, n_tokens)[0], prompts))
        check(together == alone, "serve --tp 2: concurrent greedy answers equal one rank's")
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=60)
        check(code == 0, f"serve --tp 2: SIGTERM ends both ranks, status 0 ({code})")
    finally:
        srv.kill()


def run_checks(lowbit, model, tokenizer, prompt, expected):
    """lowbit run: piped standard input prints the answer; in a terminal /reset, Ctrl-C and /exit."""
    r = subprocess.run([lowbit, "run", "-m", model, "--tokenizer", tokenizer, "-t", "0", "--max-tokens", "24"],
                       input=prompt + "\n", capture_output=True, text=True, timeout=120)
    check(r.returncode == 0 and r.stdout.strip() == expected.strip(),
          f"echo question | lowbit run prints the greedy answer ({r.stdout.strip()[:60]!r})")
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(lowbit, [lowbit, "run", "-m", model, "--tokenizer", tokenizer, "-t", "1", "--max-tokens", "400",
                          "--ctx", "512"])
    out = b""

    def read_until(marker, secs=60):
        nonlocal out
        end = time.time() + secs
        while time.time() < end:
            if marker in out:
                return True
            rl, _, _ = select.select([fd], [], [], 0.2)
            if rl:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return marker in out
        return marker in out

    try:
        ok = read_until(b"> ")
        os.write(fd, prompt.encode() + b"\n")
        out = b""
        ok = ok and read_until(b"> ")
        os.write(fd, b"/reset\n")
        ok = ok and read_until(b"forgotten")
        out = b""
        os.write(fd, b"Once upon a time there was a dog\n")
        time.sleep(0.05)
        os.write(fd, b"\x03")  # Ctrl-C: stops the answer (or, if it already ended, only prints a hint)
        ok = ok and read_until(b"> ")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        check(ok and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0,
              "lowbit run in a terminal: answers, /reset, Ctrl-C keeps the session, /exit exits 0")
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lowbit", required=True)
    ap.add_argument("--shared", default=os.environ.get("LOWBIT_SHARED", ""))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--models", default="stories,smollm2", help="which models to test (comma-separated)")
    a = ap.parse_args()
    shared = a.shared or os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
    stories = os.path.join(shared, "models", "stories260K")
    if not os.path.exists(os.path.join(stories, "stories260K.bin")):
        skip(f"{stories}/stories260K.bin not found (set LOWBIT_SHARED)")
    import shutil
    if not shutil.which("curl"):
        skip("curl not found")

    def on_alarm(*_):
        raise TimeoutError(f"test_serve.py: over {a.timeout} s")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(a.timeout)
    which = a.models.split(",")
    try:
        s_model, s_tok = os.path.join(stories, "stories260K.bin"), os.path.join(stories, "tok512.model")
        prompts = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird", "The sun was"]
        if "stories" in which:
            print("stories260K:")
            ctx, max_body = 128, 65536
            srv = Server(a.lowbit, s_model, ["--parallel", "16", "--ctx", str(ctx), "--max-body", str(max_body),
                                             "--threads", "1"], s_tok)
            try:
                common_checks(srv, prompts, 24, chat=False)
                bad_input_checks(srv, ctx, max_body)
                disconnect_check(srv, prompts[0])
            finally:
                srv.kill()
            auth_checks(a.lowbit, s_model, s_tok)
            srv = Server(a.lowbit, s_model, ["--threads", "1"], s_tok)
            try:
                expected = greedy(srv.client(), prompts[0], 24)[0]
            finally:
                srv.kill()
            run_checks(a.lowbit, s_model, s_tok, prompts[0], expected)
            sigterm_check(a.lowbit, s_model, s_tok, prompts[0])
            tp_checks(a.lowbit, s_model, s_tok, prompts, 24)

        smol = os.path.join(shared, "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
        if "smollm2" not in which:
            pass
        elif os.path.exists(smol):
            print("SmolLM2-135M-Instruct:")
            srv = Server(a.lowbit, smol, ["--parallel", "16", "--ctx", "256", "--threads", "2"])
            try:
                common_checks(srv, ["The capital of France is", "Water boils at", "My favourite food is",
                                    "In the morning I"], 8, chat=True)
            finally:
                srv.kill()
        else:
            print(f"SmolLM2 not found at {smol}: its part is skipped")
    finally:
        signal.alarm(0)
        for s in servers:
            s.kill()
    if failures:
        print(f"{len(failures)} check(s) failed:")
        for f in failures:
            print("  -", f)
        return 1
    print("all serve checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
