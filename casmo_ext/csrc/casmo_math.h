// The CASMO step, one element at a time: the single definition of the formula that
// the CPU kernel, the CUDA kernels and the emulated CUDA kernels all call.
// The math: docs/casmo_spec.md. Arithmetic is float32;
// per-tensor constants are prepared in float64 on the host or once per block.
#pragma once

#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define CASMO_HD __host__ __device__ __forceinline__
#else
#define CASMO_HD inline
#endif

namespace casmo {

// Hyper-parameters of one parameter group: float32 for the per-element arithmetic.
// 1 - beta and 1 - beta^t are small (1e-3 for beta2 = 0.999), so they are formed in
// float64: in float32 the cancellation would cost four significant digits.
struct Hyper {
  float lr;
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float c_min;
  float robustness;
  float rel_floor;
  float inv_grad_scale;  // 1 / GradScaler's scale (1 without one): unscales g in pass 1
  double beta1_f64;
  double beta2_f64;
};

inline Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, double c_min,
                        double robustness, double rel_floor) {
  Hyper h;
  h.lr = static_cast<float>(lr);
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(weight_decay);
  h.c_min = static_cast<float>(c_min);
  h.robustness = static_cast<float>(robustness);
  h.rel_floor = static_cast<float>(rel_floor);
  h.inv_grad_scale = 1.0f;
  h.beta1_f64 = beta1;
  h.beta2_f64 = beta2;
  return h;
}

// GradScaler's scale as the kernels apply it: multiplied by its float32 reciprocal, as
// GradScaler.unscale_ does (exact for the power-of-two scales it uses).
CASMO_HD float inv_grad_scale(float grad_scale) { return 1.0f / grad_scale; }

// Per-tensor constants of both passes, from the step count. Reciprocals (computed in
// float64) so the per-element work multiplies instead of dividing.
struct MomentConsts {
  float inv_bias_correction1;  // 1 / (1 - beta1^t)
  float inv_bias_correction2;  // 1 / (1 - beta2^t)
};

// Per-tensor constants of pass 2 (from the tensor's mean AGAR).
struct GateConsts {
  float inv_agar_mean_plus_eps;  // 1 / (A + eps)
  float trust_pow;           // (c_min + (1 - c_min) * A) ^ robustness
  float decay;               // 1 - lr * weight_decay
};

CASMO_HD MomentConsts moment_consts(const Hyper& h, double step) {
  MomentConsts c;
  c.inv_bias_correction1 = static_cast<float>(1.0 / (1.0 - pow(h.beta1_f64, step)));
  c.inv_bias_correction2 = static_cast<float>(1.0 / (1.0 - pow(h.beta2_f64, step)));
  return c;
}

// agar_sum is the tensor's sum of agar_i (float64), n its element count (> 0).
CASMO_HD GateConsts gate_consts(const Hyper& h, double agar_sum, double n) {
  const double agar_mean = agar_sum / n;
  const double trust = h.c_min + (1.0 - h.c_min) * agar_mean;
  GateConsts c;
  c.inv_agar_mean_plus_eps = 1.0f / (static_cast<float>(agar_mean) + h.eps);
  c.trust_pow = static_cast<float>(pow(trust, static_cast<double>(h.robustness)));
  c.decay = 1.0f - h.lr * h.weight_decay;
  return c;
}

// Ternaries rather than fmaxf/fminf so that host compilers vectorise the loops.
CASMO_HD float max_f(float a, float b) { return a > b ? a : b; }

// A gradient element as GradScaler's unscale_ leaves it: the kernels write this back
// into the gradient when given a scale, as torch's fused Adam does.
CASMO_HD float unscale(float scaled_g, const Hyper& h) { return scaled_g * h.inv_grad_scale; }

// Pass 1: fold the unscaled gradient into the moments. The deviation is taken from
// the previous mean, before m moves.
CASMO_HD void update_moments(float g, float& m, float& s, const Hyper& h) {
  const float d = g - m;
  m = h.beta1 * m + h.one_minus_beta1 * g;
  s = h.beta2 * s + h.one_minus_beta2 * (d * d);
}

// The signal fraction of one coordinate, from the stored moments. Also returns the
// bias-corrected mean and the reconstructed E[g^2] that pass 2 needs. Written as a
// reciprocal and products (no divisions) so that the vector twin in casmo_cpu_kernel.cpp,
// which may use a fast reciprocal, performs the same operations in the same order.
CASMO_HD float agar(float m, float s, const MomentConsts& c, float& m_hat, float& total) {
  m_hat = m * c.inv_bias_correction1;
  const float s_hat = s * c.inv_bias_correction2;
  const float signal = m_hat * m_hat;
  total = signal + s_hat;
  return signal * (1.0f / max_f(total, FLT_MIN));
}

// clamp(x, lo, hi) that keeps a NaN x, as torch.clamp and at::vec::clamp do: a NaN
// gradient must spoil its tensor's step the same way on every backend (docs/casmo_spec.md).
CASMO_HD float clamp_keep_nan(float x, float lo, float hi) {
  x = lo > x ? lo : x;
  return hi < x ? hi : x;
}

// Pass 2: the gated AdamW update. Returns the new parameter; confidence gets C_i.
CASMO_HD float apply_update(float p, float m_hat, float total, float agar_i, const Hyper& h,
                            const GateConsts& gc, float& confidence) {
  const float focus = clamp_keep_nan(agar_i * gc.inv_agar_mean_plus_eps, h.rel_floor, 1.0f);
  confidence = gc.trust_pow * focus;
  const float inv_denominator = 1.0f / (sqrtf(total) + h.eps);
  return p * gc.decay - h.lr * confidence * m_hat * inv_denominator;
}

}  // namespace casmo
