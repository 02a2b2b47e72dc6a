"""`minislm serve` under load: decode speed, stalls, and the cache's follow-up turns.

    python tools/bench_serve.py                       # all three parts, the shipped model
    python tools/bench_serve.py --parts stall,followup --rounds 5

Starts `python -m minislm serve` on a free port (a fresh process, so the server runs
as users run it) and measures three things, each as medians over interleaved rounds:

* decode: alternates one `python -m minislm generate` run with one request to the
  server, both greedy with the same plain-text prompt and number of tokens, and
  reports generate's decode tok/s, the server's (its log line: the same measure from
  the same code) and the client's end to end (tokens over wall time, prefill and
  HTTP included). Interleaving puts both under the same load.
* stall: how long `GET /v1/models` and a small chat request take alone, and while
  two 7.9 MB prompts (just under the 8 MiB body limit) are in flight. Such prompts
  cannot fit any context; the server should refuse them from their length, without
  holding up anyone else. Goals: under 0.2 s for the models list, under 0.5 s of
  extra delay for the chat request.
* followup: time to first token of a chat follow-up (a ~400-token conversation, its
  reply and a short new user turn: the server's KV cache holds all but the new
  turn) against the same messages sent fresh (one character changed at the start,
  so nothing is reused). Reuse should always pay.
"""

import argparse
import http.client
import json
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

BIG_PROMPT_BYTES = 7_900_000
LINE = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "


