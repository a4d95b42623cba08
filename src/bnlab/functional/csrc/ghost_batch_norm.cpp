// Ghost batch norm on the CPU in one call: G ghost batches, each normalized with its own statistics.
//
// ATen's batch norm, called once per ghost batch, pays its per-call cost G times forward and G
// times backward; on small inputs that cost is most of the time. These two kernels do the same
// arithmetic over all ghosts in one parallel region. Two memory layouts, both views of a
// contiguous buffer, chosen by the caller:
//   planes: [G][v][C][S]  (NCL, NCHW, NCDHW contiguous; S = spatial size)
//   rows:   [G][R][C]     ((N, C) inputs and channels_last; R = v * spatial size)
// Statistics are two-pass (mean, then centered squares) with double accumulators across rows or
// planes, so the result does not depend on the data's offset.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 64;  // rows layout: channels per task, a few cache lines wide

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

// Sum of a contiguous run, vectorized; the caller accumulates runs in double.
template <typename T>
inline T run_sum(const T* p, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

template <typename T>
inline T run_centered_squares(const T* p, int64_t n, T mean) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    T d = p[i] - mean;
    s += d * d;
  }
  return s;
}

template <typename T>
void forward_planes(const T* x, T* y, const T* w, const T* b, T* mean, T* var, T* invstd,
                    int64_t G, int64_t v, int64_t C, int64_t S, double eps) {
  const double n = static_cast<double>(v * S);
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / C, c = t % C;
      const T* base = x + (g * v * C + c) * S;
      double acc = 0;
      for (int64_t i = 0; i < v; ++i) acc += run_sum(base + i * C * S, S);
      const T m = static_cast<T>(acc / n);
      acc = 0;
      for (int64_t i = 0; i < v; ++i) acc += run_centered_squares(base + i * C * S, S, m);
      const double var_b = acc / n;
      const T inv = static_cast<T>(1.0 / std::sqrt(var_b + eps));
      mean[t] = m;
      var[t] = static_cast<T>(var_b);
      invstd[t] = inv;
      const T scale = inv * (w ? w[c] : T(1));
      const T shift = (b ? b[c] : T(0)) - m * scale;
      T* out = y + (g * v * C + c) * S;
      for (int64_t i = 0; i < v; ++i) {
        const T* xi = base + i * C * S;
        T* yi = out + i * C * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) yi[s] = xi[s] * scale + shift;
      }
    }
  });
}

template <typename T>
void forward_rows(const T* x, T* y, const T* w, const T* b, T* mean, T* var, T* invstd,
                  int64_t G, int64_t R, int64_t C, double eps) {
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const double n = static_cast<double>(R);
  at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
    double acc[kChannelBlock];
    T m[kChannelBlock], scale[kChannelBlock], shift[kChannelBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, c0 = (t % blocks) * kChannelBlock;
      const int64_t width = std::min(kChannelBlock, C - c0);
      const T* base = x + g * R * C + c0;
      for (int64_t c = 0; c < width; ++c) acc[c] = 0;
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = base + r * C;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) acc[c] += xr[c];
      }
      for (int64_t c = 0; c < width; ++c) { m[c] = static_cast<T>(acc[c] / n); acc[c] = 0; }
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = base + r * C;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) { const double d = xr[c] - m[c]; acc[c] += d * d; }
      }
      for (int64_t c = 0; c < width; ++c) {
        const double var_b = acc[c] / n;
        const T inv = static_cast<T>(1.0 / std::sqrt(var_b + eps));
        const int64_t k = g * C + c0 + c;
        mean[k] = m[c];
        var[k] = static_cast<T>(var_b);
        invstd[k] = inv;
        scale[c] = inv * (w ? w[c0 + c] : T(1));
        shift[c] = (b ? b[c0 + c] : T(0)) - m[c] * scale[c];
      }
      T* out = y + g * R * C + c0;
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = base + r * C;
        T* yr = out + r * C;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) yr[c] = xr[c] * scale[c] + shift[c];
      }
    }
  });
}

// dx = w·invstd·(dy − Σdy/n − (x−μ)·invstd²·Σdy(x−μ)/n); also returns Σdy and Σdy·x̂ per (ghost, channel).
template <typename T>
void backward_planes(const T* dy, const T* x, const T* w, const T* mean, const T* invstd, T* dx,
                     T* sum_dy, T* sum_dy_xhat, int64_t G, int64_t v, int64_t C, int64_t S) {
  const double n = static_cast<double>(v * S);
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / C, c = t % C;
      const int64_t offset = (g * v * C + c) * S;
      const T m = mean[t], inv = invstd[t];
      double acc_dy = 0, acc_dot = 0;
      for (int64_t i = 0; i < v; ++i) {
        const T* xi = x + offset + i * C * S;
        const T* gi = dy + offset + i * C * S;
        T s_dy = 0, s_dot = 0;
#pragma omp simd reduction(+ : s_dy, s_dot)
        for (int64_t s = 0; s < S; ++s) { s_dy += gi[s]; s_dot += gi[s] * (xi[s] - m); }
        acc_dy += s_dy;
        acc_dot += s_dot;
      }
      sum_dy[t] = static_cast<T>(acc_dy);
      sum_dy_xhat[t] = static_cast<T>(acc_dot * inv);
      if (!dx) continue;
      const T k = inv * (w ? w[c] : T(1));
      const T grad_mean = static_cast<T>(acc_dy / n);
      const T proj = static_cast<T>(acc_dot / n) * inv * inv;
      for (int64_t i = 0; i < v; ++i) {
        const T* xi = x + offset + i * C * S;
        const T* gi = dy + offset + i * C * S;
        T* di = dx + offset + i * C * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) di[s] = (gi[s] - grad_mean - (xi[s] - m) * proj) * k;
      }
    }
  });
}

