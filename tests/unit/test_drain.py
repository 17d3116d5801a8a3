"""What the drain counts as a request in flight, on real loopback connections."""

from __future__ import annotations

import os
import socket
import time

from serve_app.drain import requests_in_flight


def test_a_request_in_flight_counts_and_an_answered_or_idle_connection_does_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        idle = socket.create_connection(("127.0.0.1", port))
        busy = socket.create_connection(("127.0.0.1", port))
        served_idle, _ = server.accept()
        served_busy, _ = server.accept()
        try:
            pids = [os.getpid()]
            assert requests_in_flight(port, pids) == 0  # connected, nothing sent yet
            for client, served in ((idle, served_idle), (busy, served_busy)):
                client.sendall(b"GET / HTTP/1.1\r\n\r\n")
                time.sleep(0.02)
                served.recv(100)
                served.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # both answered
            time.sleep(0.02)
            assert requests_in_flight(port, pids) == 0
            busy.sendall(b"POST / HTTP/1.1\r\n\r\n")  # a second request, not read yet
            time.sleep(0.02)
            assert requests_in_flight(port, pids) == 1
            served_busy.recv(100)  # read, not answered yet: still in flight
            time.sleep(0.02)
            assert requests_in_flight(port, pids) == 1
            served_busy.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
            time.sleep(0.02)
            assert requests_in_flight(port, pids) == 0
        finally:
            for s in (idle, busy, served_idle, served_busy):
                s.close()
