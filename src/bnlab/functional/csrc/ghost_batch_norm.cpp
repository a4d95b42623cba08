// Ghost batch norm (and batch renorm, its one-ghost case with a different affine) on the CPU in one
// call: G ghost batches, each normalized with its own statistics.
//
// ATen's batch norm, called once per ghost batch, pays its per-call cost G times forward and G
// times backward; on small inputs that cost is most of the time. These two kernels do the same
// arithmetic over all ghosts in one parallel region. Two memory layouts, both views of a
// contiguous buffer, chosen by the caller:
//   planes: [G][v][C][S]  (NCL, NCHW, NCDHW contiguous; S = spatial size)
//   rows:   [G][R][C]     ((N, C) inputs and channels_last; R = v * spatial size)
// Statistics: one pass over sums of x − K and (x − K)², K the mean of the channel's first values in
// the ghost (the first run of a plane, the first kRowRun rows), so the shifted moments do not cancel
// whatever the data's offset. The one-pass variance loses digits by a factor 1 + (μ − K)²/σ²: when
// that exceeds 1 + kRecentre (a first run unlike the rest), the squares are summed again around the
// mean. Short runs are summed in float and the runs in double.
// Planes-layout outputs of kStreamBytes or more are written with non-temporal stores (see kStreamBytes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRowRun = 32;        // rows layout: rows summed in float before a double add
constexpr int64_t kPlaneRun = 512;     // planes layout: values summed in float before a double add
constexpr int64_t kRowChannelBlock = 256;  // rows layout: channels per statistics task
constexpr double kRecentre = 4.0;  // (μ − K)² / σ² above which the variance is taken again around μ
// Outputs (y forward, dx backward) of at least this many bytes bypass the caches. A normal store
// first reads the line it overwrites (read for ownership): for y = f(x) that is a third of the
// memory traffic. Streaming pays off once the output would not stay in the last-level cache for
// the next layer anyway. Measured on the 2-core EPYC (32 MiB L3; benchmarks/RESULTS.md, issue 16):
// NCHW forward alone 1.4-1.5x faster at 24-32 MiB, and forward followed by a ReLU equal at
// 16 MiB, faster above, slower below (0.57 -> 0.83 ms at 8 MiB).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

// Types: T is the input's (float, double, or bfloat16/half), A the one statistics and parameters are
// kept and summed in (T itself for float and double, float for the half-precision types, as ATen
// does under autocast). Every value read is converted to A first.

// Half precision (bfloat16, float16) is read and written through float buffers of kPlaneRun values,
// converted 16 at a time: the compiler does not vectorize c10's scalar conversions, which left the
// half-precision kernels at 0.3-0.9x ATen's speed. Rounding to half is to nearest even, as c10's
// (except that the AVX-512 bfloat16 conversion flushes float32 subnormals, below 1.2e-38, to zero).
template <typename T>
constexpr bool kHalf = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

template <typename T>
inline void widen(const T* p, int64_t n, float* out) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = __builtin_bit_cast(float, static_cast<uint32_t>(bits[j]) << 16);
    return;
  }
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, c10::Half>)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(p[i]);
}

template <typename T>
inline void narrow(const float* in, int64_t n, T* out) {
  int64_t i = 0;
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
#endif
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, c10::Half>)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = static_cast<T>(in[i]);
}

// Σ(p − k) and Σ(p − k)² over a contiguous run (at most kPlaneRun values for half precision),
// vectorized; the caller accumulates runs in double.
template <typename A, typename T>
inline void run_shifted_moments(const T* p, int64_t n, A k, A& sum, A& sum_sq) {
  if constexpr (kHalf<T>) {
    float buf[kPlaneRun];
    widen(p, n, buf);
    run_shifted_moments<A>(buf, n, k, sum, sum_sq);
    return;
  }
  A s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < n; ++i) {
    const A d = static_cast<A>(p[i]) - k;
    s += d;
    q += d * d;
  }
  sum = s;
  sum_sq = q;
}

// y[i] = x[i]·a + b, and y[i] = u[i]·a + ((x[i] − m)·b + c): the output sweeps of the forward and backward.
// With stream set (float32 on an AVX-512 build), whole aligned 64-byte lines are written with
// non-temporal stores; the caller issues the fence (stream_fence) before the output is read.
template <typename T, typename A>
inline void affine_run(const T* x, T* y, int64_t n, A a, A b, bool stream) {
  if constexpr (kHalf<T>) {
    float buf[kPlaneRun];
    for (int64_t s0 = 0; s0 < n; s0 += kPlaneRun) {
      const int64_t len = std::min(kPlaneRun, n - s0);
      widen(x + s0, len, buf);
      affine_run<float, A>(buf, buf, len, a, b, false);
      narrow(buf, len, y + s0);
    }
    return;
  }
  int64_t i = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 63); ++i) y[i] = x[i] * a + b;
      const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
      for (; i + 16 <= n; i += 16) _mm512_stream_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), va, vb));
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) y[j] = static_cast<T>(static_cast<A>(x[j]) * a + b);
}

