"""bnlab.experiments: the lab's experiments, each a function from a request to a summary (lab layer)."""
