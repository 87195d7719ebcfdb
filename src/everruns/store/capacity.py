"""How many connections the PostgreSQL server takes, and how many it holds now.

Read once at the control plane's start, before its pool opens, so that a pool the server can
never hold is refused in one line instead of failing connection by connection later. Only reads;
what the numbers mean for a pool is the caller's to decide.
"""

from __future__ import annotations

import attrs

from everruns._aio.pg import Connection

__all__ = ["ConnectionRoom", "read_connection_room"]


@attrs.frozen
class ConnectionRoom:
    """The server's connection slots, as a client that is not a superuser may count them.

    Attributes:
        max_connections: the server's ``max_connections``.
        reserved: slots kept for superusers (``superuser_reserved_connections``) and, from
            PostgreSQL 16, for roles granted ``pg_use_reserved_connections``
            (``reserved_connections``).
        open_now: client connections open now, the reader's own included.
    """

    max_connections: int
    reserved: int
    open_now: int

    @property
    def allowed(self) -> int:
        """Connections an ordinary role may hold in all."""
        return max(0, self.max_connections - self.reserved)


# reserved_connections exists from PostgreSQL 16 on: missing_ok reads NULL before. Background
# processes (autovacuum, WAL writer, parallel workers) have slots of their own: only client
# backends take from max_connections.
_READ_ROOM = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int
         + coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int
         AS open_now"""


async def read_connection_room(conn: Connection) -> ConnectionRoom:
    """Return the server's connection limits and how many client connections are open now.

    Raises:
        DatabaseError: the settings could not be read.
    """
    row = await conn.fetchrow(_READ_ROOM)
    assert row is not None  # a SELECT without FROM returns one row
    return ConnectionRoom(row["max_connections"], row["reserved"], row["open_now"])
