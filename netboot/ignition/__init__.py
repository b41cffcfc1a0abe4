"""Ignition: render configs from templates (render), validate them (validate), and
the per-node artefacts built from them (artifacts)."""
