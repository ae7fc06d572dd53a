#!/usr/bin/env python3
"""Memory per idle kept-alive connection of a running proxy.

Opens N connections to ADDR, sends one HTTP/1.1 request (or, with --h2, one h2c request) on
each and reads its response, keeps them all open and idle, and reports the proxy's resident
memory (from /proc/PID/status) before and after, and the difference per connection. Sends
traffic only to the address given; closes every connection before it exits.

usage: idle_memory.py PID ADDR N [--host HOST] [--h2]
"""
import socket
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def h1(sock, host):
    sock.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before a response")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        body += sock.recv(65536)


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2(sock, host):
    # Prior knowledge: preface, empty SETTINGS, then one GET on stream 1 with a literal
    # (never indexed, no Huffman) header block.
    def literal(name, value):
        return b"\x10" + bytes([len(name)]) + name + bytes([len(value)]) + value

    block = (literal(b":method", b"GET") + literal(b":scheme", b"http")
             + literal(b":path", b"/") + literal(b":authority", host.encode()))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 5, 1, block))
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("h2 connection closed before a response")
        data += chunk
        # Walk the frames: done at END_STREAM on stream 1; acknowledge SETTINGS.
        offset, done = 0, False
        while offset + 9 <= len(data):
            length = int.from_bytes(data[offset:offset + 3], "big")
            kind, flags = data[offset + 3], data[offset + 4]
            stream = int.from_bytes(data[offset + 5:offset + 9], "big") & 0x7FFFFFFF
            if offset + 9 + length > len(data):
                break
            if kind == 4 and not flags & 1:
                sock.sendall(frame(4, 1, 0))
            if stream == 1 and kind in (0, 1) and flags & 1:
                done = True
            offset += 9 + length
        data = data[offset:]
        if done:
            return


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("addr")
    parser.add_argument("n", type=int)
    parser.add_argument("--host", default="hello")
    parser.add_argument("--h2", action="store_true")
    args = parser.parse_args()
    ip, port = args.addr.rsplit(":", 1)
    before = rss_kb(args.pid)
    conns = []
    try:
        for _ in range(args.n):
            sock = socket.create_connection((ip, int(port)))
            (h2 if args.h2 else h1)(sock, args.host)
            conns.append(sock)
        time.sleep(2)  # idle connections give back their buffers after 1 s; let them
        after = rss_kb(args.pid)
    finally:
        for sock in conns:
            sock.close()
    per = (after - before) * 1024 / args.n
    print(f"{args.n} idle {'h2' if args.h2 else 'HTTP/1.1'} connections: "
          f"RSS {before} -> {after} kB, {per:.0f} bytes per connection")


if __name__ == "__main__":
    main()