class Server:
    """A `minislm serve` process, its address and its log lines."""

    def __init__(self, model: str | None = None, threads: int | None = None, flags=()):
        command = [sys.executable, "-m", "minislm", "serve", "--port", "0", *flags]
        command += (["--model", model] if model else []) + (["--threads", str(threads)] if threads else [])
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        banner = self.process.stderr.readline()
        match = re.search(r"at (http://\S+/v1)", banner)
        if match is None:
            self.process.kill()
            raise SystemExit(f"the server did not start: {banner.strip()}")
        self.url = match.group(1)
        address = urlparse(self.url)
        self.host, self.port = address.hostname, address.port
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stderr], daemon=True).start()

    def request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 600):
        """(status, headers, payload bytes, seconds) over a fresh connection."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        start = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        connection.request(method, "/v1" + path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, response.headers, payload, time.perf_counter() - start

    def first_token(self, messages: list, max_tokens: int = 8) -> tuple[float, str, int]:
        """Streamed chat: (seconds to the first text, the whole text, reused prompt tokens)."""
        body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
        start = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        reused = int(response.headers["X-Minislm-Reused-Tokens"])
        first, text = None, []
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first if first is not None else time.perf_counter() - start
                text.append(delta)
        connection.close()
        return first if first is not None else time.perf_counter() - start, "".join(text), reused

    def log_line(self) -> str:
        return self.lines.get(timeout=60)

    def drain(self) -> None:
        """Forget the log lines so far (each is written just after its answer)."""
        time.sleep(0.5)
        while not self.lines.empty():
            self.lines.get()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


# ---------------------------------------------------------------- decode


def generate_tok_s(args) -> float:
    command = [sys.executable, "-m", "minislm", "generate", "--no-chat-template", "--temp", "0",
               "-n", str(args.max_tokens), args.prompt] + (["--model", args.model] if args.model else [])
    command += ["--threads", str(args.threads)] if args.threads else []
    stats = subprocess.run(command, capture_output=True, text=True, check=True).stderr.strip().splitlines()[-1]
    return float(re.search(r"generated \d+ tokens, ([\d.]+) tok/s", stats).group(1))


def server_tok_s(args, server: Server) -> tuple[float, float, int]:
    _, _, payload, wall = server.request("POST", "/completions",
                                         {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0})
    tokens = json.loads(payload)["usage"]["completion_tokens"]
    line = server.log_line()
    decode = float(re.search(r"generated \d+ tokens, ([\d.]+) tok/s", line).group(1))
    return decode, tokens / wall, tokens


def bench_decode(args, server: Server) -> None:
    server.drain()
    server_tok_s(args, server)  # warm-up: first request, first touch of the cache
    rows = []
    for n in range(args.rounds):
        generate = generate_tok_s(args)
        decode, end_to_end, tokens = server_tok_s(args, server)
        rows.append((generate, decode, end_to_end))
        print(f"decode round {n + 1}: generate {generate:7.1f} tok/s | serve {decode:7.1f} tok/s decode, "
              f"{end_to_end:7.1f} tok/s end to end ({tokens} tokens)", flush=True)
    medians = [statistics.median(column) for column in zip(*rows)]
    print(f"decode median:  generate {medians[0]:7.1f} tok/s | serve {medians[1]:7.1f} tok/s decode, "
          f"{medians[2]:7.1f} tok/s end to end", flush=True)


# ---------------------------------------------------------------- stall


def models_request(server: Server) -> float:
    return server.request("GET", "/models")[3]


def chat_request(server: Server) -> float:
    """Seconds for a one-token chat request (inf if it failed)."""
    status, _, _, seconds = server.request("POST", "/chat/completions",
                                           {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    return seconds if status == 200 else float("inf")


def bench_stall(args, server: Server) -> None:
    """While two big requests are in flight, one thread sends GET /v1/models after
    GET /v1/models and another small chat request after small chat request; the
    slowest of each is what a user queued behind the big ones would see. The big ones:
    7.9 MB completion prompts, then chat messages of 3.6M characters (whose template
    renders in a child process before the length check)."""
    bigs = {
        "7.9 MB prompts": ("/completions", {"prompt": "x" * BIG_PROMPT_BYTES, "max_tokens": 1}),
        "3.6M-character chat messages": ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 3_600_000}],
                                                                "max_tokens": 1}),
    }
    chat_request(server)
    for what, (path, body) in bigs.items():
        big = json.dumps(body).encode()
        alone, worst = [], []
        for n in range(args.rounds):
            alone.append((models_request(server), chat_request(server)))
            started, big_seconds, big_status = threading.Barrier(3), [], set()
            during = {models_request: [], chat_request: []}

            def send_big():
                started.wait()
                status, _, _, seconds = server.request("POST", path, big)
                big_seconds.append(seconds)
                big_status.add(status)

            def keep_asking(ask):
                while len(big_seconds) < 2:
                    during[ask].append(ask(server))

            senders = [threading.Thread(target=send_big) for _ in range(2)]
            for t in senders:
                t.start()
            started.wait()
            askers = [threading.Thread(target=keep_asking, args=(ask,)) for ask in during]
            for t in askers:
                t.start()
            for t in senders + askers:
                t.join()
            worst.append((max(during[models_request]), max(during[chat_request])))
            print(f"stall round {n + 1}: alone models {alone[-1][0]:.3f} s, chat {alone[-1][1]:.3f} s | while two "
                  f"{what} were in flight ({big_seconds[0]:.2f} and {big_seconds[1]:.2f} s, HTTP {sorted(big_status)}): "
                  f"slowest of {len(during[models_request])} models {worst[-1][0]:.3f} s, of "
                  f"{len(during[chat_request])} chat {worst[-1][1]:.3f} s", flush=True)
        a = [statistics.median(c) for c in zip(*alone)]
        b = [statistics.median(c) for c in zip(*worst)]
        print(f"stall median, two {what}: slowest GET /v1/models {b[0]:.3f} s (goal < 0.2 s; alone {a[0]:.3f} s) | "
              f"slowest chat {b[1]:.3f} s, {b[1] - a[1]:+.3f} s extra (goal < 0.5 s; alone {a[1]:.3f} s)", flush=True)


# ---------------------------------------------------------------- follow-up turns


def conversation(marker: str, lines: int) -> list[dict]:
    return [{"role": "user", "content": marker + " " + LINE * lines}]


def bench_followup(args, server: Server) -> None:
    server.drain()
    fresh_times, follow_times = [], []
    for n in range(args.rounds + 1):  # the first round warms up
        first = conversation(f"Round {n}.", args.lines)
        _, reply, _ = server.first_token(first)
        follow_up = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then, good sir?"}]
        follow, _, reused = server.first_token(follow_up)
        fresh_messages = [{"role": "user", "content": "r" + follow_up[0]["content"][1:]}] + follow_up[1:]
        fresh, _, fresh_reused = server.first_token(fresh_messages)
        for _ in range(3):
            line = server.log_line()
        prompt = int(re.search(r"prompt (\d+) tokens", line).group(1))
        if n == 0:
            continue
        fresh_times.append(fresh)
        follow_times.append(follow)
        print(f"followup round {n}: follow-up {follow * 1000:7.1f} ms to first token ({reused} of {prompt} tokens "
              f"reused) | fresh {fresh * 1000:7.1f} ms ({fresh_reused} reused) | fresh / follow-up "
              f"{fresh / follow:.2f}x", flush=True)
    f, s = statistics.median(follow_times), statistics.median(fresh_times)
    print(f"followup median: follow-up {f * 1000:.1f} ms, fresh {s * 1000:.1f} ms to first token: reuse is "
          f"{s / f:.2f}x faster", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the shipped model")
    parser.add_argument("--threads", type=int, help="passed to serve and generate (default: theirs)")
    parser.add_argument("--parts", default="decode,stall,followup", help="which measurements, comma-separated")
    parser.add_argument("--prompt", default="ROMEO:", help="decode: the plain-text prompt")
    parser.add_argument("--max-tokens", type=int, default=200, help="decode: tokens per run")
    parser.add_argument("--lines", type=int, default=13, help="followup: lines in the first turn (13: ~400 tokens)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = Server(args.model, args.threads)
    try:
        for part in args.parts.split(","):
            {"decode": bench_decode, "stall": bench_stall, "followup": bench_followup}[part](args, server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
