"""SSRF guard for webhook targets: refuse URLs that would make the server call into its own network.

Two checks share one policy. ``check_url`` runs at submit and gives the client a clear 400. ``GuardedTransport``
runs at connect time: it resolves the host once, checks every address, and connects to a checked address while
the request keeps the original Host header and TLS SNI, so a DNS answer that changes between submit and
delivery (DNS rebinding) cannot reach a private address.

``allow_hosts`` entries (operator allowlist) admit otherwise refused targets:
``"hooks.internal"`` (a hostname, any port), ``"hooks.internal:8080"`` or ``"[::1]:8080"`` (host and port),
``"10.0.0.7"`` or ``"10.0.0.0/8"`` (an address or network, matched against the resolved addresses; with an
optional ``:port`` for single addresses).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = ("http", "https")
# What a host may hold once httpx parsed it: DNS labels (IDNA already applied), IPv4, or IPv6 without a zone.
_HOST_CHARS = re.compile(r"[A-Za-z0-9_.:-]+")
_MAX_URL_LENGTH = 2048
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class InvalidWebhookUrl(ValueError):
    """A webhook URL this server will not call; ``str(exc)`` is written for the client (the API answers 400)."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class BlockedDestination(Exception):
    """A webhook target that the policy refuses (raised at connect time; ``check_url`` turns it into a 400)."""


def resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (IP literals resolve to themselves). Module-level so tests can swap it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise BlockedDestination(f"cannot resolve host {host!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 scope id
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise BlockedDestination(f"host {host!r} resolves to no address")
    return addresses


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why a webhook must not connect to ``ip``, or None when it is a public unicast address."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        reason = refusal_reason(inner)
        return None if reason is None else f"{reason} (embedded in IPv6 {ip})"
    if ip in _METADATA:
        return "a cloud metadata address"
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip in _CGNAT, "a shared (CGNAT) address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "not a globally routable address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


@dataclass(frozen=True)
class _Rule:
    host: str | None = None  # hostname rule (lower case, no trailing dot)
    network: IPNetwork | None = None
    port: int | None = None  # None: any port

    def admits_host(self, host: str, port: int) -> bool:
        return self.host is not None and self.host == host and self.port in (None, port)

    def admits_address(self, ip: IPAddress, port: int) -> bool:
        return self.network is not None and ip in self.network and self.port in (None, port)


def _normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _parse_rule(entry: str) -> _Rule:
    text = entry.strip().lower()
    port: int | None = None
    if text.startswith("["):  # [v6] or [v6]:port
        inner, _, rest = text[1:].partition("]")
        text = inner
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif text.count(":") == 1 and text.rsplit(":", 1)[1].isdigit():
        text, port_text = text.rsplit(":", 1)
        port = int(port_text)
    try:
        return _Rule(network=ipaddress.ip_network(text, strict=False), port=port)
    except ValueError:
        return _Rule(host=_normalize_host(text), port=port)


class UrlPolicy:
    """The allowlist plus the address rules, shared by the submit check and the connect-time guard."""

    def __init__(self, allow_hosts: Sequence[str] = ()) -> None:
        self._rules = tuple(_parse_rule(entry) for entry in allow_hosts if entry.strip())

    def host_allowlisted(self, host: str, port: int) -> bool:
        host = _normalize_host(host)
        return any(rule.admits_host(host, port) for rule in self._rules)

    def check_address(self, host: str, address: str, port: int) -> None:
        ip = ipaddress.ip_address(address)
        if any(rule.admits_address(ip, port) for rule in self._rules):
            return
        reason = refusal_reason(ip)
        if reason is not None:
            shown = f"{host!r} resolves to {address}" if _normalize_host(host) != address else f"{address}"
            raise BlockedDestination(f"webhook host {shown}, which is {reason}; refused (not in webhook_allow_hosts)")

    def checked_addresses(self, host: str, port: int) -> list[str] | None:
        """Addresses to connect to, all checked; None when the host is allowlisted by name (connect as is)."""
        if self.host_allowlisted(host, port):
            return None
        addresses = resolve(host, port)
        for address in addresses:
            self.check_address(host, address, port)
        return addresses


def _parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a webhook URL, parsed the way httpx will parse it when sending."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidWebhookUrl("extra.webhook.url must be a non-empty string")
    if len(url) > _MAX_URL_LENGTH:
        raise InvalidWebhookUrl(f"extra.webhook.url is longer than {_MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidWebhookUrl(f"extra.webhook.url is not a valid URL: {exc}") from exc
    scheme = parsed.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidWebhookUrl(
            f"extra.webhook.url scheme {scheme or '(none)'!r} is not allowed: use http or https", url=url
        )
    host = parsed.raw_host.decode("ascii", "replace")  # IDNA-encoded, as it is resolved and sent
    if not host:
        raise InvalidWebhookUrl("extra.webhook.url has no host", url=url)
    if not _HOST_CHARS.fullmatch(host):
        raise InvalidWebhookUrl(f"extra.webhook.url is not a valid URL: bad host {parsed.host!r}", url=url)
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise InvalidWebhookUrl(f"extra.webhook.url is not a valid URL: port {parsed.port} out of range", url=url)
    port = parsed.port or (443 if scheme == "https" else 80)
    return scheme, host, port


def check_url(url: str, allow_hosts: Sequence[str]) -> None:
    """Raise ``InvalidWebhookUrl`` unless ``url`` is an http(s) URL to a public address.

    Every address the host resolves to must be public unless the allowlist admits the host or the address.
    """
    _scheme, host, port = _parse(url)
    try:
        UrlPolicy(allow_hosts).checked_addresses(host, port)
    except BlockedDestination as exc:
        raise InvalidWebhookUrl(f"extra.webhook.url: {exc}", url=url) from exc


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves once, checks every address, then connects to a checked address (never re-resolving the name)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._policy.checked_addresses(host, port)
        if addresses is None:
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        last: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # resolve() never returns an empty list
        raise last

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise BlockedDestination("unix sockets are not webhook targets")


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport whose every TCP connection goes through the SSRF policy. No proxies, no env config."""

    def __init__(self, allow_hosts: Sequence[str] = (), max_connections: int = 20) -> None:
        super().__init__(trust_env=False)
        # Replace the pool httpx built with one that uses the guarded network backend; TLS SNI and the Host
        # header still come from the URL, only the socket goes to the checked address.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(UrlPolicy(allow_hosts)),
        )
