"""The training engine: one protocol for every model family, one loop that runs it."""
