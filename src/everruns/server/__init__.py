"""The control plane: the only process that touches PostgreSQL.

`serve` runs it inside any Trio program (`await nursery.start(serve, config)`);
`python -m everruns.server` runs it as a process.
"""

from everruns.server.app import ServerInfo as ServerInfo
from everruns.server.app import serve as serve
from everruns.server.config import ServerConfig as ServerConfig
