"""What keeps web pages from driving the local server through the user's browser.

Any page the user visits can make the browser send requests to ``http://127.0.0.1:8000``. Three checks,
made by :class:`~mobillama.serve.gate.Gate` before anything else, refuse them:

- ``Host`` (:class:`HostPolicy`): a DNS-rebinding page has its own name resolve to 127.0.0.1, so the
  browser treats the server as that page's origin and lets it read the answers; its requests still carry
  the page's name in ``Host``. Only names this server is known by pass: the bound address, ``localhost``,
  ``127.0.0.1``, ``[::1]`` (with the server's port or none), the address the connection arrived on (an
  IP literal, so a LAN client of a ``0.0.0.0`` server can use the machine's address), and the
  ``--allowed-host`` names (``*``: any, which turns this defence off).
- ``Origin`` (:func:`same_origin`): a browser names the page that made a cross-site request; one from a
  page that is not this server's own (the chat page) is refused, ``Origin: null`` included.
- ``Content-Type`` (:func:`is_json`): a cross-site ``fetch`` or form may send ``text/plain``,
  form-encoded or multipart bodies without a CORS preflight; ``application/json`` needs one, and the
  server answers no preflight (it sends no CORS headers), so requiring JSON blocks the rest.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mobillama.errors import MobiLlamaError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
ANY_HOST = "*"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port or None)`` of a ``Host`` header or an ``--allowed-host`` value, the name lower-case
    (IPv6 without brackets, an IPv4-mapped IPv6 address as IPv4); None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] or None
    elif value.count(":") > 1:  # a bare IPv6 address (a bind address or an --allowed-host value)
        name, port_text = value, None
    else:
        name, _, port_text = value.partition(":")
        port_text = port_text or None
    if not name or any(c.isspace() or c in "/\\@?#[]" for c in name):
        return None
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            return None
        port = int(port_text)
    return _normal_name(name), port


def _normal_name(name: str) -> str:
    """An IP address in one spelling (``::ffff:127.0.0.1`` is ``127.0.0.1``); other names as given."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` headers the server answers (see the module docstring)."""

    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    any_host: bool = field(init=False)
    own_names: frozenset[str] = field(init=False)  # with the server's port or none
    extra: frozenset[tuple[str, int | None]] = field(init=False)  # port None: any port

    def __post_init__(self) -> None:
        names = {_normal_name(n) for n in LOOPBACK_NAMES}
        bind = split_host(self.bind_host)
        if self.bind_host.strip() not in WILDCARD_BINDS and bind is not None:
            names.add(bind[0])
        extra = {split_host(h) for h in self.allowed_hosts if h.strip() != ANY_HOST}
        if None in extra:
            bad = next(h for h in self.allowed_hosts if h.strip() != ANY_HOST and split_host(h) is None)
            raise MobiLlamaError(
                f"allowed host {bad!r} is not a host name or address (with an optional :PORT)"
            )
        object.__setattr__(self, "any_host", any(h.strip() == ANY_HOST for h in self.allowed_hosts))
        object.__setattr__(self, "own_names", frozenset(names))
        object.__setattr__(self, "extra", frozenset(extra))

    def allows(self, host: str | None, local: tuple | None = None) -> bool:
        """Whether to answer a request with this ``Host`` header (None: no header, which no browser
        sends) on a connection to the local address ``local`` (ASGI's ``scope["server"]``)."""
        if self.any_host or host is None:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if (name, port) in self.extra or (name, None) in self.extra:
            return True
        local_host, local_port = tuple(local)[:2] if local else (None, None)
        if port is not None and local_port is not None and port != local_port:
            return False
        if name in self.own_names:
            return True
        return isinstance(local_host, str) and _is_ip(name) and name == _normal_name(local_host)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def same_origin(origin: str, host: str | None) -> bool:
    """Whether an ``Origin`` header names this server as the request reached it (the ``Host`` header):
    the page that sent it was served by this server, e.g. the chat page."""
    try:
        parts = urlsplit(origin.strip().lower())
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or host is None:
        return False
    target = split_host(host)
    if target is None:
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    return (_normal_name(parts.hostname), origin_port or default) == (target[0], target[1] or default)


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header is ``application/json`` (parameters such as charset allowed)."""
    return content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"


__all__ = [
    "ANY_HOST",
    "HostPolicy",
    "LOOPBACK_NAMES",
    "WILDCARD_BINDS",
    "is_json",
    "same_origin",
    "split_host",
]