template <typename T, typename A>
inline void affine2_run(const T* u, const T* x, T* y, int64_t n, A m, A a, A b, A c, bool stream) {
  if constexpr (kHalf<T>) {
    float bu[kPlaneRun], bx[kPlaneRun];
    for (int64_t s0 = 0; s0 < n; s0 += kPlaneRun) {
      const int64_t len = std::min(kPlaneRun, n - s0);
      widen(u + s0, len, bu);
      widen(x + s0, len, bx);
      affine2_run<float, A>(bu, bx, bu, len, m, a, b, c, false);
      narrow(bu, len, y + s0);
    }
    return;
  }
  int64_t i = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 63); ++i) y[i] = u[i] * a + ((x[i] - m) * b + c);
      const __m512 vm = _mm512_set1_ps(m), va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vc = _mm512_set1_ps(c);
      for (; i + 16 <= n; i += 16) {
        const __m512 t = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vb, vc);
        _mm512_stream_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(u + i), va, t));
      }
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j)
    y[j] = static_cast<T>(static_cast<A>(u[j]) * a + ((static_cast<A>(x[j]) - m) * b + c));
}

// Σg and Σg·(x − m) over a contiguous run (at most kPlaneRun values for half precision).
template <typename A, typename T>
inline void run_grad_sums(const T* g, const T* x, int64_t n, A m, A& sum_g, A& sum_gx) {
  if constexpr (kHalf<T>) {
    float bg[kPlaneRun], bx[kPlaneRun];
    widen(g, n, bg);
    widen(x, n, bx);
    run_grad_sums<A>(bg, bx, n, m, sum_g, sum_gx);
    return;
  }
  A s_g = 0, s_gx = 0;
#pragma omp simd reduction(+ : s_g, s_gx)
  for (int64_t i = 0; i < n; ++i) {
    const A g_i = static_cast<A>(g[i]);
    s_g += g_i;
    s_gx += g_i * (static_cast<A>(x[i]) - m);
  }
  sum_g = s_g;
  sum_gx = s_gx;
}

// Orders the non-temporal stores before anything that follows (they are weakly ordered).
inline void stream_fence(bool stream) {
#ifdef __AVX512F__
  if (stream) _mm_sfence();
#endif
}

template <typename T>
inline bool streams(int64_t numel) {
  return std::is_same_v<T, float> && numel * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
}

// The per-(ghost, channel) affine that maps x to y, from the batch statistics.
//   GhostFold:  batch norm, scale = γ/σ_B, shift = β − μ_B·scale.
//   RenormFold: batch renorm (G = 1), with r and d from the running statistics as they were
//               before this call; scale = γr/σ_B, shift = γd + β − μ_B·scale.
template <typename T>
struct GhostFold {
  const T* w;
  const T* b;
  void operator()(int64_t /*q*/, int64_t c, T m, T inv, T& scale, T& shift) const {
    scale = inv * (w ? w[c] : T(1));
    shift = (b ? b[c] : T(0)) - m * scale;
  }
};

template <typename T>
struct RenormFold {
  const T* w;
  const T* b;
  const T* running_mean;
  const T* running_var;
  T eps, r_max, d_max;
  T* r;
  T* d;
  T* folded_weight;
  void operator()(int64_t q, int64_t c, T m, T inv, T& scale, T& shift) const {
    const T sigma = std::sqrt(running_var[c] + eps);
    const T rc = std::clamp(T(1) / (inv * sigma), T(1) / r_max, r_max);
    const T dc = std::clamp((m - running_mean[c]) / sigma, -d_max, d_max);
    const T gamma = w ? w[c] : T(1);
    r[q] = rc;
    d[q] = dc;
    folded_weight[q] = gamma * rc;
    scale = inv * folded_weight[q];
    shift = gamma * dc + (b ? b[c] : T(0)) - m * scale;
  }
};

