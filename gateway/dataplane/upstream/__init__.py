"""The seam between the gateway and model servers: one small interface, four clients.

For HTTP/1.1 upstreams, `upstream.client` chooses: `httptools` (the default: HTTP/1.1 on
asyncio with httptools' parser, public APIs only), `aiohttp-direct` (aiohttp driven below its
`ClientSession`, in gateway/dataplane/fast/, loaded through `choice.py`, with `httptools` as
its fallback), `aiohttp` (the stock client on `ClientSession`) or `httpx`. httpx always
serves HTTP/2 upstreams (`http2: true`). Every client keeps the promises of `base.py`:
library exceptions become `gateway.errors.UpstreamError` subclasses inside the client, no
header is invented, bodies are relayed undecoded.
"""

from gateway.dataplane.upstream.base import Body, Origin, UpstreamClient, UpstreamResponse
from gateway.dataplane.upstream.clients import UpstreamPool

__all__ = ["Body", "Origin", "UpstreamClient", "UpstreamPool", "UpstreamResponse"]
