"""The node registry: storage only. Nothing here knows HTTP, webhooks or
Prometheus; :mod:`netboot.boot.lifecycle` decides what changes, this package
keeps it."""
