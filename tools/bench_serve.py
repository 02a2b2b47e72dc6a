"""Decode speed of `minislm serve` next to `minislm generate`, same prompt, interleaved.

    python tools/bench_serve.py --rounds 5 --max-tokens 200

Starts `python -m minislm serve` on a free port, then alternates: one
`python -m minislm generate` run, one request to the server, both greedy with the
same plain-text prompt and the same number of tokens. Reported per round:

* generate's decode tok/s (its stats line),
* the server's decode tok/s (its log line: the same measure, from the same code),
* the client's end-to-end tok/s for the request (tokens / wall time, prefill and HTTP
  included).

Interleaving puts both under the same load, which matters on a shared machine.
"""

import argparse
import json
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def start_server(args) -> tuple[subprocess.Popen, str, queue.Queue]:
    command = [sys.executable, "-m", "minislm", "serve", "--port", "0"] + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = re.search(r"at (http://\S+/v1)", server.stderr.readline()).group(1)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stderr], daemon=True).start()
    return server, url, lines


def generate_tok_s(args) -> float:
    command = [sys.executable, "-m", "minislm", "generate", "--no-chat-template", "--temp", "0",
               "-n", str(args.max_tokens), args.prompt] + (["--model", args.model] if args.model else [])
    stats = subprocess.run(command, capture_output=True, text=True, check=True).stderr.strip().splitlines()[-1]
    return float(re.search(r"generated \d+ tokens, ([\d.]+) tok/s", stats).group(1))


def server_tok_s(args, url: str, lines: queue.Queue) -> tuple[float, float, int]:
    body = json.dumps({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        tokens = json.loads(response.read())["usage"]["completion_tokens"]
    wall = time.perf_counter() - start
    line = lines.get(timeout=60)
    decode = float(re.search(r"generated \d+ tokens, ([\d.]+) tok/s", line).group(1))
    return decode, tokens / wall, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the shipped model")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server, url, lines = start_server(args)
    try:
        server_tok_s(args, url, lines)  # warm-up: first request, first touch of the cache
        rows = []
        for n in range(args.rounds):
            generate = generate_tok_s(args)
            decode, end_to_end, tokens = server_tok_s(args, url, lines)
            rows.append((generate, decode, end_to_end))
            print(f"round {n + 1}: generate {generate:7.1f} tok/s | serve {decode:7.1f} tok/s decode, "
                  f"{end_to_end:7.1f} tok/s end to end ({tokens} tokens)", flush=True)
        medians = [statistics.median(column) for column in zip(*rows)]
        print(f"median:  generate {medians[0]:7.1f} tok/s | serve {medians[1]:7.1f} tok/s decode, "
              f"{medians[2]:7.1f} tok/s end to end")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
