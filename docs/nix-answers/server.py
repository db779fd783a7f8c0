#!/usr/bin/env python3
"""A binary-cache HTTP server on 127.0.0.1 whose answers are controlled per request.

Usage: nix-answer-server.py PORT PRIORITY CACHEDIR MODEFILE LOGFILE

Serves a `file://...?compression=none` binary cache from CACHEDIR.  Before every request it
reads MODEFILE (JSON; missing or unreadable = {}), with these keys:

  narinfo : action for GET/HEAD /<hash>.narinfo           (default "serve")
  nar     : action for GET /nar/... without a Range header   (default "serve")
  range   : action for GET /nar/... with a Range header     (default "206")
  narinfo_seq : optional list of narinfo actions, the n-th narinfo request (counted since the
            mode file last changed) takes the n-th entry; the last entry repeats.

Actions:
  serve        200 with the file (404 if the file is absent)
  404, 503 ... that status at once, empty body
  delay:S:A    accept, read the request, sleep S seconds, then do action A
  cut          (nar) 200 + Content-Length, NO Accept-Ranges, send half the bytes, close
  cut-ar       (nar) same, but with `Accept-Ranges: bytes`
  206          (range) 206 + Content-Range bytes N-(total-1)/total + the rest
  cut206       (range) like 206 but again cut after half of the remaining bytes
  silent       accept, read the request, never answer (until the client goes away)

`/nix-cache-info` is always 200 (StoreDir /nix/store, WantMassQuery 1, Priority PRIORITY).
Every request and what was done is appended to LOGFILE as one JSON line (time.time() stamps).
"""
import http.server
import json
import os
import socket
import sys
import threading
import time

PORT, PRIO, CACHE, MODEFILE, LOGFILE = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                        sys.argv[4], sys.argv[5])
lock = threading.Lock()
state = {"mode_raw": None, "count": 0}


def read_mode():
    try:
        with open(MODEFILE) as f:
            raw = f.read()
    except OSError:
        raw = "{}"
    with lock:
        if raw != state["mode_raw"]:
            state["mode_raw"] = raw
            state["count"] = 0
    try:
        return json.loads(raw or "{}")
    except ValueError:
        return {}


def log(rec):
    rec["port"] = PORT
    with lock:
        with open(LOGFILE, "a") as f:
            f.write(json.dumps(rec) + "\n")


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def rec(self, t0, action, **kw):
        r = {"t": t0, "t_end": time.time(), "method": self.command, "path": self.path,
             "headers": {k: v for k, v in self.headers.items()}, "action": action}
        r.update(kw)
        log(r)

    def status_only(self, code, t0, action):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.rec(t0, action, status=code)

    def silent(self, t0):
        self.rec(t0, "silent-start")
        self.connection.settimeout(None)
        try:
            while self.connection.recv(4096):
                pass
        except OSError:
            pass
        self.close_connection = True
        self.rec(t0, "silent-client-gone")

    def do_HEAD(self):
        self.handle_req(head=True)

    def do_GET(self):
        self.handle_req(head=False)

    def handle_req(self, head):
        t0 = time.time()
        mode = read_mode()
        p = self.path.split("?")[0]
        if p == "/nix-cache-info":
            body = ("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: %s\n" % PRIO).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/x-nix-cache-info")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            self.rec(t0, "cache-info", status=200)
            return
        fpath = os.path.join(CACHE, p.lstrip("/"))
        if p.endswith(".narinfo"):
            action = mode.get("narinfo", "serve")
            seq = mode.get("narinfo_seq")
            if seq:
                with lock:
                    n = state["count"]
                    state["count"] += 1
                action = seq[min(n, len(seq) - 1)]
            kind = "narinfo"
        elif p.startswith("/nar/"):
            kind = "nar"
            rng = self.headers.get("Range")
            action = mode.get("range", "206") if rng else mode.get("nar", "serve")
        else:
            kind = "other"
            action = "serve"
        self.do_action(action, kind, fpath, head, t0)

    def do_action(self, action, kind, fpath, head, t0):
        while action.startswith("delay:"):
            _, secs, action = action.split(":", 2)
            time.sleep(float(secs))
        if action == "silent":
            return self.silent(t0)
        if action.isdigit() and not (kind == "nar" and action == "206"):
            return self.status_only(int(action), t0, action)
        if not os.path.isfile(fpath):
            return self.status_only(404, t0, action + "/absent")
        with open(fpath, "rb") as f:
            data = f.read()
        total = len(data)
        if action == "serve" or (kind != "nar" and action in ("cut", "cut-ar", "206", "cut206")):
            self.send_response(200)
            ctype = "text/x-nix-narinfo" if kind == "narinfo" else "application/x-nix-nar"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return self.rec(t0, action, status=200, sent=0 if head else total, total=total)
        if action in ("cut", "cut-ar"):
            half = total // 2
            self.send_response(200)
            self.send_header("Content-Type", "application/x-nix-nar")
            self.send_header("Content-Length", str(total))
            if action == "cut-ar":
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data[:half])
            self.wfile.flush()
            time.sleep(0.2)
            self.cut()
            return self.rec(t0, action, status=200, sent=half, total=total)
        if action in ("206", "cut206"):
            rng = self.headers.get("Range", "bytes=0-")
            start = int(rng.split("=", 1)[1].split("-", 1)[0] or 0)
            rest = data[start:]
            self.send_response(206)
            self.send_header("Content-Type", "application/x-nix-nar")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, total - 1, total))
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            if action == "206":
                self.wfile.write(rest)
                return self.rec(t0, action, status=206, start=start, sent=len(rest), total=total)
            self.wfile.write(rest[:len(rest) // 2])
            self.wfile.flush()
            time.sleep(0.2)
            self.cut()
            return self.rec(t0, action, status=206, start=start, sent=len(rest) // 2, total=total)
        return self.status_only(500, t0, "unknown-action:" + action)

    def cut(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    srv = S(("127.0.0.1", PORT), H)
    log({"t": time.time(), "action": "server-start"})
    srv.serve_forever()
