"""SSRF policy: the submit check (no traffic) and the connect-time guard (traffic to loopback only)."""

from __future__ import annotations

import httpx
import pytest
from tests.support.webhook_receiver import Receiver

from underpaint.delivery import ssrf
from underpaint.delivery.ssrf import BlockedDestination, GuardedTransport, InvalidWebhookUrl, check_url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1/", "loopback"),
        ("http://127.1.2.3:8080/x", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://192.168.0.10/", "private"),
        ("http://172.16.5.4/", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://169.254.10.10/", "link-local"),
        ("http://[::1]/", "loopback"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fc00::5]/", "private"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),  # NAT64 wrapping 169.254.169.254
        ("http://localhost/", "loopback"),  # a hostname resolving to loopback
        ("http://2130706433/", "loopback"),  # 127.0.0.1 written as one integer
        ("http://0.0.0.0/", "unspecified"),
        ("http://100.64.0.1/", "CGNAT"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
    ],
)
def test_refuses_internal_addresses(url: str, why: str) -> None:
    with pytest.raises(InvalidWebhookUrl) as info:
        check_url(url, ())
    assert why in str(info.value)
    assert "webhook_allow_hosts" in str(info.value)
    assert info.value.url is not None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://x", "scheme 'ftp'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("example.com/hook", "scheme"),
        ("http:///nohost", "no host"),
        ("", "non-empty"),
        ("http://exa mple.com/", "not a valid URL"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://" + "a" * 3000 + ".com/", "longer than"),
    ],
)
def test_refuses_malformed_and_non_http(url: str, why: str) -> None:
    with pytest.raises(InvalidWebhookUrl) as info:
        check_url(url, ())
    assert why in str(info.value)


def test_public_address_passes_submit_check() -> None:
    # Only the check runs here: no connection is ever made to a non-loopback address in these tests.
    check_url("http://93.184.216.34/hook", ())
    check_url("https://[2606:2800:220:1:248:1893:25c8:1946]/hook", ())


def test_unresolvable_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, port: int) -> list[str]:
        raise BlockedDestination(f"cannot resolve host {host!r}: no such name")

    monkeypatch.setattr(ssrf, "resolve", fail)
    with pytest.raises(InvalidWebhookUrl, match="cannot resolve"):
        check_url("https://nowhere.invalid/hook", ())


def test_internationalized_names_are_checked_in_idna_form(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["10.0.0.5"]

    monkeypatch.setattr(ssrf, "resolve", fake)
    with pytest.raises(InvalidWebhookUrl, match="private"):
        check_url("https://bücher.example/hook", ())
    assert seen == ["xn--bcher-kva.example"]


def test_any_private_answer_refuses_a_mixed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: ["93.184.216.34", "10.0.0.5"])
    with pytest.raises(InvalidWebhookUrl, match=r"'hooks.example.com' resolves to 10.0.0.5, which is a private"):
        check_url("https://hooks.example.com/", ())


def test_allowlist_entries() -> None:
    check_url("http://127.0.0.1:9000/hook", ("127.0.0.1",))
    check_url("http://localhost:9000/hook", ("localhost",))
    check_url("http://localhost:9000/hook", ("localhost:9000",))
    check_url("http://localhost:9000/hook", ("127.0.0.0/8",))  # network entry matches the resolved address
    check_url("http://[::1]:9000/hook", ("[::1]:9000",))
    check_url("http://10.1.2.3/hook", ("10.0.0.0/8",))
    with pytest.raises(InvalidWebhookUrl):
        check_url("http://localhost:9001/hook", ("localhost:9000",))  # port-bound entry, other port
    with pytest.raises(InvalidWebhookUrl):
        check_url("http://10.1.2.3/hook", ("127.0.0.1",))
    with pytest.raises(InvalidWebhookUrl):
        check_url("file:///etc/passwd", ("127.0.0.1", "localhost"))  # the scheme rule has no allowlist


def _post(client: httpx.Client, url: str) -> int:
    return client.post(url, content=b"{}", headers={"content-type": "application/json"}).status_code


def test_connect_time_guard_blocks_loopback(receiver: Receiver) -> None:
    with httpx.Client(transport=GuardedTransport(())) as client, pytest.raises(BlockedDestination, match="loopback"):
        _post(client, receiver.url)
    assert receiver.count() == 0
    with httpx.Client(transport=GuardedTransport(("127.0.0.1",))) as client:
        assert _post(client, receiver.url) == 200
    assert receiver.count() == 1


def test_connect_time_guard_defeats_dns_rebinding(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # public at submit, loopback at connect
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: next(answers))
    url = f"http://rebind.example:{receiver.port}/hook"
    check_url(url, ())
    with (
        httpx.Client(transport=GuardedTransport(())) as client,
        pytest.raises(BlockedDestination, match=r"'rebind.example' resolves to 127.0.0.1"),
    ):
        _post(client, url)
    assert receiver.count() == 0


def test_guard_connects_to_the_checked_address_keeping_the_host_header(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(ssrf, "resolve", fake)
    url = f"http://hooks.internal:{receiver.port}/hook"
    with httpx.Client(transport=GuardedTransport(("127.0.0.1/32",))) as client:
        assert _post(client, url) == 200
    assert calls == ["hooks.internal"]  # resolved once, by the guard; the socket went to the checked address
    assert receiver.requests[0].headers["host"] == f"hooks.internal:{receiver.port}"
