"""Where a group's secret comes from, and the one thing the store learns of it.

By default the first rank of a group puts a random secret in the store and every rank reads it
there: whoever can read the store can then prove membership on the data plane. To keep the
secret out of the store, give every rank of the job the same secret in $ELASTICPG_SECRET or in
a file named by $ELASTICPG_SECRET_FILE. The store then holds only a marker with a fingerprint
(an HMAC of a fixed label under the secret), so that a rank with another secret, or with none,
fails at init with a clear error instead of failing every handshake later.
"""

from __future__ import annotations

import hashlib
import hmac
import os

MIN_LENGTH = 16  # bytes: anything shorter is a password, not a key
EXTERNAL = "external:"  # prefix of the store's marker when the secret is not in the store


def external_secret() -> bytes | None:
    """The secret from $ELASTICPG_SECRET or $ELASTICPG_SECRET_FILE; None when neither is set."""
    value = os.environ.get("ELASTICPG_SECRET", "")
    path = os.environ.get("ELASTICPG_SECRET_FILE", "")
    if value and path:
        raise ValueError("set ELASTICPG_SECRET or ELASTICPG_SECRET_FILE, not both")
    if path:
        try:
            with open(path, "rb") as f:
                value = f.read().strip().decode("utf-8", errors="strict")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"ELASTICPG_SECRET_FILE={path!r}: cannot read it: {exc}") from None
    if not value:
        if path:
            raise ValueError(f"ELASTICPG_SECRET_FILE={path!r} is empty")
        return None
    raw = value.strip().encode()
    if len(raw) < MIN_LENGTH:
        raise ValueError(f"the group secret must be at least {MIN_LENGTH} bytes (got "
                         f"{len(raw)}); use e.g. `openssl rand -hex 32`")
    return raw


def marker(secret: bytes) -> str:
    """What the store holds instead of an external secret."""
    fp = hmac.new(secret, b"elasticpg secret fingerprint", hashlib.sha256).hexdigest()[:32]
    return EXTERNAL + fp


def check_marker(stored: str, secret: bytes | None) -> None:
    """Raise ValueError when this process's secret source disagrees with the group's."""
    if secret is None:
        if stored.startswith(EXTERNAL):
            raise ValueError("this group's ranks use a secret from ELASTICPG_SECRET or "
                             "ELASTICPG_SECRET_FILE; this process has none (set the same one)")
        return
    if not stored.startswith(EXTERNAL):
        raise ValueError("this process has ELASTICPG_SECRET(_FILE) set, but the group's other "
                         "ranks use the secret kept in the store: give every rank the same "
                         "setting")
    if stored != marker(secret):
        raise ValueError("this process's ELASTICPG_SECRET(_FILE) differs from the secret the "
                         "group's other ranks use")
