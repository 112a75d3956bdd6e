// Fused CPU kernel: one call steps every tensor of a parameter group.
//
// Work is cut into items of a fixed size (whole small tensors, fixed chunks of large
// ones) so that each tensor's AGAR sum is added up in the same order whatever the
// thread count: the result is deterministic and independent of torch.set_num_threads.
// A small tensor runs both passes back to back on one thread while it is in cache; a
// large one runs pass 1 over all its chunks, then its mean, then pass 2 in reverse.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>

#include "casmo_math.h"
#include "casmo_ops.h"

namespace casmo {
namespace {

constexpr int64_t kSmallTensor = 32768;  // stepped whole by one thread
constexpr int64_t kChunk = 16384;        // work item of a large tensor
constexpr int64_t kBlock = 256;          // elements per vectorised inner loop

// Rounds a float to the storage dtype and back: AGAR is computed from stored moments.
template <typename scalar_t>
inline float stored(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Sums floats in float64 in a fixed order, in eight lanes the compiler can vectorise.
inline double sum_block(const float* values, int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += values[j + l];
  for (; j < n; ++j) lanes[0] += values[j];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Pass 1 over n elements: moments updated in place; returns the sum of agar_i.
// Each block of kBlock elements is one straight loop (vectorised), writing agar_i to a
// small buffer that is then summed.
template <typename scalar_t>
__attribute__((always_inline)) inline double moments_pass(const scalar_t* g, scalar_t* m, scalar_t* s,
                                                          int64_t n, const Hyper h, const MomentConsts mc) {
  float agar_block[kBlock];
  double sum = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const scalar_t* __restrict__ gb = g + b;
    scalar_t* __restrict__ mb = m + b;
    scalar_t* __restrict__ sb = s + b;
    for (int64_t i = 0; i < len; ++i) {
      float mi = static_cast<float>(mb[i]), si = static_cast<float>(sb[i]);
      update_moments(static_cast<float>(gb[i]), mi, si, h);
      mb[i] = static_cast<scalar_t>(mi);
      sb[i] = static_cast<scalar_t>(si);
      float m_hat, total;
      agar_block[i] = agar(stored<scalar_t>(mi), stored<scalar_t>(si), mc, m_hat, total);
    }
    sum += sum_block(agar_block, len);
  }
  return sum;
}

// Pass 2 over n elements: parameters updated in place; returns the sum of C_i.
template <typename scalar_t>
__attribute__((always_inline)) inline double update_pass(scalar_t* p, const scalar_t* m, const scalar_t* s,
                                                         int64_t n, const Hyper h, const MomentConsts mc,
                                                         const GateConsts gc) {
  float confidence_block[kBlock];
  double sum = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    scalar_t* __restrict__ pb = p + b;
    const scalar_t* __restrict__ mb = m + b;
    const scalar_t* __restrict__ sb = s + b;
    for (int64_t i = 0; i < len; ++i) {
      float m_hat, total;
      const float agar_i = agar(static_cast<float>(mb[i]), static_cast<float>(sb[i]), mc, m_hat, total);
      pb[i] = static_cast<scalar_t>(
          apply_update(static_cast<float>(pb[i]), m_hat, total, agar_i, h, gc, confidence_block[i]));
    }
    sum += sum_block(confidence_block, len);
  }
  return sum;
}

// The passes for one dtype, compiled for AVX2+FMA and for the baseline; picked at
// run time so one build runs everywhere and uses AVX2 where the CPU has it.
#define CASMO_DEFINE_PASSES(scalar_t, suffix, target)                                          \
  target double moments_##suffix(const scalar_t* g, scalar_t* m, scalar_t* s, int64_t n,     \
                                 const Hyper& h, const MomentConsts& mc) {                   \
    return moments_pass(g, m, s, n, h, mc);                                                  \
  }                                                                                          \
  target double update_##suffix(scalar_t* p, const scalar_t* m, const scalar_t* s, int64_t n, \
                                const Hyper& h, const MomentConsts& mc, const GateConsts& gc) { \
    return update_pass(p, m, s, n, h, mc, gc);                                               \
  }

