"""The demo's workloads, stdlib only so they run in the proxy image: `meshctl app`.

HTTP: every request gets JSON naming the pod, the port, the caller's address and the
request headers (so a caller can see the `x-forwarded-client-cert` its sidecar got).
TCP: every connection first gets one line `<pod> <port> <caller address>`, then an echo.
"""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(name: str, http_ports: list[int], tcp_ports: list[int]) -> None:
    """Serve until the process is stopped."""
    servers: list[socketserver.BaseServer] = []
    for port in http_ports:
        servers.append(ThreadingHTTPServer(("0.0.0.0", port), _http_handler(name, port)))
    for port in tcp_ports:
        servers.append(_TcpServer(("0.0.0.0", port), _tcp_handler(name, port)))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print(f"app {name}: http {http_ports} tcp {tcp_ports}", flush=True)
    for t in threads:
        t.join()


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def _http_handler(name: str, port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = json.dumps(
                {
                    "pod": name,
                    "port": port,
                    "path": self.path,
                    "peer": self.client_address[0],
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def _tcp_handler(name: str, port: int) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(f"{name} {port} {self.client_address[0]}\n".encode())
            for line in self.rfile:
                self.wfile.write(line)

    return Handler
