"""A stand-in teacher: a small OpenAI-compatible chat server on loopback that replies like a chatty LLM
(fenced JSON with chatter, a pair whose number its page lacks, duplicates, a malformed reply, a 429 before
success), and a PDF writer for text pages."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal PDF (Helvetica text, one page per string, ASCII) that pypdf extracts text from."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        lines = "".join(f"({line.replace('(', '[').replace(')', ']')}) Tj T* " for line in text.split("\n"))
        stream = f"BT /F1 11 Tf 14 TL 50 750 Td {lines}ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       f"/Resources << /Font << /F1 {content + 2} 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
        objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


class Teacher:
    """Replies chosen per request by `reply(user_text, n)` (n = how many times this exact text was asked);
    an int reply is an HTTP error status. Counts requests; checks the API key when `key` is set."""

    def __init__(self, reply, key: str | None = None, owned_by: str = "test", models_busy: int = 0) -> None:
        self.reply, self.key, self.owned_by, self.models_busy = reply, key, owned_by, models_busy
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()


def _handler(teacher: Teacher):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if teacher.key and self.headers.get("Authorization") != f"Bearer {teacher.key}":
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return False
            return True

        def do_GET(self):
            if not self._authorised():
                return
            if teacher.models_busy > 0:  # a server still loading its model
                teacher.models_busy -= 1
                self._send(503, {"error": {"message": "the model is still loading"}}, {"Retry-After": "0"})
                return
            self._send(200, {"object": "list", "data": [{"id": "stand-in", "object": "model",
                                                         "owned_by": teacher.owned_by}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self._authorised():
                return
            user = body["messages"][-1]["content"]
            with teacher.lock:
                teacher.requests.append(body)
                n = teacher.seen[user] = teacher.seen.get(user, 0) + 1
            reply = teacher.reply(user, n)
            if isinstance(reply, int):
                self._send(reply, {"error": {"message": f"status {reply}", "type": "server_error"}},
                           {"Retry-After": "0"})
                return
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": reply}}],
                             "usage": {"prompt_tokens": len(user), "completion_tokens": len(reply),
                                       "total_tokens": len(user) + len(reply)}})

    return Handler


@contextlib.contextmanager
def stand_in(teacher: Teacher):
    """Serve `teacher` on a free loopback port; yields the API root URL (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(teacher))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