#define CASMO_AVX2 __attribute__((target("avx2,fma")))
#define CASMO_BASE
CASMO_DEFINE_PASSES(float, f32_avx2, CASMO_AVX2)
CASMO_DEFINE_PASSES(float, f32_base, CASMO_BASE)
CASMO_DEFINE_PASSES(c10::BFloat16, bf16_avx2, CASMO_AVX2)
CASMO_DEFINE_PASSES(c10::BFloat16, bf16_base, CASMO_BASE)
CASMO_DEFINE_PASSES(c10::Half, f16_avx2, CASMO_AVX2)
CASMO_DEFINE_PASSES(c10::Half, f16_base, CASMO_BASE)

template <typename scalar_t>
struct Passes {
  double (*moments)(const scalar_t*, scalar_t*, scalar_t*, int64_t, const Hyper&,
                    const MomentConsts&);
  double (*update)(scalar_t*, const scalar_t*, const scalar_t*, int64_t, const Hyper&,
                   const MomentConsts&, const GateConsts&);
};

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

template <typename scalar_t>
Passes<scalar_t> passes();
template <>
Passes<float> passes<float>() {
  return cpu_has_avx2() ? Passes<float>{moments_f32_avx2, update_f32_avx2}
                        : Passes<float>{moments_f32_base, update_f32_base};
}
template <>
Passes<c10::BFloat16> passes<c10::BFloat16>() {
  return cpu_has_avx2() ? Passes<c10::BFloat16>{moments_bf16_avx2, update_bf16_avx2}
                        : Passes<c10::BFloat16>{moments_bf16_base, update_bf16_base};
}
template <>
Passes<c10::Half> passes<c10::Half>() {
  return cpu_has_avx2() ? Passes<c10::Half>{moments_f16_avx2, update_f16_avx2}
                        : Passes<c10::Half>{moments_f16_base, update_f16_base};
}

// One unit of parallel work: a whole small tensor, or one chunk of a large one.
struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Runs body(item, index) over all items on the intra-op threads. Each thread claims the
// next unclaimed item until none is left, so a thread slowed by a busy core (a shared VM)
// does less of the work instead of holding up the others. Callers store each item's
// result by its index and add the results up in index order: sums stay deterministic.
template <typename F>
void parallel_over_items(const std::vector<Item>& items, F&& body) {
  const int64_t count = static_cast<int64_t>(items.size());
  if (count == 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < count; k = next.fetch_add(1)) body(items[k], k);
  });
}

template <typename scalar_t>
at::Tensor step_impl(const TensorList& params, const TensorList& grads, const TensorList& ms,
                     const TensorList& ss, const std::vector<double>& steps, const Hyper& h) {
  const Passes<scalar_t> pass = passes<scalar_t>();
  auto ptr = [](const at::Tensor& x, int64_t offset) { return x.data_ptr<scalar_t>() + offset; };
  std::vector<Item> small;
  std::vector<int64_t> large;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (n > kSmallTensor) {
      large.push_back(t);
    } else if (n > 0) {
      small.push_back({t, 0, n});
    }
  }
  double total_agar = 0.0, total_conf = 0.0;

  // Small tensors: both passes back to back on one thread, while the tensor is in cache.
  std::vector<double> small_agar(small.size()), small_conf(small.size());
  parallel_over_items(small, [&](const Item& it, int64_t k) {
    const int64_t t = it.tensor, n = it.end;
    const MomentConsts mc = moment_consts(h, steps[t]);
    small_agar[k] = pass.moments(ptr(grads[t], 0), ptr(ms[t], 0), ptr(ss[t], 0), n, h, mc);
    const GateConsts gc = gate_consts(h, small_agar[k], static_cast<double>(n));
    small_conf[k] = pass.update(ptr(params[t], 0), ptr(ms[t], 0), ptr(ss[t], 0), n, h, mc, gc);
  });
  for (size_t k = 0; k < small.size(); ++k) {
    total_agar += small_agar[k];
    total_conf += small_conf[k];
  }

  // Large tensors one at a time, split into chunks across threads: pass 1 runs forwards,
  // pass 2 backwards, so pass 2 starts on the chunks pass 1 has just left in cache.
  for (const int64_t t : large) {
    const int64_t n = params[t].numel();
    std::vector<Item> chunks;
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
    std::vector<double> chunk_agar(chunks.size()), chunk_conf(chunks.size());
    const MomentConsts mc = moment_consts(h, steps[t]);
    parallel_over_items(chunks, [&](const Item& it, int64_t k) {
      chunk_agar[k] = pass.moments(ptr(grads[t], it.begin), ptr(ms[t], it.begin), ptr(ss[t], it.begin),
                                   it.end - it.begin, h, mc);
    });
    double agar_sum = 0.0;
    for (const double partial : chunk_agar) agar_sum += partial;  // in chunk order: deterministic
    const GateConsts gc = gate_consts(h, agar_sum, static_cast<double>(n));
    std::reverse(chunks.begin(), chunks.end());
    parallel_over_items(chunks, [&](const Item& it, int64_t k) {
      chunk_conf[k] = pass.update(ptr(params[t], it.begin), ptr(ms[t], it.begin), ptr(ss[t], it.begin),
                                  it.end - it.begin, h, mc, gc);
    });
    total_agar += agar_sum;
    for (const double partial : chunk_conf) total_conf += partial;
  }
  return at::tensor({total_agar, total_conf}, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

void check_tensor_lists(const TensorList& params, const TensorList& grads, const TensorList& ms,
                        const TensorList& ss, const char* who) {
  TORCH_CHECK(grads.size() == params.size() && ms.size() == params.size() && ss.size() == params.size(),
              who, ": params, grads, m and s lists must have the same length");
  if (params.empty()) return;
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, who,
              ": parameters must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    for (const at::Tensor* x : {&params[i], &grads[i], &ms[i], &ss[i]}) {
      TORCH_CHECK(x->device() == device, who, ": tensor ", i, " is on ", x->device(),
                  " but the group's first parameter is on ", device,
                  "; put all of a parameter's tensors on one device");
      TORCH_CHECK(x->scalar_type() == dtype, who, ": tensor ", i, " has dtype ", x->scalar_type(),
                  " but its group shares dtype ", dtype, "; gradients and state must match the parameter");
      TORCH_CHECK(x->sizes() == params[i].sizes() && x->strides() == params[i].strides(), who,
                  ": tensor ", i, " (shape ", x->sizes(), ", strides ", x->strides(),
                  ") does not match its parameter (shape ", params[i].sizes(), ", strides ",
                  params[i].strides(), ")");
      TORCH_CHECK(x->is_non_overlapping_and_dense(), who, ": tensor ", i,
                  " is a view with gaps or overlaps; step a dense parameter (call .contiguous())");
    }
  }
}

