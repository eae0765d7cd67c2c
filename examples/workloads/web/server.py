"""A small HTTP service: / greets, /healthz reports health. Listens on $PORT."""
import http.server
import os
import signal
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok\n"
        else:
            body = f"{os.environ.get('GREETING', 'hello')} ({os.environ['BULKHEAD_INSTANCE']})\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("web: " + fmt % args + "\n")


def main():
    port = int(os.environ["PORT"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"web: listening on 127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        print("web: stopping", flush=True)


main()
