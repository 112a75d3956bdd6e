// The CPU passes in ATen's vector types: the vector twin of casmo_math.h (same
// operations in the same order), compiled once per CPU capability. setup.py defines
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and its instruction-set flags, which also
// select at::vec's implementation; a build without them is the portable DEFAULT one.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "casmo_cpu_kernel.h"

namespace casmo::cpu {
namespace CPU_CAPABILITY {
namespace {  // internal linkage: each capability's copy keeps its own instructions

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Elements per iteration: two float vectors, or one vector of a 16-bit type.
constexpr int64_t kStep = 2 * kLanes;
// Sums are kept in float32 lanes over a block, then added in float64 in lane order.
constexpr int64_t kBlock = 1024;
static_assert(kBlock % kStep == 0 && kChunk % kBlock == 0);

// Each stream is prefetched this far ahead: a thread streaming from memory otherwise has
// too few misses in flight (measured on a Xeon: 1.55x fused Adam on a 4M-element tensor
// without, 1.17x with; 4096 was slower than 2048). Prefetching past the end is harmless.
constexpr int64_t kPrefetchBytes = 2048;

template <typename scalar_t>
inline void prefetch_ahead(const scalar_t* ptr) {
  const char* ahead = reinterpret_cast<const char*>(ptr) + kPrefetchBytes;
  for (int64_t line = 0; line < kStep * static_cast<int64_t>(sizeof(scalar_t)); line += 64)
    __builtin_prefetch(ahead + line);
}

struct Pair {
  Vec lo, hi;
};

// count (<= kStep) elements as float32; a partial load leaves zeros in the other lanes.
template <typename scalar_t>
inline Pair load(const scalar_t* ptr, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kStep) return {Vec::loadu(ptr), Vec::loadu(ptr + kLanes)};
    return {Vec::loadu(ptr, std::min(count, kLanes)),
            Vec::loadu(ptr + kLanes, std::max<int64_t>(count - kLanes, 0))};
  } else {
    static_assert(at::vec::Vectorized<scalar_t>::size() == kStep);
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(ptr, count));
    return {lo, hi};
  }
}

// Stores count elements in the storage dtype; returns what was stored, as float32.
template <typename scalar_t>
inline Pair store(scalar_t* ptr, const Pair& x, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kStep) {
      x.lo.store(ptr);
      x.hi.store(ptr + kLanes);
    } else {
      x.lo.store(ptr, std::min(count, kLanes));
      x.hi.store(ptr + kLanes, std::max<int64_t>(count - kLanes, 0));
    }
    return x;
  } else {
    const auto stored = at::vec::convert_from_float<scalar_t>(x.lo, x.hi);
    stored.store(ptr, count);
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(stored);
    return {lo, hi};
  }
}

// 1/x for x in [FLT_MIN, 2^126]. Where the instruction set has a reciprocal estimate,
// one Newton step takes it to within a few float32 ulps, at a fraction of a division's
// cost; elsewhere a division.
inline Vec reciprocal(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const Vec estimate(_mm512_rcp14_ps(x));
#else
  const Vec estimate(_mm256_rcp_ps(x));
#endif
  const Vec error = at::vec::fnmadd(x, estimate, Vec(1.0f));  // 1 - x * estimate
  return at::vec::fmadd(estimate, error, estimate);
#else
  return Vec(1.0f) / x;
#endif
}

// The per-tensor constants of casmo_math.h, broadcast to every lane.
struct MomentVecs {
  Vec inv_grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction1, inv_bias_correction2;
  MomentVecs(const Hyper& h, const MomentConsts& mc)
      : inv_grad_scale(h.inv_grad_scale), beta1(h.beta1), one_minus_beta1(h.one_minus_beta1), beta2(h.beta2),
        one_minus_beta2(h.one_minus_beta2), inv_bias_correction1(mc.inv_bias_correction1),
        inv_bias_correction2(mc.inv_bias_correction2) {}
};

struct GateVecs {
  Vec inv_agar_mean_plus_eps, rel_floor, trust_pow, decay, lr, eps;
  GateVecs(const Hyper& h, const GateConsts& gc)
      : inv_agar_mean_plus_eps(gc.inv_agar_mean_plus_eps), rel_floor(h.rel_floor), trust_pow(gc.trust_pow),
        decay(gc.decay), lr(h.lr), eps(h.eps) {}
};

// casmo::update_moments, of the unscaled gradient.
inline void update_moments(const Vec& g, Vec& m, Vec& s, const MomentVecs& c) {
  const Vec d = g - m;
  m = c.beta1 * m + c.one_minus_beta1 * g;
  s = c.beta2 * s + c.one_minus_beta2 * (d * d);
}

// casmo::agar. Zero lanes (m = s = 0) give 0.
inline Vec agar(const Vec& m, const Vec& s, const MomentVecs& c, Vec& m_hat, Vec& total) {
  m_hat = m * c.inv_bias_correction1;
  const Vec s_hat = s * c.inv_bias_correction2;
  const Vec signal = m_hat * m_hat;
  total = signal + s_hat;
  return signal * reciprocal(at::vec::clamp_min(total, Vec(FLT_MIN)));
}

