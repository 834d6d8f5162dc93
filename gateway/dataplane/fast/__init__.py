"""The fast path: the only modules that reach into uvicorn's or aiohttp's internals."""
