"""A local HTTP server on a free loopback port, served from daemon threads until stop(): the fake upstreams and
image or video hosts that the tests and bench/attacks.py stand up share this one start and stop."""

from __future__ import annotations

import http.server
import threading


class LoopbackServer:
    """Subclasses build their request handler class, then call `super().__init__(handler)`."""

    def __init__(self, handler: type):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True  # a hung client must not keep the test or bench process alive
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class FileHost(LoopbackServer):
    """Serves `files` ({name: (bytes, content type)}) at /<name>; anything else is a 404."""

    def __init__(self, files: dict):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                data, mime = files.get(self.path.lstrip("/"), (None, None))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)
