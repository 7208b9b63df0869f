"""The bench's load generator (benchmarks.load_generator): its raw and multipart requests are what a server reads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from benchmarks.load_generator import connect, post_probe

PROBE = b"\xff\xd8\xff\xe0 not really a jpeg, but bytes a server must get back unchanged \r\n--x\r\n"


class Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.seen.append((self.path, self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(201 if len(self.seen) % 2 else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_raw_and_multipart_requests_carry_the_image_on_one_kept_connection(server: ThreadingHTTPServer) -> None:
    connection = connect(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        statuses = [post_probe(connection, "/v1/tasks/t/classify", PROBE, body) for body in ("raw", "multipart")]
        sock = connection.sock
        assert post_probe(connection, "/again", PROBE, "raw") == 201
        assert connection.sock is sock  # the same connection, kept alive
    finally:
        connection.close()
    assert statuses == [201, 200]  # each answer's own status
    (path, raw_type, raw), (_, form_type, form), _ = Recorder.seen
    assert path == "/v1/tasks/t/classify"
    assert raw_type == "image/jpeg"
    assert raw == PROBE
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {form_type}\r\n\r\n".encode() + form)
    (part,) = list(message.iter_parts())
    assert part.get_param("name", header="content-disposition") == "images"
    assert part.get_filename() == "probe.jpg"
    assert part.get_content_type() == "image/jpeg"
    assert part.get_payload(decode=True) == PROBE
