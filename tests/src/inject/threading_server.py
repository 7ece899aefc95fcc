"""http.server.ThreadingHTTPServer as the standard library makes it: no
SO_REUSEPORT, no graceful stop (SIGTERM ends it at once; reloader's settle
gives it time to answer what it accepted). Answers gen=N pid=P."""

import http.server
import os
import sys

GENERATION = os.environ.get("RELOADER_GENERATION", "0")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"gen={GENERATION} pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


host, port = sys.argv[1].rsplit(":", 1)
http.server.ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