template <typename T>
void backward_rows(const T* dy, const T* x, const T* w, const T* mean, const T* invstd, T* dx,
                   T* sum_dy, T* sum_dy_xhat, int64_t G, int64_t R, int64_t C) {
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const double n = static_cast<double>(R);
  at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
    double acc_dy[kChannelBlock], acc_dot[kChannelBlock];
    T m[kChannelBlock], k[kChannelBlock], grad_mean[kChannelBlock], proj[kChannelBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, c0 = (t % blocks) * kChannelBlock;
      const int64_t width = std::min(kChannelBlock, C - c0);
      const int64_t offset = g * R * C + c0;
      for (int64_t c = 0; c < width; ++c) { acc_dy[c] = 0; acc_dot[c] = 0; m[c] = mean[g * C + c0 + c]; }
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + offset + r * C;
        const T* gr = dy + offset + r * C;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) { acc_dy[c] += gr[c]; acc_dot[c] += gr[c] * (xr[c] - m[c]); }
      }
      for (int64_t c = 0; c < width; ++c) {
        const int64_t q = g * C + c0 + c;
        const T inv = invstd[q];
        sum_dy[q] = static_cast<T>(acc_dy[c]);
        sum_dy_xhat[q] = static_cast<T>(acc_dot[c] * inv);
        k[c] = inv * (w ? w[c0 + c] : T(1));
        grad_mean[c] = static_cast<T>(acc_dy[c] / n);
        proj[c] = static_cast<T>(acc_dot[c] / n) * inv * inv;
      }
      if (!dx) continue;
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + offset + r * C;
        const T* gr = dy + offset + r * C;
        T* dr = dx + offset + r * C;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) dr[c] = (gr[c] - grad_mean[c] - (xr[c] - m[c]) * proj[c]) * k[c];
      }
    }
  });
}

void check_params(const at::Tensor& x, const c10::optional<at::Tensor>& p, int64_t C, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->scalar_type() == x.scalar_type() && p->is_contiguous() && p->numel() == C,
              "ghost_batch_norm: ", name, " must be a contiguous (C,) tensor of the input's dtype");
}

// x: contiguous buffer holding G ghosts; spatial = 0 selects the rows layout (R = rows per ghost).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t ghosts, int64_t per_ghost, int64_t channels, int64_t spatial, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "ghost_batch_norm: expects a contiguous CPU buffer");
  TORCH_CHECK(ghosts * per_ghost * channels * std::max<int64_t>(spatial, 1) == x.numel(),
              "ghost_batch_norm: layout does not match the buffer size");
  check_params(x, weight, channels, "weight");
  check_params(x, bias, channels, "bias");
  auto y = at::empty_like(x);
  auto mean = at::empty({ghosts, channels}, x.options());
  auto var = at::empty({ghosts, channels}, x.options());
  auto invstd = at::empty({ghosts, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_forward", [&] {
    const scalar_t* w = opt_ptr<scalar_t>(weight);
    const scalar_t* b = opt_ptr<scalar_t>(bias);
    if (spatial > 0)
      forward_planes<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w, b, mean.data_ptr<scalar_t>(),
                               var.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), ghosts, per_ghost, channels,
                               spatial, eps);
    else
      forward_rows<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w, b, mean.data_ptr<scalar_t>(),
                             var.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), ghosts, per_ghost, channels, eps);
  });
  return {y, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, int64_t ghosts, int64_t per_ghost, int64_t channels,
    int64_t spatial, bool need_input_grad) {
  TORCH_CHECK(grad_out.is_contiguous() && x.is_contiguous() && grad_out.sizes() == x.sizes() &&
                  grad_out.scalar_type() == x.scalar_type(),
              "ghost_batch_norm backward: grad_out must match the saved input's layout and dtype");
  check_params(x, weight, channels, "weight");
  auto dx = need_input_grad ? at::empty_like(x) : at::Tensor();
  auto sum_dy = at::empty({ghosts, channels}, x.options());
  auto sum_dy_xhat = at::empty({ghosts, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_backward", [&] {
    const scalar_t* w = opt_ptr<scalar_t>(weight);
    scalar_t* dxp = need_input_grad ? dx.data_ptr<scalar_t>() : nullptr;
    if (spatial > 0)
      backward_planes<scalar_t>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w, mean.data_ptr<scalar_t>(),
                                invstd.data_ptr<scalar_t>(), dxp, sum_dy.data_ptr<scalar_t>(),
                                sum_dy_xhat.data_ptr<scalar_t>(), ghosts, per_ghost, channels, spatial);
    else
      backward_rows<scalar_t>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w, mean.data_ptr<scalar_t>(),
                              invstd.data_ptr<scalar_t>(), dxp, sum_dy.data_ptr<scalar_t>(),
                              sum_dy_xhat.data_ptr<scalar_t>(), ghosts, per_ghost, channels);
  });
  return {dx, sum_dy, sum_dy_xhat};
}

}  // namespace

TORCH_LIBRARY(bnlab, m) {
  m.def("ghost_forward(Tensor x, Tensor? weight, Tensor? bias, int ghosts, int per_ghost, int channels, "
        "int spatial, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ghost_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, int ghosts, "
        "int per_ghost, int channels, int spatial, bool need_input_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("ghost_forward", &ghost_forward);
  m.impl("ghost_backward", &ghost_backward);
}
