"""A TCP probe for capture tests: on every connection, reply '<listening port> <original destination>'.

Run as a script: `python probe.py PORT [PORT ...]`. It prints 'ready' once listening and
stops by itself after --lifetime seconds (default 120).
"""

import argparse
import selectors
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80


def original_destination(conn: socket.socket) -> str:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return f"{socket.inet_ntoa(packed)}:{port}"
    except OSError:  # not NATed: the destination is where we are
        host, port = conn.getsockname()[:2]
        return f"{host}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ports", type=int, nargs="+")
    parser.add_argument("--lifetime", type=float, default=120)
    args = parser.parse_args()
    sel = selectors.DefaultSelector()
    for port in args.ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(64)
        sel.register(s, selectors.EVENT_READ, port)
    print("ready", flush=True)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            with conn:
                conn.sendall(f"{key.data} {original_destination(conn)}\n".encode())
    sys.exit(0)


if __name__ == "__main__":
    main()
