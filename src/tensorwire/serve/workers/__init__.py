"""The worker processes of disaggregated serving (docs/PROTOCOL.md, section 11).

``prefill.py`` and ``decode.py`` serve one request per connection; ``backend.py`` is the
front end's client; ``python -m tensorwire.serve.workers ROLE`` runs one.
"""

from __future__ import annotations

from typing import Any

from ...errors import TensorwireError

__all__ = ["try_send"]


async def try_send(conn: Any, message: dict[str, Any]) -> None:
    """Send ``message`` if the peer is still there (an error report to a gone peer is moot)."""
    try:
        await conn.send_message(message)
    except (OSError, TensorwireError):
        pass
