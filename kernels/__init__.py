"""Fast paths for minislm (Numba), each beside a plain-NumPy reference."""