template <typename T, typename A, typename Fold>
void forward_planes(const T* x, T* y, const Fold& fold, A* mean, A* var, A* invstd,
                    int64_t G, int64_t v, int64_t C, int64_t S, double eps) {
  const double n = static_cast<double>(v * S);
  const bool stream = streams<T>(G * v * C * S);
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / C, c = t % C;
      const T* base = x + (g * v * C + c) * S;
      auto moments_around = [&](A k, double& shifted_mean, double& var_b) {
        double acc = 0, acc_sq = 0;
        for (int64_t i = 0; i < v; ++i)
          for (int64_t s0 = 0; s0 < S; s0 += kPlaneRun) {
            A sum, sum_sq;
            run_shifted_moments<A>(base + i * C * S + s0, std::min(kPlaneRun, S - s0), k, sum, sum_sq);
            acc += sum;
            acc_sq += sum_sq;
          }
        shifted_mean = acc / n;
        var_b = acc_sq / n - shifted_mean * shifted_mean;
      };
      const int64_t first = std::min(kPlaneRun, S);
      A first_sum, unused;
      run_shifted_moments<A>(base, first, A(0), first_sum, unused);
      A k = first_sum / static_cast<A>(first);
      double shifted_mean, var_b;
      moments_around(k, shifted_mean, var_b);
      if (shifted_mean * shifted_mean > kRecentre * var_b) {  // K far from the mean: again around it
        k = static_cast<A>(static_cast<double>(k) + shifted_mean);
        moments_around(k, shifted_mean, var_b);
      }
      if (var_b < 0) var_b = 0;  // round-off only; unlike std::max this keeps a NaN a NaN
      const A m = static_cast<A>(static_cast<double>(k) + shifted_mean);
      const A inv = static_cast<A>(1.0 / std::sqrt(var_b + eps));
      mean[t] = m;
      var[t] = static_cast<A>(var_b);
      invstd[t] = inv;
      A scale, shift;
      fold(t, c, m, inv, scale, shift);
      T* out = y + (g * v * C + c) * S;
      for (int64_t i = 0; i < v; ++i) affine_run<T, A>(base + i * C * S, out + i * C * S, S, scale, shift, stream);
    }
    stream_fence(stream);
  });
}

// Rows layout: a ghost's rows are split into chunks of rows, and the channels into blocks of
// kRowChannelBlock; each (chunk, block) task sums into its own partials, in float over runs of
// kRowRun rows and in double across runs; the partials are then combined per ghost. Small batches
// (one chunk) still spread over threads by channel block.
struct RowChunks {
  int64_t per_ghost;  // chunks per ghost
  int64_t rows;       // rows per chunk (the last may be shorter)
};

// The split depends on the sizes only, never on the thread count, so that results are the same
// bit for bit however many threads run them.
inline RowChunks split_rows(int64_t R) {
  const int64_t per_ghost = std::max<int64_t>(1, std::min<int64_t>(16, R / 128));
  return {per_ghost, (R + per_ghost - 1) / per_ghost};
}

// For ghost g and channel c: sum_a[g*C + c] = Σ_rows a, sum_b[g*C + c] = Σ_rows b, where
// accumulate(g, row, c0, width, a, b) adds channels [c0, c0 + width) of one row into a[0..width), b[0..width).
template <typename T, typename Accumulate>
void rows_ghost_sums(int64_t G, int64_t R, int64_t C, std::vector<double>& sum_a, std::vector<double>& sum_b,
                     const Accumulate& accumulate) {
  const RowChunks chunks = split_rows(R);
  std::vector<double> part_a(G * chunks.per_ghost * C, 0.0), part_b(G * chunks.per_ghost * C, 0.0);
  const int64_t blocks = (C + kRowChannelBlock - 1) / kRowChannelBlock;
  at::parallel_for(0, G * chunks.per_ghost * blocks, 1, [&](int64_t begin, int64_t end) {
    T run_a[kRowChannelBlock], run_b[kRowChannelBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / blocks, c0 = (task % blocks) * kRowChannelBlock;
      const int64_t width = std::min(kRowChannelBlock, C - c0);
      const int64_t g = t / chunks.per_ghost, j = t % chunks.per_ghost;
      const int64_t r_begin = j * chunks.rows, r_end = std::min(R, r_begin + chunks.rows);
      double* acc_a = part_a.data() + t * C + c0;
      double* acc_b = part_b.data() + t * C + c0;
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowRun) {
        const int64_t r1 = std::min(r_end, r0 + kRowRun);
        std::fill(run_a, run_a + width, T(0));
        std::fill(run_b, run_b + width, T(0));
        for (int64_t r = r0; r < r1; ++r) accumulate(g, g * R + r, c0, width, run_a, run_b);
        for (int64_t c = 0; c < width; ++c) { acc_a[c] += run_a[c]; acc_b[c] += run_b[c]; }
      }
    }
  });
  // the chunks of a ghost, added in a fixed order
  sum_a.assign(G * C, 0.0);
  sum_b.assign(G * C, 0.0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < chunks.per_ghost; ++j)
      for (int64_t c = 0; c < C; ++c) {
        sum_a[g * C + c] += part_a[(g * chunks.per_ghost + j) * C + c];
        sum_b[g * C + c] += part_b[(g * chunks.per_ghost + j) * C + c];
      }
}

