"""Executor backends: the only code that opens model files."""
