#!/usr/bin/env python3
"""Reads a VM's serial console through the API's WebSocket (as the browser's console does) until
a line matches a pattern.

    serial.py [--tee FILE] HOST COOKIE_JAR VM_ID PATTERN TIMEOUT_S

HOST serves the API over HTTPS on port 443 (its certificate is not checked: the cluster made
it); COOKIE_JAR is curl's, holding a logged-in session. The stream starts with the console's
recent history. A console that cannot be opened yet (the VM not running: 502) is tried again
every 3 s; one that closes (its VM restarted or moved) is opened again. Prints the first line
matching PATTERN (a regular expression) and exits 0, or exits 1 after TIMEOUT_S seconds (2 when
the console never opened), saying why on stderr. With --tee, every line read is also appended to
FILE as it comes (a watcher keeping one VMM's console's record: it ends when that closes).
"""
import base64
import os
import re
import socket
import ssl
import sys
import time


def cookie(jar):
    for line in open(jar):
        line = line.strip()
        if line.startswith("#HttpOnly_"):
            line = line[len("#HttpOnly_"):]
        elif not line or line.startswith("#"):
            continue
        f = line.split("\t")
        if len(f) == 7:
            return f"{f[5]}={f[6]}"
    sys.exit("serial.py: no cookie in " + jar)


def open_console(host, jar, vm):
    """The console's socket and the bytes after its handshake, or an error's text."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        s = ctx.wrap_socket(socket.create_connection((host, 443), timeout=10))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (
                f"GET /api/v1/vms/{vm}/console/serial HTTP/1.1\r\nHost: {host}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: https://{host}\r\nCookie: {cookie(jar)}\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        return None, None, str(e)
    head, _, buf = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode(errors="replace")
    if " 101 " not in status:
        s.close()
        return None, None, status
    return s, buf, None


def main():
    args = sys.argv[1:]
    tee = None
    if args[:1] == ["--tee"]:
        tee = open(args[1], "a", buffering=1)
        args = args[2:]
    host, jar, vm, pattern, timeout = args[:5]
    deadline = time.time() + float(timeout)
    want = re.compile(pattern)
    while True:
        why = follow(host, jar, vm, want, deadline, tee)
        # A console that closed (its VM restarted, moved) is opened again by one who waits
        # for a line; a watcher (--tee) records one VMM's console only.
        if tee or time.time() + 3 >= deadline:
            sys.exit(f"serial.py: {host}: {why}")
        print(f"serial.py: {host}: {why}; opening it again", file=sys.stderr)
        time.sleep(3)


def follow(host, jar, vm, want, deadline, tee):
    """Reads one opening of the console until a line matches (printed, exit 0); else why not."""
    while True:
        s, buf, err = open_console(host, jar, vm)
        if s:
            break
        if time.time() + 3 >= deadline:
            print(f"serial.py: {host}: {err}", file=sys.stderr)
            sys.exit(2)
        time.sleep(3)
    text = ""
    s.settimeout(1)
    while time.time() < deadline:
        # One frame: server frames are not masked.
        while len(buf) < 2 or len(buf) < frame_len(buf):
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                chunk = None
            except OSError as e:
                return f"reading the console: {e} (after {text[-200:]!r})"
            if chunk == b"":
                return f"the console closed (after {text[-200:]!r})"
            if chunk:
                buf += chunk
            if time.time() >= deadline:
                return f"no {want.pattern!r} in time (last: {text[-200:]!r})"
        n, start = frame_len(buf), header_len(buf)
        opcode = buf[0] & 0x0F
        payload, buf = buf[start:n], buf[n:]
        if opcode == 8:
            return f"the server closed the console (after {text[-200:]!r})"
        if opcode in (1, 2):
            text += payload.decode(errors="replace")
            *lines, text = text.split("\n")
            for line in lines:
                if tee:
                    tee.write(line.rstrip("\r") + "\n")
                if want.search(line):
                    print(line.strip())
                    sys.exit(0)
    return f"no {want.pattern!r} in time (last: {text[-200:]!r})"


def header_len(b):
    n = b[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0)


def frame_len(b):
    if len(b) < 2:
        return 2
    n = b[1] & 0x7F
    h = header_len(b)
    if len(b) < h:
        return h
    if n == 126:
        n = int.from_bytes(b[2:4], "big")
    elif n == 127:
        n = int.from_bytes(b[2:10], "big")
    return h + n


main()
