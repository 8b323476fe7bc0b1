"""The stand-in's view of a K3s cluster: its pods (as objects, lists and server-side tables),
namespaces and nodes, API discovery documents, the version, and the counters of what it serves."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from kins_tunnel.testing.sandbox import Sandbox

K3S_VERSION = "v1.30.6+k3s1"  # 1.30: the first with the WebSocket remote-command protocol


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(since: dt.datetime) -> str:
    secs = int((dt.datetime.now(dt.UTC) - since).total_seconds())
    return f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"


@dataclass
class StandinStats:
    """What one stand-in is serving right now (for tests that stop and restart stand-ins)."""

    connections: int = 0  # TLS connections open
    watches: int = 0  # watch requests being streamed
    execs: int = 0  # exec, attach and port-forward sessions running
    requests: int = 0  # requests received in all


class _Cluster:
    """The stand-in's state: its pods and a resourceVersion counter."""

    def __init__(self, unit: str, interval: float, sandbox: Sandbox, stats: StandinStats) -> None:
        self.unit = unit
        self.interval = interval
        self.sandbox = sandbox
        self.stats = stats
        self.born = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
        self.rv = 1000
        self.pods = [
            (f"{unit}-server-kins-7d9f8b6c5-x2x4k", "edge1", "10.42.0.5"),
            (f"{unit}-agent-kins-5c6d7f8b9-h7lqz", "edge2", "10.42.1.3"),
            (f"{unit}-agent-kins-5c6d7f8b9-r4m8n", "edge3", "10.42.2.4"),
        ]

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def pod(self, ns: str, index: int, rv: str | None = None) -> dict[str, Any]:
        name, node, ip = self.pods[index]
        role = "server" if "-server-" in name else "agent"
        started = _ts(self.born)
        return {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": f"00000000-0000-4000-8000-{index:012d}",
                "resourceVersion": rv or str(self.rv),
                "creationTimestamp": started,
                "labels": {"app": f"{self.unit}-{role}-kins"},
            },
            "spec": {
                "nodeName": node,
                "containers": [
                    {
                        "name": role,
                        "image": f"rancher/k3s:{K3S_VERSION.replace('+', '-')}",
                        "stdin": True,
                        "tty": True,  # `attach -it` finds the line echo on a TTY
                        "ports": [
                            {"name": "echo", "containerPort": 7, "protocol": "TCP"},
                            {"name": "digest", "containerPort": 9, "protocol": "TCP"},
                        ],
                    }
                ],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "hostIP": ip,
                "startTime": started,
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": role,
                        "ready": True,
                        "restartCount": 0,
                        "image": f"rancher/k3s:{K3S_VERSION}",
                        "started": True,
                        "state": {"running": {"startedAt": started}},
                    }
                ],
            },
        }

    def pod_list(self, ns: str) -> dict[str, Any]:
        return {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": [self.pod(ns, i) for i in range(len(self.pods))],
        }

    def simple_list(self, resource: str) -> dict[str, Any]:
        """A list of namespaces or nodes (names only), or an empty ConfigMapList."""
        kind = {"namespaces": "Namespace", "nodes": "Node", "configmaps": "ConfigMap"}[resource]
        names = {
            "namespaces": ["default", "kube-system", "kins-system"],
            "nodes": sorted({node for _, node, _ in self.pods}),
            "configmaps": [],
        }[resource]
        items = [
            {
                "kind": kind,
                "apiVersion": "v1",
                "metadata": {"name": n, "creationTimestamp": _ts(self.born)},
            }
            for n in names
        ]
        return {
            "kind": f"{kind}List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }

    def pod_table(self, pods: list[dict[str, Any]], include: str) -> dict[str, Any]:
        cols = [
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ]
        rows = []
        for p in pods:
            row: dict[str, Any] = {
                "cells": [
                    p["metadata"]["name"],
                    "1/1",
                    "Running",
                    0,
                    _age(self.born),
                    p["status"]["podIP"],
                    p["spec"]["nodeName"],
                    "<none>",
                    "<none>",
                ]
            }
            if include == "Object":
                row["object"] = p
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": p["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.rv)},
            "columnDefinitions": [
                {
                    "name": n,
                    "type": t,
                    "format": "name" if n == "Name" else "",
                    "description": n,
                    "priority": pr,
                }
                for n, t, pr in cols
            ],
            "rows": rows,
        }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    }


_RESOURCES = [
    ("pods", "Pod", True, ["get", "list", "watch"], ["po"]),
    ("pods/log", "Pod", True, ["get"], []),
    ("pods/exec", "PodExecOptions", True, ["create", "get"], []),
    ("pods/attach", "PodAttachOptions", True, ["create", "get"], []),
    ("pods/portforward", "PodPortForwardOptions", True, ["create", "get"], []),
    ("namespaces", "Namespace", False, ["get", "list"], ["ns"]),
    ("configmaps", "ConfigMap", True, ["get", "list"], ["cm"]),
    ("nodes", "Node", False, ["get", "list"], ["no"]),
]
_API_RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {
            "name": n,
            "singularName": "" if "/" in n else k.lower(),
            "namespaced": ns,
            "kind": k,
            "verbs": v,
            **({"shortNames": s} if s else {}),
        }
        for n, k, ns, v, s in _RESOURCES
    ],
}
_VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": K3S_VERSION,
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-10-24T00:00:00Z",
    "goVersion": "go1.22.8",
    "compiler": "gc",
    "platform": "linux/amd64",
}