// y[row] = x[row] * scale[g] + shift[g] over every row of every ghost.
template <typename T, typename A>
void rows_affine(const T* x, T* y, const std::vector<A>& scale, const std::vector<A>& shift, int64_t G, int64_t R,
                 int64_t C) {
  at::parallel_for(0, G * R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / R;
      const T* xr = x + row * C;
      T* yr = y + row * C;
      const A* a = scale.data() + g * C;
      const A* b = shift.data() + g * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<T>(static_cast<A>(xr[c]) * a[c] + b[c]);
    }
  });
}

template <typename T, typename A, typename Fold>
void forward_rows(const T* x, T* y, const Fold& fold, A* mean, A* var, A* invstd,
                  int64_t G, int64_t R, int64_t C, double eps) {
  // One pass for the statistics, around K = the mean of each ghost's first kRowRun rows (see the top).
  const double n = static_cast<double>(R);
  const int64_t first = std::min(kRowRun, R);
  std::vector<A> k(G * C, A(0));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < first; ++r)
      for (int64_t c = 0; c < C; ++c) k[g * C + c] += static_cast<A>(x[(g * R + r) * C + c]);
  for (auto& value : k) value /= static_cast<A>(first);
  auto moments_around = [&](std::vector<double>& shifted_mean, std::vector<double>& var_b) {
    std::vector<double> s1, s2;
    rows_ghost_sums<A>(G, R, C, s1, s2, [&](int64_t g, int64_t row, int64_t c0, int64_t width, A* a, A* q) {
      const A* kg = k.data() + g * C + c0;
      const T* xr = x + row * C + c0;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) {
        const A d = static_cast<A>(xr[c]) - kg[c];
        a[c] += d;
        q[c] += d * d;
      }
    });
    shifted_mean.resize(G * C);
    var_b.resize(G * C);
    for (int64_t q = 0; q < G * C; ++q) {
      shifted_mean[q] = s1[q] / n;
      var_b[q] = s2[q] / n - shifted_mean[q] * shifted_mean[q];
    }
  };
  std::vector<double> shifted_mean, var_b;
  moments_around(shifted_mean, var_b);
  bool recentre = false;
  for (int64_t q = 0; q < G * C; ++q) recentre |= shifted_mean[q] * shifted_mean[q] > kRecentre * var_b[q];
  if (recentre) {  // some K far from its mean: every channel again, around the means just found
    for (int64_t q = 0; q < G * C; ++q) k[q] = static_cast<A>(static_cast<double>(k[q]) + shifted_mean[q]);
    moments_around(shifted_mean, var_b);
  }
  std::vector<A> scale(G * C), shift(G * C);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t q = g * C + c;
      double var_q = var_b[q];
      if (var_q < 0) var_q = 0;  // round-off only; unlike std::max this keeps a NaN a NaN
      const A m = static_cast<A>(static_cast<double>(k[q]) + shifted_mean[q]);
      const A inv = static_cast<A>(1.0 / std::sqrt(var_q + eps));
      mean[q] = m;
      var[q] = static_cast<A>(var_q);
      invstd[q] = inv;
      fold(q, c, m, inv, scale[q], shift[q]);
    }
  }
  rows_affine(x, y, scale, shift, G, R, C);
}

// dx = w·invstd·(dy − Σdy/n − (x−μ)·invstd²·Σdy(x−μ)/n); also Σdy and Σdy·x̂ per (ghost, channel).
template <typename T, typename A>
void backward_planes(const T* dy, const T* x, const A* w, const A* mean, const A* invstd, T* dx,
                     A* sum_dy, A* sum_dy_xhat, int64_t G, int64_t v, int64_t C, int64_t S) {
  const double n = static_cast<double>(v * S);
  const bool stream = dx && streams<T>(G * v * C * S);
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / C, c = t % C;
      const int64_t offset = (g * v * C + c) * S;
      const A m = mean[t], inv = invstd[t];
      double acc_dy = 0, acc_dot = 0;
      for (int64_t i = 0; i < v; ++i) {
        const T* xi = x + offset + i * C * S;
        const T* gi = dy + offset + i * C * S;
        for (int64_t s0 = 0; s0 < S; s0 += kPlaneRun) {
          A s_dy, s_dot;
          run_grad_sums<A>(gi + s0, xi + s0, std::min(kPlaneRun, S - s0), m, s_dy, s_dot);
          acc_dy += s_dy;
          acc_dot += s_dot;
        }
      }
      sum_dy[t] = static_cast<A>(acc_dy);
      sum_dy_xhat[t] = static_cast<A>(acc_dot * inv);
      if (!dx) continue;
      // dx = dy·k + (x − μ)·(−proj·k) − mean(dy)·k
      const A k = inv * (w ? w[c] : A(1));
      const A grad_mean = static_cast<A>(acc_dy / n);
      const A proj = static_cast<A>(acc_dot / n) * inv * inv;
      for (int64_t i = 0; i < v; ++i)
        affine2_run<T, A>(dy + offset + i * C * S, x + offset + i * C * S, dx + offset + i * C * S, S, m, k,
                          -proj * k, -grad_mean * k, stream);
    }
    stream_fence(stream);
  });
}

