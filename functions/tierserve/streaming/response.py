"""The streamed answer a handler returns: a status, headers and an iterator of byte chunks.

Why its own module: the Lambda runtime loop (``tierserve.streaming.runtime_loop``) decides by this type
whether to post the answer buffered (a plain dict, as the managed runtime does) or streamed (the Runtime
API's streaming mode with the HTTP-integration prelude), and handlers must be able to build one without
importing the loop. ``close`` is called once, whether the stream ended, failed or was abandoned (deadline,
size limit), so a generation can free its slot and stop decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class StreamingResponse:
    """``status`` and ``headers`` become the HTTP-integration prelude; ``chunks`` are sent as produced.

    A ``set-cookie`` header (any case) goes to the prelude's ``cookies`` list, as API Gateway and function
    URLs expect; every other header is sent as given."""

    status: int
    headers: dict[str, str]
    chunks: Iterator[bytes]
    close: Callable[[], None] | None = None
    cookies: list[str] = field(default_factory=list)

    def prelude(self) -> dict[str, object]:
        """The JSON prelude of ``application/vnd.awslambda.http-integration-response``."""
        headers: dict[str, str] = {}
        cookies = list(self.cookies)
        for name, value in self.headers.items():
            if name.lower() == "set-cookie":
                cookies.append(value)
            else:
                headers[name] = value
        return {"statusCode": int(self.status), "headers": headers, "cookies": cookies}

    def release(self) -> None:
        """Close the chunks (a generator's ``finally`` runs) and call ``close``; safe to call twice."""
        chunks_close = getattr(self.chunks, "close", None)
        close, self.close = self.close, None
        try:
            if callable(chunks_close):
                chunks_close()
        finally:
            if close is not None:
                close()
