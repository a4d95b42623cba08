"""Where bnlab's compiled batch norm trains faster than ATen: written by ``benchmarks/make_dispatch_table.py``.

``FASTER[(layout, dtype)]`` lists ``(low, high, min_channels)``: the compiled kernel serves an input of
that layout and dtype when its values per channel (N·spatial) are in ``[low, high)`` and it has at
least ``min_channels`` channels. An empty table means ATen everywhere: "auto" never guesses.
"""

FASTER: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {
    ('planes_3d', 'float32'): ((4096, 32769, 16),),
    ('planes_4d', 'float32'): ((4096, 4611686018427387904, 16),),
    ('planes_5d', 'float32'): ((4096, 4611686018427387904, 16),),
    ('rows', 'float64'): ((4096, 4097, 16),),
    ('planes_4d', 'float64'): ((4096, 4611686018427387904, 16),),
    ('planes_5d', 'float64'): ((32768, 4611686018427387904, 16),),
    ('channels_last', 'float64'): ((4096, 32769, 16),),
}

# measured by `.venv/bin/python benchmarks/make_dispatch_table.py --rounds 5` on 2026-12-03 12:36 UTC (the 2-core
# machine quiet; torch 2.13.0, 2 threads); ratio = ATen time / compiled time of one training step:
# float32  rows           (64, 16)                   0.68x
# float32  rows           (64, 128)                  0.81x
# float32  rows           (512, 16)                  0.80x
# float32  rows           (512, 128)                 0.89x
# float32  rows           (4096, 16)                 0.98x
# float32  rows           (4096, 128)                1.60x
# float32  rows           (32768, 16)                1.89x
# float32  rows           (32768, 128)               1.04x
# float32  rows           (262144, 16)               1.34x
# float32  rows           (262144, 128)              1.06x
# float32  planes_3d      (2, 16, 32)                0.77x
# float32  planes_3d      (2, 128, 32)               0.81x
# float32  planes_3d      (8, 16, 64)                0.76x
# float32  planes_3d      (8, 128, 64)               1.16x
# float32  planes_3d      (64, 16, 64)               1.19x
# float32  planes_3d      (64, 128, 64)              1.56x
# float32  planes_3d      (512, 16, 64)              1.46x
# float32  planes_3d      (512, 128, 64)             1.19x
# float32  planes_3d      (4096, 16, 64)             1.21x
# float32  planes_3d      (4096, 128, 64)            1.05x
# float32  planes_4d      (2, 16, 5, 6)              0.72x
# float32  planes_4d      (2, 128, 5, 6)             0.74x
# float32  planes_4d      (8, 16, 8, 8)              0.79x
# float32  planes_4d      (8, 128, 8, 8)             1.14x
# float32  planes_4d      (16, 16, 16, 16)           1.21x
# float32  planes_4d      (16, 128, 16, 16)          2.21x
# float32  planes_4d      (16, 16, 45, 45)           1.87x
# float32  planes_4d      (16, 128, 45, 45)          1.15x
# float32  planes_4d      (16, 16, 128, 128)         2.21x
# float32  planes_4d      (16, 128, 128, 128)        1.31x
# float32  planes_5d      (2, 16, 3, 3, 3)           0.74x
# float32  planes_5d      (2, 128, 3, 3, 3)          0.78x
# float32  planes_5d      (8, 16, 4, 4, 4)           0.78x
# float32  planes_5d      (8, 128, 4, 4, 4)          1.15x
# float32  planes_5d      (8, 16, 8, 8, 8)           1.29x
# float32  planes_5d      (8, 128, 8, 8, 8)          2.48x
# float32  planes_5d      (8, 16, 16, 16, 16)        2.16x
# float32  planes_5d      (8, 128, 16, 16, 16)       1.26x
# float32  planes_5d      (8, 16, 32, 32, 32)        2.67x
# float32  planes_5d      (8, 128, 32, 32, 32)       1.33x
# float32  channels_last  (2, 16, 5, 6)              0.73x
# float32  channels_last  (2, 128, 5, 6)             0.58x
# float32  channels_last  (8, 16, 8, 8)              1.01x
# float32  channels_last  (8, 128, 8, 8)             0.89x
# float32  channels_last  (16, 16, 16, 16)           0.97x
# float32  channels_last  (16, 128, 16, 16)          1.28x
# float32  channels_last  (16, 16, 45, 45)           1.33x
# float32  channels_last  (16, 128, 45, 45)          1.02x
# float32  channels_last  (16, 16, 128, 128)         1.00x
# float32  channels_last  (16, 128, 128, 128)        1.07x
# float64  rows           (64, 16)                   0.94x
# float64  rows           (64, 128)                  0.84x
# float64  rows           (512, 16)                  0.84x
# float64  rows           (512, 128)                 1.03x
# float64  rows           (4096, 16)                 1.17x
# float64  rows           (4096, 128)                1.69x
# float64  rows           (32768, 16)                1.31x
# float64  rows           (32768, 128)               0.98x
# float64  rows           (262144, 16)               1.12x
# float64  rows           (262144, 128)              1.03x
# float64  planes_3d      (2, 16, 32)                0.73x
# float64  planes_3d      (2, 128, 32)               0.87x
# float64  planes_3d      (8, 16, 64)                0.86x
# float64  planes_3d      (8, 128, 64)               1.11x
# float64  planes_3d      (64, 16, 64)               1.08x
# float64  planes_3d      (64, 128, 64)              1.25x
# float64  planes_3d      (512, 16, 64)              1.12x
# float64  planes_3d      (512, 128, 64)             1.03x
# float64  planes_3d      (4096, 16, 64)             1.11x
# float64  planes_3d      (4096, 128, 64)            1.07x
# float64  planes_4d      (2, 16, 5, 6)              0.70x
# float64  planes_4d      (2, 128, 5, 6)             0.80x
# float64  planes_4d      (8, 16, 8, 8)              0.80x
# float64  planes_4d      (8, 128, 8, 8)             1.17x
# float64  planes_4d      (16, 16, 16, 16)           1.14x
# float64  planes_4d      (16, 128, 16, 16)          1.70x
# float64  planes_4d      (16, 16, 45, 45)           1.56x
# float64  planes_4d      (16, 128, 45, 45)          1.98x
# float64  planes_4d      (16, 16, 128, 128)         1.24x
# float64  planes_4d      (16, 128, 128, 128)        1.19x
# float64  planes_5d      (2, 16, 3, 3, 3)           0.63x
# float64  planes_5d      (2, 128, 3, 3, 3)          0.85x
# float64  planes_5d      (8, 16, 4, 4, 4)           0.85x
# float64  planes_5d      (8, 128, 4, 4, 4)          1.13x
# float64  planes_5d      (8, 16, 8, 8, 8)           1.01x
# float64  planes_5d      (8, 128, 8, 8, 8)          1.51x
# float64  planes_5d      (8, 16, 16, 16, 16)        1.59x
# float64  planes_5d      (8, 128, 16, 16, 16)       1.21x
# float64  planes_5d      (8, 16, 32, 32, 32)        1.14x
# float64  planes_5d      (8, 128, 32, 32, 32)       1.11x
# float64  channels_last  (2, 16, 5, 6)              0.96x
# float64  channels_last  (2, 128, 5, 6)             0.83x
# float64  channels_last  (8, 16, 8, 8)              0.83x
# float64  channels_last  (8, 128, 8, 8)             1.04x
# float64  channels_last  (16, 16, 16, 16)           1.13x
# float64  channels_last  (16, 128, 16, 16)          1.12x
# float64  channels_last  (16, 16, 45, 45)           1.55x
# float64  channels_last  (16, 128, 45, 45)          1.42x
# float64  channels_last  (16, 16, 128, 128)         1.28x
# float64  channels_last  (16, 128, 128, 128)        0.96x
# bfloat16 rows           (64, 16)                   0.88x
# bfloat16 rows           (64, 128)                  0.88x
# bfloat16 rows           (512, 16)                  0.78x
# bfloat16 rows           (512, 128)                 0.62x
# bfloat16 rows           (4096, 16)                 0.61x
# bfloat16 rows           (4096, 128)                0.44x
# bfloat16 rows           (32768, 16)                0.49x
# bfloat16 rows           (32768, 128)               0.37x
# bfloat16 rows           (262144, 16)               0.43x
# bfloat16 rows           (262144, 128)              0.54x
# bfloat16 planes_3d      (2, 16, 32)                0.76x
# bfloat16 planes_3d      (2, 128, 32)               0.65x
# bfloat16 planes_3d      (8, 16, 64)                0.60x
# bfloat16 planes_3d      (8, 128, 64)               0.56x
# bfloat16 planes_3d      (64, 16, 64)               0.52x
# bfloat16 planes_3d      (64, 128, 64)              0.35x
# bfloat16 planes_3d      (512, 16, 64)              0.29x
# bfloat16 planes_3d      (512, 128, 64)             0.57x
# bfloat16 planes_3d      (4096, 16, 64)             0.47x
# bfloat16 planes_3d      (4096, 128, 64)            0.59x
# bfloat16 planes_4d      (2, 16, 5, 6)              0.81x
# bfloat16 planes_4d      (2, 128, 5, 6)             0.78x
# bfloat16 planes_4d      (8, 16, 8, 8)              0.71x
# bfloat16 planes_4d      (8, 128, 8, 8)             0.56x
# bfloat16 planes_4d      (16, 16, 16, 16)           0.54x
# bfloat16 planes_4d      (16, 128, 16, 16)          0.36x
# bfloat16 planes_4d      (16, 16, 45, 45)           0.39x
# bfloat16 planes_4d      (16, 128, 45, 45)          0.54x
# bfloat16 planes_4d      (16, 16, 128, 128)         0.35x
# bfloat16 planes_4d      (16, 128, 128, 128)        0.55x
# bfloat16 planes_5d      (2, 16, 3, 3, 3)           0.78x
# bfloat16 planes_5d      (2, 128, 3, 3, 3)          0.80x
# bfloat16 planes_5d      (8, 16, 4, 4, 4)           0.72x
# bfloat16 planes_5d      (8, 128, 4, 4, 4)          0.52x
# bfloat16 planes_5d      (8, 16, 8, 8, 8)           0.53x
# bfloat16 planes_5d      (8, 128, 8, 8, 8)          0.43x
# bfloat16 planes_5d      (8, 16, 16, 16, 16)        0.34x
# bfloat16 planes_5d      (8, 128, 16, 16, 16)       0.35x
# bfloat16 planes_5d      (8, 16, 32, 32, 32)        0.34x
# bfloat16 planes_5d      (8, 128, 32, 32, 32)       0.55x
# bfloat16 channels_last  (2, 16, 5, 6)              0.74x
# bfloat16 channels_last  (2, 128, 5, 6)             0.65x
# bfloat16 channels_last  (8, 16, 8, 8)              0.65x
# bfloat16 channels_last  (8, 128, 8, 8)             0.61x
# bfloat16 channels_last  (16, 16, 16, 16)           0.59x
# bfloat16 channels_last  (16, 128, 16, 16)          0.52x
# bfloat16 channels_last  (16, 16, 45, 45)           0.42x
# bfloat16 channels_last  (16, 128, 45, 45)          0.46x
# bfloat16 channels_last  (16, 16, 128, 128)         0.37x
# bfloat16 channels_last  (16, 128, 128, 128)        0.55x
