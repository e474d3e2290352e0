"""Test child with small behaviours selected by argv[1].

listen              print a few lines, then "listening http://127.0.0.1:0", sleep
chatty N            print "line 1" .. "line N", then sleep (never "ready")
exit CODE           print "fatal: bad config" and exit with CODE
ignore-term         ignore SIGTERM, print "ready", sleep
http PORT           serve HTTP on 127.0.0.1:PORT (200 on /healthz)
partial             print a line without a trailing newline and exit 0
env NAME            print "NAME=<value>" and sleep
"""

from __future__ import annotations

import http.server
import os
import signal
import sys
import time


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def main() -> None:
    mode = sys.argv[1]
    if mode == "listen":
        print("booting")
        print("error: this goes to stderr", file=sys.stderr)
        print("listening http://127.0.0.1:0")
        sleep_forever()
    elif mode == "chatty":
        for i in range(1, int(sys.argv[2]) + 1):
            print(f"line {i}")
        sleep_forever()
    elif mode == "exit":
        print("fatal: bad config")
        sys.exit(int(sys.argv[2]))
    elif mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready")
        sleep_forever()
    elif mode == "http":
        port = int(sys.argv[2])

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/healthz" else 404)
                self.end_headers()
                self.wfile.write(b"ok\n")

            def log_message(self, format: str, *args: object) -> None:
                print("http:", format % args)

        server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        print(f"http on {port}")
        server.serve_forever()
    elif mode == "partial":
        sys.stdout.write("no newline at the end")
        sys.stdout.flush()
    elif mode == "env":
        print(f"{sys.argv[2]}={os.environ.get(sys.argv[2])}")
        sleep_forever()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