template <typename T, typename A>
void backward_rows(const T* dy, const T* x, const A* w, const A* mean, const A* invstd, T* dx,
                   A* sum_dy, A* sum_dy_xhat, int64_t G, int64_t R, int64_t C) {
  std::vector<double> s_dy, s_dot;
  rows_ghost_sums<A>(G, R, C, s_dy, s_dot, [&](int64_t g, int64_t row, int64_t c0, int64_t width, A* a, A* q) {
    const A* m = mean + g * C + c0;
    const T* xr = x + row * C + c0;
    const T* gr = dy + row * C + c0;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const A g_c = static_cast<A>(gr[c]);
      a[c] += g_c;
      q[c] += g_c * (static_cast<A>(xr[c]) - m[c]);
    }
  });
  // dx = dy·k + x·k_x + k_0 per (ghost, channel): one affine sweep over two inputs.
  const double n = static_cast<double>(R);
  std::vector<A> k(G * C), k_x(G * C), k_0(G * C);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t q = g * C + c;
      const double acc_dy = s_dy[q], acc_dot = s_dot[q];
      const A inv = invstd[q];
      sum_dy[q] = static_cast<A>(acc_dy);
      sum_dy_xhat[q] = static_cast<A>(acc_dot * inv);
      k[q] = inv * (w ? w[c] : A(1));
      const A proj = static_cast<A>(acc_dot / n) * inv * inv;
      k_x[q] = -proj * k[q];
      k_0[q] = (static_cast<A>(-acc_dy / n) + mean[q] * proj) * k[q];
    }
  }
  if (!dx) return;
  at::parallel_for(0, G * R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / R;
      const T* xr = x + row * C;
      const T* gr = dy + row * C;
      T* dr = dx + row * C;
      const A* a = k.data() + g * C;
      const A* bx = k_x.data() + g * C;
      const A* b0 = k_0.data() + g * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        dr[c] = static_cast<T>(static_cast<A>(gr[c]) * a[c] + static_cast<A>(xr[c]) * bx[c] + b0[c]);
    }
  });
}

inline bool is_reduced(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
}

// The dtype statistics and parameters are kept in for input x: its own, or float32 for half precision.
inline at::ScalarType stats_type(const at::Tensor& x) { return is_reduced(x) ? at::kFloat : x.scalar_type(); }

void check_params(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& p, int64_t C,
                  const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->scalar_type() == stats_type(x) && p->is_contiguous() && p->numel() == C,
              op, ": ", name, " must be a contiguous (C,) tensor of the input's dtype (float32 for a half-precision input)");
}

// x: contiguous buffer holding G ghosts; spatial = 0 selects the rows layout (R = rows per ghost).
// Running statistics, when given (same dtype), are updated as G sequential batch-norm updates
// (per_ghost) or one update with the ghosts' average mean and variance (averaged), storing the
// variance times `unbias`.
template <typename T>
void update_running(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean, const at::Tensor& var,
                    int64_t G, int64_t C, double momentum, bool averaged, double unbias) {
  T* rm = running_mean.data_ptr<T>();
  T* rv = running_var.data_ptr<T>();
  const T* bm = mean.data_ptr<T>();
  const T* bv = var.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    if (averaged) {
      double m = 0, v = 0;
      for (int64_t g = 0; g < G; ++g) { m += bm[g * C + c]; v += bv[g * C + c]; }
      rm[c] = static_cast<T>(momentum * (m / G) + (1 - momentum) * rm[c]);
      rv[c] = static_cast<T>(momentum * (v / G * unbias) + (1 - momentum) * rv[c]);
    } else {
      for (int64_t g = 0; g < G; ++g) {
        rm[c] = static_cast<T>(momentum * bm[g * C + c] + (1 - momentum) * rm[c]);
        rv[c] = static_cast<T>(momentum * (bv[g * C + c] * unbias) + (1 - momentum) * rv[c]);
      }
    }
  }
}

