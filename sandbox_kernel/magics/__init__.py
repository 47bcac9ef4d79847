"""In-kernel code injected read-only into sandbox kernels (Python 2.7 compatible)."""
