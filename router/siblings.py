"""Calls from one gateway worker to the others of its pod (``--workers N``, router/workers.py).

A client reaches whichever worker accepted its connection. The admin calls that must hold for the
whole gateway (drain an instance, the autoscaler's observations) are applied by that worker and
forwarded to its siblings over their private Unix sockets, marked so that a sibling does not forward
them again. Bounded: one short timeout per call, the siblings asked concurrently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import httpx

FORWARDED = "x-tandem-forwarded"  # set on a call a sibling forwarded: answer for yourself only


class Siblings:
    def __init__(self, sockets: list[Path], timeout_s: float = 2.0) -> None:
        self.clients = [httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)),
                                          base_url="http://worker", timeout=timeout_s) for path in sockets]

    def __len__(self) -> int:
        return len(self.clients)

    async def call(self, method: str, path: str, params: Mapping[str, str],
                   credentials: Mapping[str, str]) -> list[httpx.Response | Exception]:
        """Every sibling's answer (or why there is none), in sibling order; ``credentials``: the
        caller's own admin credentials headers, which each sibling checks again."""
        headers = {**credentials, FORWARDED: "1"}

        async def one(client: httpx.AsyncClient) -> httpx.Response | Exception:
            try:
                return await client.request(method, path, params=params, headers=headers)
            except httpx.HTTPError as exc:
                return exc

        return list(await asyncio.gather(*(one(c) for c in self.clients)))

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))
