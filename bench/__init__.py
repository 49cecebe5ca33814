"""``make bench``: our scheduler against the classic design and ``multiprocessing.Pool``.

Run ``python -m bench.run`` (``--quick`` for a fast check, ``--json`` for scripts).
"""

from __future__ import annotations

__all__: list[str] = []
