"""A minimal OTLP/HTTP trace receiver for tests/e2e/run.sh.

POST /v1/traces   an ExportTraceServiceRequest (application/x-protobuf, optionally gzip);
                  decoded with a hand-written protobuf walker (no dependencies) and kept in
                  memory.
GET  /spans       every span received so far as JSON: trace_id, span_id, parent_span_id,
                  name, service (resource service.name) and the string/int attributes.
GET  /health      200.

Only the fields the test looks at are decoded; everything else is skipped by wire type.
"""

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPANS = []
LOCK = threading.Lock()


def varint(buf, i):
    shift = 0
    value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def fields(buf):
    """Yields (field number, value) of one message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def any_value(buf):
    # AnyValue: string_value=1, bool_value=2, int_value=3, double_value=4
    for number, value in fields(buf):
        if number == 1:
            return value.decode("utf-8", "replace")
        if number in (2, 3):
            return value
    return None


def attributes(entries):
    out = {}
    for entry in entries:
        key, value = None, None
        for number, field in fields(entry):
            if number == 1:
                key = field.decode("utf-8", "replace")
            elif number == 2:
                value = any_value(field)
        if key is not None:
            out[key] = value
    return out


def decode(body):
    spans = []
    for number, resource_spans in fields(body):  # ExportTraceServiceRequest.resource_spans
        if number != 1:
            continue
        resource = {}
        scope_spans_list = []
        for n, field in fields(resource_spans):
            if n == 1:  # Resource
                resource = attributes(v for k, v in fields(field) if k == 1)
            elif n == 2:  # ScopeSpans
                scope_spans_list.append(field)
        for scope_spans in scope_spans_list:
            for n, span in fields(scope_spans):
                if n != 2:
                    continue
                record = {"service": resource.get("service.name"), "attributes": {}}
                attrs = []
                for k, v in fields(span):
                    if k == 1:
                        record["trace_id"] = v.hex()
                    elif k == 2:
                        record["span_id"] = v.hex()
                    elif k == 4:
                        record["parent_span_id"] = v.hex()
                    elif k == 5:
                        record["name"] = v.decode("utf-8", "replace")
                    elif k == 9:
                        attrs.append(v)
                record["attributes"] = attributes(attrs)
                record["region"] = resource.get("cloud.region")
                spans.append(record)
    return spans


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body=b"", content_type="application/json"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path != "/v1/traces":
            return self.reply(404)
        if self.headers.get("content-encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        try:
            spans = decode(body)
        except Exception as error:  # a malformed export is the exporter's bug: say so
            print(f"otlp-receiver: cannot decode export: {error}", file=sys.stderr)
            return self.reply(400, b"{}")
        with LOCK:
            SPANS.extend(spans)
        # An empty ExportTraceServiceResponse.
        self.reply(200, b"", "application/x-protobuf")

    def do_GET(self):
        if self.path == "/health":
            return self.reply(200, b'{"status":"ok"}')
        if self.path == "/spans":
            with LOCK:
                body = json.dumps(SPANS).encode()
            return self.reply(200, body)
        self.reply(404)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    print(f"otlp-receiver: listening on 0.0.0.0:{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
