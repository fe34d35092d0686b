"""``rank1-local serve`` against hostile or broken clients, with raw sockets to 127.0.0.1 (a handful at a time):
stalled headers and bodies are cut off after ``--read-timeout``, connections over ``--max-connections`` are refused
at once, and a shutdown does not wait for a stalled upload."""

from __future__ import annotations

import signal
import socket
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from benchmarks.server_process import ServerProcess  # noqa: E402

READ_TIMEOUT = 2.0
MAX_CONNECTIONS = 4
ARGS = ["--n-ctx", "512", "--max-think-tokens", "64", "--parallel", "2", "--threads", "2",
        "--read-timeout", str(READ_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)]
HEADERS = "POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
STALLS = {
    "idle": b"",
    "partial headers": HEADERS.encode(),
    "headers and one chunk": (HEADERS + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"que\r\n").encode(),
    "10 of 100 bytes": (HEADERS + "Content-Length: 100\r\n\r\n{\"query\":").encode(),
}


@pytest.fixture(scope="module")
def model_file(exported):
    return exported("behaving", "Q8_0")


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    with ServerProcess(model_file, ARGS, tmp_path_factory.mktemp("hostile") / "server.log") as s:
        yield s


def connect(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    if data:
        sock.sendall(data)
    return sock


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, received = time.monotonic(), b""
    while chunk := sock.recv(4096):
        received += chunk
    sock.close()
    return received, time.monotonic() - start


def test_stalled_clients_are_cut_off_after_the_read_timeout(server):
    sockets = {name: connect(server, data) for name, data in STALLS.items()}  # all four at once
    outcomes = {name: until_closed(sock) for name, sock in sockets.items()}
    for name, (received, seconds) in outcomes.items():
        assert seconds < READ_TIMEOUT + 8, f"{name}: held for {seconds:.1f} s"
    for name in ("headers and one chunk", "10 of 100 bytes"):  # the body's deadline answers
        assert outcomes[name][0].startswith(b"HTTP/1.1 408") and b"--read-timeout" in outcomes[name][0], name
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # and it goes on serving


def test_connections_over_the_limit_are_refused_at_once(server):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        extra = connect(server)
        received, seconds = until_closed(extra)
        assert received.startswith(b"HTTP/1.1 503") and b"too many open connections" in received
        assert seconds < 2
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_sigterm_with_a_stalled_upload_and_nothing_in_flight_exits_at_once(model_file, tmp_path):
    args = ARGS + ["--read-timeout", "120", "--shutdown-timeout", "60"]  # neither may be what ends it
    with ServerProcess(model_file, args, tmp_path / "server.log") as server:
        upload = connect(server, STALLS["10 of 100 bytes"])
        time.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
        seconds = time.monotonic() - start
        received, _ = until_closed(upload)
        log = server.log()
    assert seconds < 5, f"took {seconds:.1f} s\n{log}"
    assert code in (0, -signal.SIGTERM)
    assert received.startswith(b"HTTP/1.1 503") and b"shut down" in received
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "shut down: no request was in flight" in log
