"""The pure decision core: no I/O, no asyncio, no clock, no global random.

Callers pass `now` and a random source; everything here is a function of its arguments.
"""
