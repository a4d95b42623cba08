// Batch renorm's per-channel step in one call: from the batch statistics and the running ones,
// the clipped r and d, the folded affine (γr, γd + β) and the running-statistics update.
//
// In eager torch this step is about fifteen tiny ops of C elements each; on small inputs their
// dispatch cost is comparable to the batch norm itself.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>

namespace {

// Returns (folded_weight, folded_bias, r, d, batch_invstd); updates running_mean/var in place with
// momentum, storing the variance as batch_var * unbias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> renorm_factors(
    const at::Tensor& batch_mean, const at::Tensor& batch_var, at::Tensor running_mean, at::Tensor running_var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps, double r_max,
    double d_max, double momentum, double unbias) {
  const int64_t C = batch_mean.numel();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&batch_mean, &batch_var, &running_mean, &running_var}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == C && t->scalar_type() == at::kFloat,
                "renorm_factors: statistics must be contiguous float32 CPU tensors of one size");
  }
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  for (const c10::optional<at::Tensor>* p : std::initializer_list<const c10::optional<at::Tensor>*>{&weight, &bias}) {
    if (p->has_value() && (*p)->defined())
      TORCH_CHECK((*p)->is_contiguous() && (*p)->numel() == C && (*p)->scalar_type() == at::kFloat,
                  "renorm_factors: weight and bias must be contiguous float32 (C,) tensors");
  }
  auto opts = batch_mean.options();
  at::Tensor fw = at::empty({C}, opts), fb = at::empty({C}, opts), r = at::empty({C}, opts),
             d = at::empty({C}, opts), inv = at::empty({C}, opts);
  const float* bm = batch_mean.data_ptr<float>();
  const float* bv = batch_var.data_ptr<float>();
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  const float* w = has_w ? weight->data_ptr<float>() : nullptr;
  const float* b = has_b ? bias->data_ptr<float>() : nullptr;
  float *fwp = fw.data_ptr<float>(), *fbp = fb.data_ptr<float>(), *rp = r.data_ptr<float>(),
        *dp = d.data_ptr<float>(), *ip = inv.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    // the same float32 operations, in the same order, as the eager path
    const float sigma = std::sqrt(rv[c] + static_cast<float>(eps));
    const float invstd = 1.0f / std::sqrt(bv[c] + static_cast<float>(eps));
    const float rc = std::clamp(1.0f / (invstd * sigma), static_cast<float>(1.0 / r_max), static_cast<float>(r_max));
    const float dc = std::clamp((bm[c] - rm[c]) / sigma, static_cast<float>(-d_max), static_cast<float>(d_max));
    const float gamma = w ? w[c] : 1.0f;
    fwp[c] = gamma * rc;
    fbp[c] = gamma * dc + (b ? b[c] : 0.0f);
    rp[c] = rc;
    dp[c] = dc;
    ip[c] = invstd;
    // as ATen's batch_norm_update_stats: momentum * new + (1 - momentum) * old
    rm[c] = static_cast<float>(momentum * bm[c] + (1.0 - momentum) * rm[c]);
    rv[c] = static_cast<float>(momentum * (bv[c] * unbias) + (1.0 - momentum) * rv[c]);
  }
  return {fw, fb, r, d, inv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnlab, m) {
  m.def("renorm_factors(Tensor batch_mean, Tensor batch_var, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor? weight, Tensor? bias, float eps, float r_max, float d_max, float momentum, float unbias) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("renorm_factors", &renorm_factors);
}
