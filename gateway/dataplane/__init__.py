"""The request path: proxy, server, workers, deadlines, headers, body routing and event streams.
`upstream/` holds the client Protocol and the clients on public APIs; `fast/` holds the only
modules that touch uvicorn's or aiohttp's internals."""