template <typename T, typename A, typename Fold>
void forward_any(const at::Tensor& x, at::Tensor& y, const Fold& fold, at::Tensor& mean, at::Tensor& var,
                 at::Tensor& invstd, int64_t ghosts, int64_t per_ghost, int64_t channels, int64_t spatial, double eps) {
  if (spatial > 0)
    forward_planes<T, A>(x.data_ptr<T>(), y.data_ptr<T>(), fold, mean.data_ptr<A>(), var.data_ptr<A>(),
                         invstd.data_ptr<A>(), ghosts, per_ghost, channels, spatial, eps);
  else
    forward_rows<T, A>(x.data_ptr<T>(), y.data_ptr<T>(), fold, mean.data_ptr<A>(), var.data_ptr<A>(),
                       invstd.data_ptr<A>(), ghosts, per_ghost, channels, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    int64_t ghosts, int64_t per_ghost, int64_t channels, int64_t spatial, double eps, double momentum,
    bool averaged, double unbias) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "ghost_forward: expects a contiguous CPU buffer");
  TORCH_CHECK(ghosts * per_ghost * channels * std::max<int64_t>(spatial, 1) == x.numel(),
              "ghost_forward: layout does not match the buffer size");
  check_params("ghost_forward", x, weight, channels, "weight");
  check_params("ghost_forward", x, bias, channels, "bias");
  check_params("ghost_forward", x, running_mean, channels, "running_mean");
  check_params("ghost_forward", x, running_var, channels, "running_var");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "ghost_forward: give both running buffers or none");
  auto y = at::empty_like(x);
  const auto stats = x.options().dtype(stats_type(x));
  auto mean = at::empty({ghosts, channels}, stats);
  auto var = at::empty({ghosts, channels}, stats);
  auto invstd = at::empty({ghosts, channels}, stats);
  const bool tracked = running_mean.has_value() && running_mean->defined();
  if (is_reduced(x)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "ghost_forward", [&] {
      const GhostFold<float> fold{opt_ptr<float>(weight), opt_ptr<float>(bias)};
      forward_any<scalar_t, float>(x, y, fold, mean, var, invstd, ghosts, per_ghost, channels, spatial, eps);
      if (tracked) {
        at::Tensor rm = *running_mean, rv = *running_var;
        update_running<float>(rm, rv, mean, var, ghosts, channels, momentum, averaged, unbias);
      }
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_forward", [&] {
      const GhostFold<scalar_t> fold{opt_ptr<scalar_t>(weight), opt_ptr<scalar_t>(bias)};
      forward_any<scalar_t, scalar_t>(x, y, fold, mean, var, invstd, ghosts, per_ghost, channels, spatial, eps);
      if (tracked) {
        at::Tensor rm = *running_mean, rv = *running_var;
        update_running<scalar_t>(rm, rv, mean, var, ghosts, channels, momentum, averaged, unbias);
      }
    });
  }
  return {y, mean, var, invstd};
}

// Batch renorm's training forward (one ghost): statistics, r and d from the running statistics
// as they were, the folded affine, the output and the running update, in one call. Returns
// (y, mean, invstd, r, d, folded_weight); the backward is ghost_backward with folded_weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> renorm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_var, int64_t per_ghost, int64_t channels, int64_t spatial,
    double eps, double momentum, double unbias, double r_max, double d_max) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "renorm_forward: expects a contiguous CPU buffer");
  TORCH_CHECK(per_ghost * channels * std::max<int64_t>(spatial, 1) == x.numel(),
              "renorm_forward: layout does not match the buffer size");
  check_params("renorm_forward", x, weight, channels, "weight");
  check_params("renorm_forward", x, bias, channels, "bias");
  check_params("renorm_forward", x, running_mean, channels, "running_mean");
  check_params("renorm_forward", x, running_var, channels, "running_var");
  auto y = at::empty_like(x);
  auto mean = at::empty({1, channels}, x.options());
  auto var = at::empty({1, channels}, x.options());
  auto invstd = at::empty({1, channels}, x.options());
  auto r = at::empty({channels}, x.options());
  auto d = at::empty({channels}, x.options());
  auto folded_weight = at::empty({channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "renorm_forward", [&] {
    using T = scalar_t;
    const RenormFold<T> fold{opt_ptr<T>(weight), opt_ptr<T>(bias), running_mean.data_ptr<T>(),
                             running_var.data_ptr<T>(), T(eps), T(r_max), T(d_max), r.data_ptr<T>(),
                             d.data_ptr<T>(), folded_weight.data_ptr<T>()};
    forward_any<T, T>(x, y, fold, mean, var, invstd, 1, per_ghost, channels, spatial, eps);
    update_running<T>(running_mean, running_var, mean, var, 1, channels, momentum, false, unbias);
  });
  return {y, mean.view({channels}), invstd.view({channels}), r, d, folded_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, int64_t ghosts, int64_t per_ghost, int64_t channels,
    int64_t spatial, bool need_input_grad) {
  TORCH_CHECK(grad_out.is_contiguous() && x.is_contiguous() && grad_out.sizes() == x.sizes() &&
                  grad_out.scalar_type() == x.scalar_type(),
              "ghost_backward: grad_out must match the saved input's layout and dtype");
  check_params("ghost_backward", x, weight, channels, "weight");
  auto dx = need_input_grad ? at::empty_like(x) : at::Tensor();
  const auto stats = x.options().dtype(stats_type(x));
  TORCH_CHECK(mean.scalar_type() == stats_type(x) && invstd.scalar_type() == stats_type(x),
              "ghost_backward: mean and invstd must be in the statistics dtype");
  auto sum_dy = at::empty({ghosts, channels}, stats);
  auto sum_dy_xhat = at::empty({ghosts, channels}, stats);
  auto run = [&](auto typed_x, auto typed_stats) {
    using T = decltype(typed_x);
    using A = decltype(typed_stats);
    const A* w = opt_ptr<A>(weight);
    T* dxp = need_input_grad ? dx.data_ptr<T>() : nullptr;
    if (spatial > 0)
      backward_planes<T, A>(grad_out.data_ptr<T>(), x.data_ptr<T>(), w, mean.data_ptr<A>(), invstd.data_ptr<A>(), dxp,
                            sum_dy.data_ptr<A>(), sum_dy_xhat.data_ptr<A>(), ghosts, per_ghost, channels, spatial);
    else
      backward_rows<T, A>(grad_out.data_ptr<T>(), x.data_ptr<T>(), w, mean.data_ptr<A>(), invstd.data_ptr<A>(), dxp,
                          sum_dy.data_ptr<A>(), sum_dy_xhat.data_ptr<A>(), ghosts, per_ghost, channels);
  };
  if (is_reduced(x)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "ghost_backward", [&] { run(scalar_t(0), float(0)); });
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_backward", [&] { run(scalar_t(0), scalar_t(0)); });
  }
  if (ghosts == 1) return {dx, sum_dy.view({channels}), sum_dy_xhat.view({channels})};
  return {dx, sum_dy.sum(0), sum_dy_xhat.sum(0)};  // dγ and dβ add up over the ghosts
}

