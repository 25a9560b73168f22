"""Peer systems the benchmark compares jaxmoe against; each module imports its own stack."""