at::Tensor cpu_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                    const TensorList& ss, const std::vector<double>& steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c_min,
                    double robustness, double rel_floor) {
  check_tensor_lists(params, grads, ms, ss, "casmo cpu_step");
  TORCH_CHECK(steps.size() == params.size(), "casmo cpu_step: one step count per tensor");
  const Hyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor);
  if (params.empty()) return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  TORCH_CHECK(params[0].device().is_cpu(), "casmo cpu_step: tensors must be on the CPU");
  switch (params[0].scalar_type()) {
    case at::kFloat:
      return step_impl<float>(params, grads, ms, ss, steps, h);
    case at::kBFloat16:
      return step_impl<c10::BFloat16>(params, grads, ms, ss, steps, h);
    default:
      return step_impl<c10::Half>(params, grads, ms, ss, steps, h);
  }
}

}  // namespace casmo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused CASMO optimizer steps (see casmo_ext.CASMO)";
  module.def("cpu_step", &casmo::cpu_step, "Step one group's CPU tensors of one dtype in place");
  module.def("cuda_emulated_step", &casmo::cuda_emulated_step,
             "Run the CUDA kernels on CPU tensors through the emulation header (for tests)",
             pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("ms"), pybind11::arg("ss"),
             pybind11::arg("steps"), pybind11::arg("step_tensors"), pybind11::arg("lr"),
             pybind11::arg("lr_tensor"), pybind11::arg("beta1"), pybind11::arg("beta2"),
             pybind11::arg("eps"), pybind11::arg("weight_decay"), pybind11::arg("c_min"),
             pybind11::arg("robustness"), pybind11::arg("rel_floor"), pybind11::arg("chunk_size"));
  module.def("cuda_launch_limits", []() {
    pybind11::dict limits;
    for (const auto& [name, value] : casmo::cuda_launch_limits()) limits[pybind11::str(name)] = value;
    return limits;
  }, "The CUDA kernels' launch-packing limits and block sizes");
#ifdef CASMO_WITH_CUDA
  module.def("cuda_step", &casmo::cuda_step, "Step one group's CUDA tensors of one dtype in place");
#endif
  module.def("built_with_cuda", []() {
#ifdef CASMO_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