// -- Plain batch norm in training mode: the kernels above with one ghost ------------------------------
//
// Any input layout maps to one of the two buffer layouts without a copy when it can:
//   (N, C) and spatial size 1   -> rows  [N][C]
//   contiguous (N, C, *)        -> planes [N][C][S]
//   channels-last 4-D / 5-D     -> rows  [N·H·W(·D)][C] (the permuted view is already contiguous)
//   anything else               -> a contiguous copy, planes
struct Buffer {
  at::Tensor data;        // the contiguous buffer the kernels read
  int64_t per_ghost;      // rows (rows layout) or samples (planes layout)
  int64_t channels;
  int64_t spatial;        // 0: rows layout
  std::vector<int64_t> permutation;  // buffer dims -> input dims (empty: a plain view)
};

inline bool is_channels_last(const at::Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

Buffer buffer_of(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t spatial = c > 0 && n > 0 ? x.numel() / (n * c) : 0;
  if (!x.is_contiguous() && is_channels_last(x)) {
    std::vector<int64_t> perm = {0};
    for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
    perm.push_back(1);
    return {x.permute(perm), n * spatial, c, 0, perm};
  }
  at::Tensor data = x.contiguous();
  if (x.dim() == 2 || spatial == 1) return {data, n, c, 0, {}};
  return {data, n, c, spatial, {}};
}

// A buffer-shaped result back in the input's shape and memory layout.
at::Tensor as_input(const at::Tensor& result, const at::Tensor& x, const Buffer& b) {
  if (b.permutation.empty()) return result.view(x.sizes());
  std::vector<int64_t> inverse(b.permutation.size());
  for (size_t i = 0; i < b.permutation.size(); ++i) inverse[b.permutation[i]] = static_cast<int64_t>(i);
  return result.permute(inverse);
}

// (y, mean, invstd); the running statistics, when given, get one batch-norm update storing var · unbias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps,
    double momentum, double unbias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "bn_train_forward: expects an (N, C, *) CPU tensor");
  const Buffer b = buffer_of(x);
  TORCH_CHECK(b.data.is_contiguous(), "bn_train_forward: internal layout error");
  auto [y, mean, var, invstd] = ghost_forward(b.data, weight, bias, running_mean, running_var, 1, b.per_ghost,
                                              b.channels, b.spatial, eps, momentum, false, unbias);
  return {as_input(y, x, b), mean.view({b.channels}), invstd.view({b.channels})};
}

