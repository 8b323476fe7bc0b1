"""Who a per-source share belongs to (`names.source_key`), and the proxy and the enrolment
service using it: a client cannot take more than one source's share by changing its address
within its IPv6 /64."""

from __future__ import annotations

from kins_tunnel.cloud import enroll
from kins_tunnel.names import source_key


def test_source_key_groups_an_ipv6_client_by_its_64() -> None:
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert source_key("2001:db8:1:2::1") == source_key("[2001:db8:1:2:ffff::9]")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_key("?") == "?"


def test_enrolment_shares_are_keyed_by_the_64() -> None:
    assert enroll._host("[2001:db8::1]:4433") == enroll._host("[2001:db8::abcd:1]:5000")
    assert enroll._host("2001:db8::1:4433") == "2001:db8::/64"
    assert enroll._host("10.0.0.1:4433") == "10.0.0.1"
