"""A DNS-like UDP server in a few lines: binds without SO_REUSEPORT, answers
a DNS query with an empty NOERROR response (its header, QR set) and
anything else with gen=N pid=P. SIGTERM ends it at once."""

import os
import socket
import sys

GENERATION = os.environ.get("RELOADER_GENERATION", "0")
host, port = sys.argv[1].rsplit(":", 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((host, int(port)))
while True:
    data, peer = sock.recvfrom(4096)
    if len(data) >= 12 and not data.startswith(b"ping"):
        # Header: same id, QR and RD, RA, NOERROR; the question echoed.
        reply = data[:2] + b"\x81\x80" + data[4:6] + b"\x00\x00\x00\x00\x00\x00" + data[12:]
    else:
        reply = f"gen={GENERATION} pid={os.getpid()}\n".encode()
    sock.sendto(reply, peer)
