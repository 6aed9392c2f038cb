"""Triton kernels only: no model or module logic lives here."""
