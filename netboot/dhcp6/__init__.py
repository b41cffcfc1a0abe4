"""DHCPv6 for PXE and HTTP boot clients: :mod:`.packet` (the codec),
:mod:`.responder` (the policy, no sockets) and :mod:`.server` (the sockets)."""
