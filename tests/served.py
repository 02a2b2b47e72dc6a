"""Helpers for the server's tests: a `minislm serve` in a thread of the test process,
the official `openai` client pointed at it, and raw HTTP for what no client sends."""

import http.client
import json
import re
import socket
import threading
import time
from contextlib import contextmanager

import openai  # the test extra installs it; the server itself does not need it

from minislm.serve import Server, ServeSettings

CHAT = [{"role": "user", "content": "Speak, Juliet."}]


@contextmanager
def running(model, **settings):
    """A server in a thread of this process; its log lines collect in `server.lines`."""
    lines = []
    server = Server(model, ServeSettings(port=0, model_id="shakespeare", **settings), log=lines.append)
    server.lines = lines
    with threaded(server):
        yield server


@contextmanager
def threaded(server):
    """Any socketserver serving in a thread of this process until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def client(server, api_key="unused"):
    return openai.OpenAI(base_url=server.url, api_key=api_key, max_retries=0, timeout=120)


def raw(server, method, path, body=None, headers=None):
    """(status, headers, parsed JSON body) of one request over a fresh connection."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, response.headers, json.loads(payload)


def connect(server, timeout=30) -> socket.socket:
    host, port = server.server_address[:2]
    return socket.create_connection((host, port), timeout=timeout)


def post_bytes(path: str, body: dict, *headers: str) -> bytes:
    """A whole POST request as bytes, for sockets driven by hand."""
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {len(data)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while data := s.recv(65536):
        received += data
    return received


def final_response(received: bytes) -> tuple[int, bytes]:
    """(status, body) of the last response in `received`, past any interim 1xx ones."""
    while True:
        head, _, rest = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status >= 200:
            return status, rest
        received = rest


def wait_for_log(server, pattern, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [line for line in server.lines if re.search(pattern, line)]
        if hits:
            return hits
        time.sleep(0.01)
    raise AssertionError(f"no log line matches {pattern!r}: {server.lines[-5:]}")
