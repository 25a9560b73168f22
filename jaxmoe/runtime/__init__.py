"""What every layer that runs programs shares, below the expert cache and the engines:
ahead-of-time program tables (programs), phase clocks (phases), byte counts (metrics) and
the shape buckets that keep programs few (buckets)."""
