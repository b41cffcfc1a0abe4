"""Secrets at rest (BMC passwords): sealed with a key derived from the server secret.

AES-256-GCM from ``cryptography`` (the well-kept library every Python project
uses for this, rather than a home-made construction), with the key derived by
HKDF-SHA256 from the server secret and a fixed purpose label, so the HMAC key
for node tokens and this key never coincide. A sealed value is
``b"nb1" + nonce(12) + ciphertext+tag``; ``purpose`` is bound as associated
data, so a password sealed for one node cannot be replayed as another's.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_MAGIC = b"nb1"


class SecretError(ValueError):
    """A sealed value that does not open with this server's secret."""


class SecretBox:
    def __init__(self, server_secret: bytes, label: bytes = b"netboot bmc credentials"):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(
            server_secret)
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key>)"

    def seal(self, plaintext: str, purpose: str) -> bytes:
        nonce = os.urandom(12)
        return _MAGIC + nonce + self._aead.encrypt(nonce, plaintext.encode(), purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> str:
        if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + 12 + 16:
            raise SecretError("not a sealed netboot secret")
        nonce = sealed[len(_MAGIC):len(_MAGIC) + 12]
        try:
            return self._aead.decrypt(nonce, sealed[len(_MAGIC) + 12:],
                                      purpose.encode()).decode()
        except InvalidTag:
            raise SecretError("sealed with another server secret (or damaged); set the "
                              "BMC credentials again") from None
