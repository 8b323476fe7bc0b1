"""The ClusterIP alias table: static entries, DNS discovery with an injected resolver."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kins_tunnel.cloud.aliases import AliasTable, NoAlias, Rewrite, dns_resolver, service_host
from kins_tunnel.config import AliasDiscovery
from kins_tunnel.testing.support import wait_until


class TableResolver:
    """Test double of DNS: answers from a dict the test edits; a missing name fails like NXDOMAIN."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[str] = []
        self.fail = False

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        await trio.lowlevel.checkpoint()
        if self.fail or host not in self.answers:
            raise OSError(f"lookup of {host} failed (test resolver)")
        return list(self.answers[host])


A_HOST = "a-svc-kins.kins-system.svc.cluster.local."


def test_static_entries_and_names_pass_through() -> None:
    table = AliasTable(
        {"10.96.12.34:443": "test-svc-kins.kins-system:443", "[fd00::7]:22": "edge1:22"},
        AliasDiscovery(enabled=False),
    )
    assert table.rewrite("10.96.12.34:443") == Rewrite("test-svc-kins.kins-system:443", "static")
    assert table.rewrite("[fd00::7]:22") == Rewrite("edge1:22", "static")
    assert table.rewrite("edge1:22") == Rewrite("edge1:22", "")
    with pytest.raises(NoAlias, match="10.96.12.34 is not a known ClusterIP"):
        table.rewrite("10.96.12.34:6443")  # static entries are exact
    with pytest.raises(NoAlias):
        table.rewrite("10.0.0.9:443")


async def test_discovery_on_connect_and_interval_keeps_entries_on_failure() -> None:
    dns = TableResolver({A_HOST: ["10.96.0.10"]})
    seen: list[str] = []
    table = AliasTable({}, AliasDiscovery(True, "cluster.local", 0.05), dns, on_lookup=seen.append)
    units = {"a"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.run, lambda: units)
        await wait_until(lambda: bool(seen), 10, "a first change")
        assert table.rewrite("10.96.0.10:443") == Rewrite(
            "a-svc-kins.kins-system:443", "discovered"
        )
        assert table.rewrite("10.96.0.10:10250").name == "a-svc-kins.kins-system:10250"  # any port
        # the resolver fails: the previous entries stay
        dns.fail = True
        n = len(seen)
        await wait_until(lambda: seen.count("failed") >= 2, 10, "two failed lookups")
        assert len(seen) > n
        assert table.rewrite("10.96.0.10:443").name == "a-svc-kins.kins-system:443"
        # a new ClusterIP replaces the old one
        dns.fail = False
        dns.answers[A_HOST] = ["10.96.0.11"]
        await wait_until(lambda: "10.96.0.11:*" in table.entries(), 10, "10.96.0.11 in the table")
        with pytest.raises(NoAlias):
            table.rewrite("10.96.0.10:443")
        nursery.cancel_scope.cancel()


async def test_a_unit_that_connects_is_looked_up_at_once(
    virtual_clock: trio.testing.MockClock,
) -> None:
    """On the virtual clock: nothing is looked up for most of the hour-long interval while nobody
    is connected; a unit that connects is looked up at once (no time passes), and only once however
    often it reconnects."""
    dns = TableResolver({"b-svc-kins.kins-system.svc.corp.example.": ["fd00::5", "10.1.2.3"]})
    table = AliasTable(
        {"10.1.2.3:443": "edge9:443"}, AliasDiscovery(True, "corp.example", 3600), dns
    )
    units: set[str] = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.run, lambda: units)
        await trio.sleep(3500)
        assert dns.asked == []  # nobody connected, hour-long interval: no lookups
        units.add("b")
        table.unit_connected("b")
        t0 = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()  # the lookup it wakes has run to its end
        assert trio.current_time() == t0  # at once, not at the interval: no time passed
        assert "[fd00::5]:*" in table.entries()
        assert dns.asked == ["b-svc-kins.kins-system.svc.corp.example."]
        assert table.rewrite("[fd00::5]:443").name == "b-svc-kins.kins-system:443"
        assert table.rewrite("10.1.2.3:443") == Rewrite("edge9:443", "static")  # static wins
        assert table.rewrite("10.1.2.3:80") == Rewrite("b-svc-kins.kins-system:80", "discovered")
        table.unit_connected("b")  # known already: no second lookup
        units.add("c")
        for _ in range(50):  # a unit whose Service does not resolve, reconnecting again and again
            table.unit_connected("c")
            await trio.sleep(0.002)
        await trio.sleep(0.05)
        assert dns.asked == [
            "b-svc-kins.kins-system.svc.corp.example.",
            "c-svc-kins.kins-system.svc.corp.example.",
        ]
        nursery.cancel_scope.cancel()


async def test_an_address_moving_to_another_unit() -> None:
    dns = TableResolver({A_HOST: ["10.9.9.9"]})
    table = AliasTable({}, AliasDiscovery(), dns)
    assert await table.lookup("a")
    dns.answers = {"c-svc-kins.kins-system.svc.cluster.local.": ["10.9.9.9"]}
    assert await table.lookup("c")
    assert table.rewrite("10.9.9.9:443").name == "c-svc-kins.kins-system:443"
    assert not await table.lookup("a")  # a's name is gone: its (now empty) entries stay
    assert table.rewrite("10.9.9.9:443").name == "c-svc-kins.kins-system:443"


async def test_discovery_off_does_nothing() -> None:
    dns = TableResolver({A_HOST: ["10.0.0.1"]})
    table = AliasTable({}, AliasDiscovery(enabled=False), dns)
    table.unit_connected("a")
    with trio.fail_after(1):
        await table.run(lambda: {"a"})  # returns at once
    assert dns.asked == []


def test_service_host() -> None:
    assert service_host("test", "cluster.local") == "test-svc-kins.kins-system.svc.cluster.local."


async def test_dns_resolver_resolves_localhost() -> None:
    assert "127.0.0.1" in await dns_resolver("localhost")
