#!/usr/bin/env python3
"""Answers a machine's serial console as a person at it would: waits for each expected text and
types the answer after it.

    console.py SOCKET LOG TIMEOUT_S EXPECT SEND [EXPECT SEND]...

SOCKET is QEMU's serial port as a Unix socket (`-serial unix:SOCKET,server=on,wait=off`),
connected to as soon as it exists. Everything the console prints is appended to LOG. Each
EXPECT is plain text looked for after the previous match (within TIMEOUT_S seconds of it); its
SEND is then typed, after half a second, with backslash escapes (\\r, \\x1b) decoded. After the
last answer the console is read until the machine closes it (QEMU exited). Exits 1, naming the
text awaited, when one does not come in time or the console closes before it.
"""
import codecs
import socket
import sys
import time


def main():
    path, log_path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    steps = sys.argv[4:]
    if len(steps) % 2:
        sys.exit("console.py: EXPECT and SEND come in pairs")
    log = open(log_path, "ab", buffering=0)
    s = socket.socket(socket.AF_UNIX)
    deadline = time.time() + 30
    while True:
        try:
            s.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                sys.exit(f"console.py: cannot connect to {path}")
            time.sleep(0.1)
    s.settimeout(1)
    seen = ""

    def read():
        nonlocal seen
        try:
            b = s.recv(65536)
        except socket.timeout:
            return True
        if not b:
            return False
        log.write(b)
        seen += b.decode(errors="replace")
        return True

    for i in range(0, len(steps), 2):
        want, send = steps[i], codecs.decode(steps[i + 1], "unicode_escape")
        until = time.time() + timeout
        while want not in seen:
            if not read():
                sys.exit(f"console.py: the console closed before {want!r}")
            if time.time() > until:
                sys.exit(f"console.py: no {want!r} in {timeout:.0f} s")
        seen = seen[seen.index(want) + len(want):]
        time.sleep(0.5)
        s.sendall(send.encode())
    while read():
        pass


main()
