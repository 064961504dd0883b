"""The sidecar's HTTP endpoint for probes and Prometheus (aiohttp).

- ``GET /healthz``: 200 while the sidecar serves (liveness).
- ``GET /readyz``: 200 once the watch stream to central is up, else 503 with
  the reason (readiness: a pod whose sidecar can't hear revocations is not
  ready). Cached material still serves either way.
- ``GET /metrics``: counters and gauges in the Prometheus text format.

No key material, key names or tokens appear here: only counts.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

Sample = tuple[str, str, str, float]  # name, type, help, value


def render(samples: list[Sample]) -> str:
    lines = []
    for name, kind, help_text, value in samples:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, samples: Callable[[], list[Sample]],
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self._samples = samples
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self.address = (host, int(runner.addresses[0][1]))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reason = self._ready()
        return web.Response(text=reason + "\n", status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render(self._samples()),
                            content_type="text/plain", charset="utf-8")
