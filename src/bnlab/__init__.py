"""bnlab: batch normalization, measured.

Layers (bottom to top; a layer never imports one above it):

* ``bnlab.functional``: the computational core (statistics, normalization, running averages).
* ``bnlab.nn``: drop-in ``torch.nn`` modules built on it.
* ``bnlab.reference``: a float64 NumPy oracle with every intermediate named.
* ``bnlab.cli``: the ``bnlab`` command.
"""

__version__ = "0.1.0"
