"""Where bnlab's compiled batch norm trains faster than ATen: written by ``benchmarks/make_dispatch_table.py``.

``FASTER[(layout, dtype)]`` lists ``(low, high, min_channels)``: the compiled kernel serves an input of
that layout and dtype when its values per channel (N·spatial) are in ``[low, high)`` and it has at
least ``min_channels`` channels. An empty table means ATen everywhere: "auto" never guesses.
"""

FASTER: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {}
