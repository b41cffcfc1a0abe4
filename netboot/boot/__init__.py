"""Booting a node: decide (booter), render (ipxe, pxelinux), record (lifecycle).

- :mod:`.booter` decides what a machine boots now and writes nothing;
- :mod:`.ipxe` and :mod:`.pxelinux` turn a decision into a script or config;
- :mod:`.sightings` remembers which MAC, UUID and address belong together;
- :mod:`.lifecycle` is the only code that moves a node between states.
"""
