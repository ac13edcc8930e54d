"""Listening: check the host, bind the socket before the model loads, run uvicorn on it.

The socket is bound by culturalign, not by uvicorn, so that a port in use or a host that is not
this machine's is one clear error before the model spends seconds loading, and so that port 0 (any
free port) tells the caller which port it got.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from culturalign.errors import CulturalignError

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(host: str) -> str:
    """An IP address or a host name (RFC 1123 labels), or one error naming --host."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        ipaddress.ip_address(h)
        return h
    except ValueError:
        pass
    if h and len(h) <= 253 and all(_LABEL.match(label) for label in h.rstrip(".").split(".")):
        return h
    raise CulturalignError(f"--host {host!r} is not an IP address or a host name; e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise CulturalignError(f"--port {port!r}: expected a port number from 1 to 65535 (or 0 for any free port)")
    return port


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or one error naming --host/--port."""
    host, port = check_host(host), check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CulturalignError(f"--host {host!r} cannot be resolved ({e.strerror or e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CulturalignError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app, timeout_keep_alive: int = 5):
    """A uvicorn server for `app` with culturalign's own log line per request (uvicorn's access log off)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=timeout_keep_alive,
                            lifespan="on", server_header=False, timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def run(app, sock: socket.socket) -> None:
    """Serve `app` on the bound socket until Ctrl-C or SIGTERM, then return (a clean stop, exit status 0).

    uvicorn shuts down gracefully on either signal and then raises it again for the handler that was
    installed before it started; a no-op handler there turns that into a normal return.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        uvicorn_server(app).run(sockets=[sock])
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in stops}
    try:
        uvicorn_server(app).run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
