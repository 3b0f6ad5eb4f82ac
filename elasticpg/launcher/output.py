"""Worker output, line by line, each line prefixed with the worker's rank and restart count.

Pure: bytes in, bytes out. Lines are cut at b"\\n" only; a chunk may end mid-line, and that
part waits for the rest (or for the end of the stream), so two workers' lines never mix.
"""

from __future__ import annotations


def prefix_for(rank: int, restarts: int) -> bytes:
    """``[rank 3]`` for a slot's first worker, ``[rank 3 #2]`` for its second restart."""
    return (f"[rank {rank}] " if not restarts else f"[rank {rank} #{restarts}] ").encode()


class PrefixedLines:
    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        """The complete lines in what arrived so far, prefixed; keeps an unfinished tail."""
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if not cut:
            return b""
        return b"".join(self.prefix + line + b"\n" for line in data[:cut - 1].split(b"\n"))

    def close(self) -> bytes:
        """At the end of the stream: an unterminated last line, prefixed and terminated."""
        rest, self._partial = self._partial, b""
        return self.prefix + rest + b"\n" if rest else b""
