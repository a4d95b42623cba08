"""The ``bnlab`` command: a small dispatcher (main.py) and one module per subcommand."""
