"""What only the broker's management API can tell (AMQP cannot): the cluster's nodes and which node leads
each queue. Set REPORTFLOW_BROKER_API_URL (http://user:password@host:15672) to see them in `reportflow
status`."""

from __future__ import annotations

import base64
import json
import urllib.request
from urllib.parse import quote, unquote, urlsplit


class BrokerApi:
    def __init__(self, api_url: str, timeout: float = 5):
        parts = urlsplit(api_url)
        self._base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        credentials = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        self._authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        self._timeout = timeout

    def _get(self, path: str):
        request = urllib.request.Request(self._base + path, headers={"Authorization": self._authorization})
        with urllib.request.urlopen(request, timeout=self._timeout) as answer:
            return json.loads(answer.read())

    def nodes(self) -> list[dict]:
        """[{name, running}] for every node of the cluster."""
        return [{"name": n["name"], "running": bool(n.get("running"))} for n in self._get("/api/nodes")]

    def queue_leaders(self, vhost: str) -> dict[str, str | None]:
        """Queue name -> the node that leads it (a quorum queue's leader, a classic queue's home)."""
        return {
            q["name"]: q.get("leader") or q.get("node")
            for q in self._get(f"/api/queues/{quote(vhost, safe='')}?columns=name,leader,node")
        }
