// Optimizer steps for bf16 training with float32 master weights, one pass per parameter.
//
// With autocast, every step casts each float32 weight to bfloat16 for the matmuls, casts the
// bfloat16 weight gradient back to float32, and then runs the optimizer: three passes over the
// largest tensors of the model. Here the model computes with a bfloat16 copy of each weight (its
// "shadow"), and one pass reads the shadow's bf16 gradient, updates the float32 master weight and
// optimizer state with torch's fused SGD / Adam formulas, and writes the new shadow: SGD bit for bit
// with torch's kernel where tested, Adam to float32 round-off. Only the passes go.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrain = 1 << 14;

// float -> bfloat16, round to nearest even (torch's rounding), NaN kept NaN; plain integer ops
// so that the loops below vectorize.
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7FC0) : uint16_t(rounded);
}

inline float from_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void check(const at::Tensor& master, const at::Tensor& grad, const at::Tensor& shadow) {
  TORCH_CHECK(master.device().is_cpu() && master.scalar_type() == at::kFloat && master.is_contiguous(),
              "master weights must be contiguous float32 CPU tensors");
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 && shadow.scalar_type() == at::kBFloat16 && grad.is_contiguous() &&
                  shadow.is_contiguous() && grad.numel() == master.numel() && shadow.numel() == master.numel(),
              "shadow and its gradient must be contiguous bfloat16 tensors of the master's size");
}

// torch.optim.SGD(fused=True) with dampening 0, no nesterov: g += wd·p; buf = g on the first
// step, else momentum·buf + g; p -= lr·buf (p -= lr·g without momentum).
void sgd_master_step(at::Tensor master, const c10::optional<at::Tensor>& momentum_buffer, const at::Tensor& grad,
                     at::Tensor shadow, double lr, double momentum, double weight_decay, bool first_step) {
  check(master, grad, shadow);
  const bool use_buf = momentum != 0;
  TORCH_CHECK(!use_buf || (momentum_buffer.has_value() && momentum_buffer->is_contiguous() &&
                           momentum_buffer->scalar_type() == at::kFloat && momentum_buffer->numel() == master.numel()),
              "momentum needs a contiguous float32 buffer of the master's size");
  float* p = master.data_ptr<float>();
  float* buf = use_buf ? momentum_buffer->data_ptr<float>() : nullptr;
  const uint16_t* g16 = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  uint16_t* s16 = reinterpret_cast<uint16_t*>(shadow.data_ptr<at::BFloat16>());
  const float lr_f = float(lr), mom = float(momentum), wd = float(weight_decay);
  // Built with -ffp-contract=off: the fused multiply-adds below are exactly where torch's fused
  // SGD kernel (as compiled in the torch wheel) has them, so the float32 results are bit-identical.
  at::parallel_for(0, master.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (!use_buf) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float g = std::fma(p[i], wd, from_bf16(g16[i]));
        p[i] = std::fma(g, -lr_f, p[i]);
        s16[i] = to_bf16(p[i]);
      }
    } else if (first_step) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float g = std::fma(p[i], wd, from_bf16(g16[i]));
        buf[i] = g;
        p[i] = std::fma(g, -lr_f, p[i]);
        s16[i] = to_bf16(p[i]);
      }
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float g = std::fma(p[i], wd, from_bf16(g16[i]));
        buf[i] = buf[i] * mom + g;
        p[i] = std::fma(buf[i], -lr_f, p[i]);
        s16[i] = to_bf16(p[i]);
      }
    }
  });
}

// torch.optim.Adam(fused=True), no amsgrad: g += wd·p; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
// p -= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps). `step` is t after this update.
void adam_master_step(at::Tensor master, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& grad,
                      at::Tensor shadow, double lr, double beta1, double beta2, double eps, double weight_decay,
                      int64_t step) {
  check(master, grad, shadow);
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->numel() == master.numel(),
                "Adam moments must be contiguous float32 tensors of the master's size");
  float* p = master.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const uint16_t* g16 = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  uint16_t* s16 = reinterpret_cast<uint16_t*>(shadow.data_ptr<at::BFloat16>());
  const double bias_correction1 = 1 - std::pow(beta1, double(step));
  const double bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, double(step)));
  const float step_size = float(lr / bias_correction1), bc2_sqrt = float(bias_correction2_sqrt);
  const float b1 = float(beta1), b2 = float(beta2), one_minus_b1 = float(1 - beta1), one_minus_b2 = float(1 - beta2);
  const float eps_f = float(eps), wd = float(weight_decay);
  at::parallel_for(0, master.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float g = std::fma(p[i], wd, from_bf16(g16[i]));
      m[i] = std::fma(g, one_minus_b1, m[i] * b1);
      v[i] = std::fma(g * g, one_minus_b2, v[i] * b2);
      const float denom = std::sqrt(v[i]) / bc2_sqrt + eps_f;
      p[i] = p[i] - step_size * m[i] / denom;
      s16[i] = to_bf16(p[i]);
    }
  });
}

}  // namespace

TORCH_LIBRARY(bnlab_train, m) {
  m.def("sgd_master_step(Tensor(a!) master, Tensor(b!)? momentum_buffer, Tensor grad, Tensor(c!) shadow, float lr, "
        "float momentum, float weight_decay, bool first_step) -> ()");
  m.def("adam_master_step(Tensor(a!) master, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, "
        "Tensor(d!) shadow, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(bnlab_train, CPU, m) {
  m.impl("sgd_master_step", &sgd_master_step);
  m.impl("adam_master_step", &adam_master_step);
}
