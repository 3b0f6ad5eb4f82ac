"""Pure core: no sockets, no threads, no store. Everything here is driven by values and returns
values, so it is tested exhaustively in-process (see tests/core)."""
