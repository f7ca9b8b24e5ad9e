#!/usr/bin/env python3
"""How many JetStream publishes a nats-server stores per second by itself.

Usage: python3 benches/nats_ingest.py MESSAGES WINDOW PORT
against a throwaway `nats-server -js -p PORT -sd DIR`. Creates stream T
(subjects t.>, 2 min duplicate window), then publishes MESSAGES messages of
about the size of steward's CloudEvents envelope for W2, each with its own
Nats-Msg-Id and reply subject, WINDOW at a time: a window is written in one
go and all its acknowledgements are read before the next. Speaks the NATS
protocol directly so that the publisher costs little next to the server.
"""
import json
import socket
import sys
import time

N, W, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", PORT))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1}\r\n')


def read_msg():
    line = f.readline()
    while line.startswith((b"PING", b"PONG", b"+OK")):
        if line.startswith(b"PING"):
            s.sendall(b"PONG\r\n")
        line = f.readline()
    parts = line.split()
    if parts[0] not in (b"MSG", b"HMSG"):
        raise SystemExit(f"unexpected from the server: {line!r}")
    body = f.read(int(parts[-1]) + 2)
    return body


s.sendall(b"SUB _INBOX.x.* 1\r\n")
req = json.dumps({"name": "T", "subjects": ["t.>"], "duplicate_window": 120_000_000_000}).encode()
s.sendall(b"PUB $JS.API.STREAM.CREATE.T _INBOX.x.c %d\r\n%s\r\n" % (len(req), req))
created = read_msg()
if b'"error"' in created:
    raise SystemExit(created.decode())
payload = (
    b'{"specversion":"1.0","id":"%s","source":"steward","type":"steward.product.upsert",'
    b'"time":"2026-12-03T10:00:00.123456Z","subject":"product/%d","datacontenttype":"application/json",'
    b'"data":{"sku":"B-1","name":"Bench product 1","price":126.25,"uom_id":1,"active":true},"version":12345}'
)
started = time.time()
for first in range(0, N, W):
    out = []
    for i in range(first, min(N, first + W)):
        mid = b"%024x" % i
        hdr = b"NATS/1.0\r\nNats-Msg-Id: " + mid + b"\r\n\r\n"
        body = payload % (mid, i)
        out.append(b"HPUB t.product.upsert _INBOX.x.%d %d %d\r\n%s%s\r\n" % (i, len(hdr), len(hdr) + len(body), hdr, body))
    s.sendall(b"".join(out))
    for i in range(first, min(N, first + W)):
        ack = read_msg()
        if b'"error"' in ack:
            raise SystemExit(ack.decode())
elapsed = time.time() - started
print(f"{N} messages in {elapsed:.2f} s = {N / elapsed:.0f}/s")
