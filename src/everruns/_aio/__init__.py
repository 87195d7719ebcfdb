"""The one door to asyncio: asyncpg and grpclib on an asyncio loop in its own thread, bridged to
Trio.

Everything outside this package is Trio-only. Code here turns asyncio calls into Trio calls,
keeps cleanup shielded and bounded, and maps foreign exceptions onto ``everruns.errors`` at the
edge. It holds no engine logic.
"""

from everruns._aio.loop import open_aio_loop as open_aio_loop
