"""The tiers a request can be served by: one type, the contract every module names them with.

Why a module of its own: the tier names travel everywhere (routing decisions, the manifest's
``targets``, the ``x-served-by`` header, metric dimensions, the compiler's placement), and as string
literals in dozens of places they drifted and could be misspelt silently. ``Tier`` is a ``StrEnum``,
so a member *is* its string: it compares equal to ``"gpu"``, hashes like it, and serialises to JSON
and headers unchanged; code that still holds plain strings keeps working. Pure Python and tiny: the
compiler and the edge import it too.
"""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    """Where a model runs: in a CPU Lambda function, on a GPU server (Triton), or on an edge device."""

    CPU = "cpu"
    GPU = "gpu"
    EDGE = "edge"


#: The cloud's tiers, the ones a manifest's ``targets`` may name for serving behind the router.
CLOUD_TIERS: tuple[Tier, ...] = (Tier.CPU, Tier.GPU)
