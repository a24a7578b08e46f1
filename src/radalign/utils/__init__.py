"""Small shared helpers (logging, progress) used across radalign."""
