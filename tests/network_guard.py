"""Blocks and records every outbound connection attempt of the process it is installed in.

Loopback and Unix sockets stay allowed (Beam's local runners talk over them). Blocked attempts
fail before any packet leaves: name lookups of non-local hosts are refused too.
"""

from __future__ import annotations

import ipaddress
import socket

LOCAL_NAMES = {"localhost", "", None}


def _is_local(host) -> bool:
    if host in LOCAL_NAMES or (isinstance(host, str) and host.endswith(".localhost")):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0] if isinstance(host, str) else host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def install(log_path: str) -> None:
    def record(what: str) -> None:
        with open(log_path, "a") as log:
            log.write(what + "\n")

    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)

    def allowed(sock, address) -> bool:
        return sock.family == getattr(socket, "AF_UNIX", None) or _is_local(address[0])

    def connect(sock, address):
        if not allowed(sock, address):
            record(f"connect {address}")
            raise ConnectionRefusedError(f"outbound connection to {address} blocked by the test guard")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if not allowed(sock, address):
            record(f"connect_ex {address}")
            return 111  # ECONNREFUSED
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host.decode() if isinstance(host, bytes) else host):
            record(f"getaddrinfo {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"lookup of {host} blocked by the test guard")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
