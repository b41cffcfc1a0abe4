"""Small helpers with one idea each, shared by every protocol: one LRU, one
path confinement, one rate-limited logger."""
