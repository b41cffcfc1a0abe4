"""Who is calling: bearer tokens with roles, and the node's own token.

Roles are ordered: ``viewer`` reads, ``operator`` also powers, deploys and re-arms,
``admin`` may do everything (tokens, BMC credentials, forgetting nodes). Tokens come
from netboot.yaml (``api.admin_token``, ``api.tokens``) and are kept only as
SHA-256 digests, so a lookup costs one hash whatever the token, and no token is
held in clear after start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")


@dataclass(frozen=True, slots=True)
class Caller:
    name: str  # the token's name, "node:<uuid>", or "anonymous"
    role: str  # a Role, "node" or "none"

    def may(self, needed: Role) -> bool:
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(needed)  # type: ignore[arg-type]


ANONYMOUS = Caller("anonymous", "none")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Bearer token -> Caller. ``open_reads``: anyone may read without a token."""

    def __init__(self, tokens: dict[str, tuple[str, Role]] | None = None, *,
                 open_reads: bool = True):
        #: sha256(token) -> (name, role)
        self._by_digest = {_digest(t): who for t, who in (tokens or {}).items() if t}
        self.open_reads = open_reads

    def __repr__(self) -> str:  # names and roles only
        return f"TokenTable({sorted(n for n, _ in self._by_digest.values())})"

    @property
    def empty(self) -> bool:
        return not self._by_digest

    def caller(self, authorization: str) -> Caller | None:
        """The caller an ``Authorization: Bearer ...`` header names; None if unknown."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        who = self._by_digest.get(_digest(given.strip()))
        return Caller(*who) if who else None
