"""The HTTP server's connections (serving.web.connections): idle and slow clients are cut off after their
time limits, a flood of connections never locks anyone out, and Expect: 100-continue over the body
limit is answered 413 at once. Each on a live server with short limits; bounds are generous."""

import json
import socket
import time

import pytest
import requests

from serving.web import connections

CHAT = "/v1/chat/completions"
SMALL = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def connect(server) -> socket.socket:
    host, port = server.base_url.rsplit("//", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_by_server(sock, within: float) -> bool:
    """True when the server closes `sock` (recv gives b"" or a reset) within `within` seconds."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def quick(server):
    """/health and a small chat, each answered (within a generous bound)."""
    started = time.monotonic()
    assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
    assert requests.post(server.base_url + CHAT, json=SMALL, timeout=30).status_code == 200
    return time.monotonic() - started


def test_with_200_idle_connections_open_health_and_chat_answer(serve_app):
    server = serve_app(max_connections=100, idle_timeout=2.0)
    idle = [connect(server) for _ in range(200)]  # twice MAX_CONNECTIONS
    try:
        assert quick(server) < 5
        # the ones idle longest were closed to make room; the rest go after IDLE_TIMEOUT
        assert all(closed_by_server(s, 6) for s in idle)
        assert server.server.evicted >= 100 and server.server.closed_idle >= 1
    finally:
        for s in idle:
            s.close()


def test_slowloris_connections_are_cut_off_at_the_header_timeout(serve_app):
    server = serve_app(header_timeout=1.0)
    slow = [connect(server) for _ in range(30)]
    started = time.monotonic()
    for s in slow:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    for _ in range(4):  # a byte a quarter second: never idle, never done
        for s in slow:
            try:
                s.send(b"X")
            except OSError:
                pass
        time.sleep(0.25)
    assert quick(server) < 5
    assert all(closed_by_server(s, 4) for s in slow)
    assert time.monotonic() - started < 6 and server.server.closed_slow >= 30
    for s in slow:
        s.close()


def test_a_body_that_never_arrives_is_cut_off_at_the_body_timeout(serve_app):
    server = serve_app(body_timeout=1.0, idle_timeout=30.0)
    with connect(server) as s:
        started = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\"")
        try:
            for _ in range(16):
                s.send(b" ")  # a byte at a time: active, so only the body time limit can end it
                time.sleep(0.25)
        except OSError:  # cut off
            pass
        assert closed_by_server(s, 3)
        assert 0.9 < time.monotonic() - started < 4


def test_expect_continue_over_the_body_limit_is_413_at_once(serve_app):
    server = serve_app(max_request_bytes=1000)
    with connect(server) as s:
        started = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 50000\r\n\r\n")
        s.settimeout(5)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 3
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_expect_continue_within_the_limit_still_works(serve_app):
    server = serve_app()
    r = requests.post(server.base_url + CHAT, json=SMALL, headers={"Expect": "100-continue"}, timeout=30)
    assert r.status_code == 200


def test_a_running_answer_outlives_the_idle_timeout(serve_app):
    """The idle limit counts only connections with no request running: a stream slower than it finishes."""
    server = serve_app(idle_timeout=1.0, max_tokens_limit=400)
    body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "stream": True,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 2}
    started = time.monotonic()
    with requests.post(server.base_url + CHAT, json=body, stream=True, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:])
                time.sleep(0.01)  # a slow reader
    assert events[-1] == b"[DONE]" and time.monotonic() - started > 1.0


def test_the_file_limit_is_raised_for_the_connections():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(soft + 10, hard) if hard != resource.RLIM_INFINITY else soft + 10
    assert connections.raise_file_limit(wanted) >= min(wanted, hard if hard != resource.RLIM_INFINITY else wanted)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= min(wanted, soft if soft > wanted else wanted)


@pytest.mark.parametrize("port", [80000, -1])
def test_a_port_out_of_range_is_refused(port):
    from serving.config import SettingsError, load_settings

    with pytest.raises(SettingsError) as info:
        load_settings(["--port", str(port)], environ={})
    assert info.value.code == 2 and "not a TCP port" in str(info.value)


LONG = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000, "temperature": 1.0,
        "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 2}  # the demo model's long answer (~30 s)


def test_a_plain_answer_is_cancelled_when_its_client_hangs_up(serve_app, caplog):
    """A client that hangs up while its (long, not streamed) answer is generated: the answer is cancelled, logged
    499, and its MAX_QUEUE place is free at once. It used to run to its end (tens of seconds) holding the place,
    answered 429 to everyone meanwhile, and was logged 200. (A stream notices when its next write fails.)"""
    server = serve_app(max_queue=1, max_tokens_limit=4000)
    sock = connect(server)
    payload = json.dumps(LONG).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    time.sleep(1.0)  # tokens are being made
    caplog.set_level("INFO", logger="serving.web.app")
    sock.close()
    hung_up = time.monotonic()
    while True:  # the one place must come free: a small chat gets in
        r = requests.post(server.base_url + CHAT, json=SMALL, timeout=30)
        if r.status_code != 429 or time.monotonic() - hung_up > 10:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert time.monotonic() - hung_up < 3
    assert server.app.extensions["qwenvl"].disconnects.cancelled == 1
    assert any("status=499" in rec.getMessage() and "/v1/chat/completions" in rec.getMessage()
               for rec in caplog.records), [rec.getMessage() for rec in caplog.records]


def test_a_request_pipelined_behind_a_stream_is_answered(serve_app):
    """waitress closed the connection after every streamed (chunked) answer, dropping the requests a client had
    pipelined behind it; the stream's end is marked by its last chunk, so the connection now carries on."""
    server = serve_app()

    def request(body):
        payload = json.dumps(body).encode()
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)

    sock = connect(server)
    sock.sendall(request(dict(SMALL, stream=True)) + request(SMALL))
    sock.settimeout(0.5)
    data, deadline = b"", time.monotonic() + 30
    while data.count(b"HTTP/1.1 200") < 2 or not data.rstrip().endswith(b"}"):
        if time.monotonic() > deadline:
            break
        try:
            block = sock.recv(65536)
        except socket.timeout:
            continue
        if not block:
            break
        data += block
    sock.close()
    assert data.count(b"HTTP/1.1 200") == 2 and b"[DONE]" in data, data[-500:]
    assert b"Connection: close" not in data
    assert b'"chat.completion"' in data.split(b"0\r\n\r\n", 1)[1]  # after the stream's last chunk: the plain answer
