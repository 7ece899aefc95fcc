"""An HTTP/1.1 keep-alive server whose only graceful stop is an API call
(like Envoy's admin /drain_listeners or a Java service's drain endpoint):
`POST /drain` on its admin port (argv[2]) stops accepting, answers each
connection's next request with `Connection: close`, and exits once they
have ended. SIGTERM ends it at once (the default action), cutting its
keep-alive connections. Binds without SO_REUSEPORT. Answers gen=N pid=P."""

import http.server
import os
import sys
import threading

GENERATION = os.environ.get("RELOADER_GENERATION", "0")
draining = threading.Event()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection ends after this long without a request.
    timeout = 5

    def do_GET(self):
        body = f"gen={GENERATION} pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Admin(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/drain":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if not draining.is_set():
            draining.set()
            threading.Thread(target=drain).start()

    def log_message(self, *args):
        pass


def drain():
    server.shutdown()  # stops accepting: the serve_forever loop ends
    server.server_close()  # closes the listener; joins the connections' threads
    os._exit(0)


host, port = sys.argv[1].rsplit(":", 1)
server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
server.daemon_threads = False
admin = http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), Admin)
threading.Thread(target=admin.serve_forever, daemon=True).start()
server.serve_forever()