// casmo::apply_update, with agar_i computed from the stored moments.
inline Vec apply_update(const Vec& p, const Vec& m, const Vec& s, const MomentVecs& c, const GateVecs& gc,
                        Vec& confidence) {
  Vec m_hat, total;
  const Vec agar_i = agar(m, s, c, m_hat, total);
  const Vec focus = at::vec::clamp(agar_i * gc.inv_agar_mean_plus_eps, gc.rel_floor, Vec(1.0f));
  confidence = gc.trust_pow * focus;
  const Vec inv_denominator = reciprocal(total.sqrt() + gc.eps);
  return p * gc.decay - gc.lr * confidence * m_hat * inv_denominator;
}

// Pass 1 on count <= kStep elements; returns agar_i summed lane-wise. With unscale (a
// GradScaler's scale), the unscaled gradient is written back, as torch's fused Adam does.
template <typename scalar_t>
inline Vec moments_step(scalar_t* g, scalar_t* m, scalar_t* s, int64_t count, const MomentVecs& c,
                        bool unscale) {
  prefetch_ahead(g);
  prefetch_ahead(m);
  prefetch_ahead(s);
  Pair gv = load(g, count);
  Pair mv = load(m, count), sv = load(s, count);
  if (unscale) {
    gv = {gv.lo * c.inv_grad_scale, gv.hi * c.inv_grad_scale};
    store(g, gv, count);
  }
  update_moments(gv.lo, mv.lo, sv.lo, c);
  update_moments(gv.hi, mv.hi, sv.hi, c);
  mv = store(m, mv, count);  // AGAR is computed from the stored moments, as pass 2 sees them
  sv = store(s, sv, count);
  Vec m_hat, total;
  return agar(mv.lo, sv.lo, c, m_hat, total) + agar(mv.hi, sv.hi, c, m_hat, total);
}

// Pass 2 on count <= kStep elements; returns C_i summed lane-wise.
template <typename scalar_t>
inline Vec update_step(scalar_t* p, const scalar_t* m, const scalar_t* s, int64_t count, const MomentVecs& c,
                       const GateVecs& gc) {
  prefetch_ahead(p);
  prefetch_ahead(m);
  prefetch_ahead(s);
  Pair pv = load(p, count);
  const Pair mv = load(m, count), sv = load(s, count);
  Vec confidence_lo, confidence_hi;
  pv.lo = apply_update(pv.lo, mv.lo, sv.lo, c, gc, confidence_lo);
  pv.hi = apply_update(pv.hi, mv.hi, sv.hi, c, gc, confidence_hi);
  store(p, pv, count);
  if (count < kStep) {  // past the end, zero moments still give C_i = trust_pow * rel_floor
    confidence_lo = Vec::set(Vec(0.0f), confidence_lo, std::min(count, kLanes));
    confidence_hi = Vec::set(Vec(0.0f), confidence_hi, std::max<int64_t>(count - kLanes, 0));
  }
  return confidence_lo + confidence_hi;
}

inline double sum_lanes(const Vec& v) {
  __at_align__ float lanes[kLanes];
  v.store(lanes);
  double sum = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// Runs step(begin, count) over [0, n) in kStep pieces; sums its results in float32 per
// block of kBlock elements and the blocks in float64, always in the same order.
template <typename Step>
inline double sum_over(int64_t n, const Step& step) {
  double sum = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    Vec acc(0.0f);
    int64_t i = b;
    for (; i + kStep <= end; i += kStep) acc += step(i, kStep);
    if (i < end) acc += step(i, end - i);
    sum += sum_lanes(acc);
  }
  return sum;
}

template <typename scalar_t>
double moments_pass(scalar_t* g, scalar_t* m, scalar_t* s, int64_t n, const Hyper& h, const MomentConsts& mc) {
  const MomentVecs c(h, mc);
  // A scale of 1 leaves g as it is: no store needed.
  const bool unscale = h.inv_grad_scale != 1.0f;
  return sum_over(n, [&](int64_t i, int64_t count) {
    return moments_step(g + i, m + i, s + i, count, c, unscale);
  });
}

template <typename scalar_t>
double update_pass(scalar_t* p, const scalar_t* m, const scalar_t* s, int64_t n, const Hyper& h,
                   const MomentConsts& mc, const GateConsts& gc) {
  const MomentVecs c(h, mc);
  const GateVecs gv(h, gc);
  return sum_over(n, [&](int64_t i, int64_t count) { return update_step(p + i, m + i, s + i, count, c, gv); });
}

}  // namespace

template <typename scalar_t>
Passes<scalar_t> passes() {
  return {moments_pass<scalar_t>, update_pass<scalar_t>};
}
template Passes<float> passes<float>();
template Passes<c10::BFloat16> passes<c10::BFloat16>();
template Passes<c10::Half> passes<c10::Half>();

}  // namespace CPU_CAPABILITY
}  // namespace casmo::cpu