// (dx, or None when not needed; dβ = Σdy; dγ = Σdy·x̂), for the forward above.
std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> bn_train_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool need_input_grad) {
  const Buffer b = buffer_of(x);
  at::Tensor dy;
  if (b.permutation.empty())
    dy = grad_out.contiguous();
  else
    dy = grad_out.contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
             .permute(b.permutation);
  auto [dx, sum_dy, sum_dy_xhat] = ghost_backward(dy, b.data, weight, mean.view({1, b.channels}),
                                                  invstd.view({1, b.channels}), 1, b.per_ghost, b.channels,
                                                  b.spatial, need_input_grad);
  if (!need_input_grad) return {c10::nullopt, sum_dy, sum_dy_xhat};
  return {as_input(dx, x, b), sum_dy, sum_dy_xhat};
}

// Shapes only, for torch.compile's fake tensors: the same outputs with no arithmetic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_forward_meta(
    const at::Tensor& x, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, double, double) {
  const auto format = is_channels_last(x) && !x.is_contiguous() ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
  const auto stats = x.options().dtype(stats_type(x));
  return {at::empty(x.sizes(), x.options().memory_format(format)), at::empty({x.size(1)}, stats),
          at::empty({x.size(1)}, stats)};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, at::Tensor> bn_train_backward_meta(
    const at::Tensor&, const at::Tensor& x, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    bool need_input_grad) {
  const auto format = is_channels_last(x) && !x.is_contiguous() ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
  c10::optional<at::Tensor> dx;
  if (need_input_grad) dx = at::empty(x.sizes(), x.options().memory_format(format));
  const auto stats = x.options().dtype(stats_type(x));
  return {dx, at::empty({x.size(1)}, stats), at::empty({x.size(1)}, stats)};
}

// The autograd formula in C++: no Python between the user's call and the kernels, either way.
class BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double eps, double momentum,
                            double unbias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnlab::bn_train_forward", "")
                         .typed<decltype(bn_train_forward)>();
    auto [y, mean, invstd] = op.call(x, weight, bias, running_mean, running_var, eps, momentum, unbias);
    const bool has_weight = weight.has_value() && weight->defined();
    ctx->save_for_backward({x, has_weight ? *weight : at::Tensor(), mean, invstd});
    ctx->saved_data["has_weight"] = has_weight;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnlab::bn_train_backward", "")
                         .typed<decltype(bn_train_backward)>();
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bnlab's compiled batch norm has no double backward (create_graph=True, gradient penalties, MAML): "
                "use bnlab.functional.set_backend('aten') for such training");
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const c10::optional<at::Tensor> weight = has_weight ? c10::optional<at::Tensor>(saved[1]) : c10::nullopt;
    auto [dx, sum_dy, sum_dy_xhat] = op.call(grads[0], saved[0], weight, saved[2], saved[3],
                                             ctx->needs_input_grad(0));
    return {dx.has_value() ? *dx : at::Tensor(), has_weight ? sum_dy_xhat : at::Tensor(),
            has_bias ? sum_dy : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor batch_norm_train_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var, double eps, double momentum,
                                     double unbias) {
  return BatchNormTrain::apply(x, weight, bias, running_mean, running_var, eps, momentum, unbias);
}

// Below autograd (inference mode, or no autograd at all): the forward alone.
at::Tensor batch_norm_train_plain(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var, double eps, double momentum,
                                  double unbias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_train_forward", "")
                       .typed<decltype(bn_train_forward)>();
  return std::get<0>(op.call(x, weight, bias, running_mean, running_var, eps, momentum, unbias));
}

}  // namespace

TORCH_LIBRARY(bnlab, m) {
  m.def("ghost_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "int ghosts, int per_ghost, int channels, int spatial, float eps, float momentum, bool averaged, "
        "float unbias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("renorm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "int per_ghost, int channels, int spatial, float eps, float momentum, float unbias, float r_max, "
        "float d_max) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ghost_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, int ghosts, "
        "int per_ghost, int channels, int spatial, bool need_input_grad) -> (Tensor, Tensor, Tensor)");
  m.def("bn_train_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float eps, float momentum, float unbias) -> (Tensor, Tensor, Tensor)");
  m.def("bn_train_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
        "bool need_input_grad) -> (Tensor?, Tensor, Tensor)");
  m.def("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float eps, float momentum, float unbias) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("ghost_forward", &ghost_forward);
  m.impl("renorm_forward", &renorm_forward);
  m.impl("ghost_backward", &ghost_backward);
  m.impl("bn_train_forward", &bn_train_forward);
  m.impl("bn_train_backward", &bn_train_backward);
  m.impl("batch_norm_train", &batch_norm_train_plain);
}

TORCH_LIBRARY_IMPL(bnlab, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
}

TORCH_LIBRARY_IMPL(bnlab, Meta, m) {
  m.impl("bn_train_forward", &bn_train_forward_meta);
  m.impl("bn_train_backward", &bn_train_backward_meta);
}
