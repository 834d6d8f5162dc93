"""The seam between the gateway and model servers: one small interface, two clients.

aiohttp's client is the default for HTTP/1.1 upstreams (DESIGN 1 "Why two clients"); httpx
serves HTTP/2 upstreams (`http2: true`) and users who choose it (`upstream.client: httpx`).
Library exceptions become `gateway.errors.UpstreamError` subclasses inside each client.
"""

from gateway.upstream.base import Body, Origin, UpstreamClient, UpstreamResponse
from gateway.upstream.clients import UpstreamPool

__all__ = ["Body", "Origin", "UpstreamClient", "UpstreamPool", "UpstreamResponse"]
