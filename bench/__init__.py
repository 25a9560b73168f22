"""Benchmark harness code that is not part of the jaxmoe library (peers, shapes)."""
