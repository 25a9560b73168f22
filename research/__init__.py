"""Research code that is not what the runtime does: offline variants kept for comparison."""
