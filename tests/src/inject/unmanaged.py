"""Binds one managed address and others that are not, each without
SO_REUSEPORT unless named: TCP argv[1] (managed), TCP argv[1]'s port + 1
with SO_REUSEADDR, TCP argv[1]'s port + 2 with SO_REUSEPORT set by itself,
UDP on argv[1], TCP [::1] on argv[1]'s port (IPv6 only). Listens on the
TCP ones, answers gen=N pid=P on the managed one, and prints its sockets'
fds."""

import os
import socket
import sys

GENERATION = os.environ.get("RELOADER_GENERATION", "0")
host, port = sys.argv[1].rsplit(":", 1)
port = int(port)


def tcp(family, addr, reuseaddr=False, reuseport=False):
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    s.listen(64)
    return s


managed = tcp(socket.AF_INET, (host, port))
others = [
    tcp(socket.AF_INET, (host, port + 1), reuseaddr=True),
    tcp(socket.AF_INET, (host, port + 2), reuseport=True),
    tcp(socket.AF_INET6, ("::1", port)),
]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
print("bound", flush=True)
while True:
    conn, _ = managed.accept()
    with conn:
        conn.recv(4096)
        body = f"gen={GENERATION} pid={os.getpid()}\n".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
