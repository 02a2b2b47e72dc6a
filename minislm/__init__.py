"""minislm runtime (placeholder on the kernels branch; the core lands from another branch)."""
