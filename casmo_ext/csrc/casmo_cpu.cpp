// Fused CPU kernel: one call steps every tensor of a parameter group.
//
// Work is cut into items of a fixed size (whole small tensors, fixed chunks of large
// ones) so that each tensor's AGAR sum is added up in the same order whatever the
// thread count: the result is deterministic and independent of torch.set_num_threads.
// Two parallel regions per call: the first runs both passes of each small tensor (back
// to back on one thread, while it is in cache) and pass 1 of every chunk of the large
// ones; then each large tensor's mean; the second runs pass 2 over the chunks in reverse,
// starting on those pass 1 has just left in cache. The passes themselves are in
// casmo_cpu_kernel.cpp, compiled once per CPU capability.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "casmo_cpu_kernel.h"
#include "casmo_math.h"
#include "casmo_ops.h"

namespace casmo {
namespace {

using cpu::kChunk;
using cpu::Passes;

constexpr int64_t kSmallTensor = 2 * kChunk;  // stepped whole by one thread

// The compiled variant that matches the capability torch runs its own kernels with
// (lowered with ATEN_CPU_CAPABILITY=avx2 or default).
std::string kernel_capability() {
#ifdef CASMO_CPU_X86
  const std::string torch_capability = at::get_cpu_capability();
  if (torch_capability == "AVX512" || torch_capability == "AVX2") return torch_capability;
#endif
  return "DEFAULT";
}

template <typename scalar_t>
Passes<scalar_t> select_passes() {
#ifdef CASMO_CPU_X86
  const std::string capability = kernel_capability();
  if (capability == "AVX512") return cpu::AVX512::passes<scalar_t>();
  if (capability == "AVX2") return cpu::AVX2::passes<scalar_t>();
#endif
  return cpu::DEFAULT::passes<scalar_t>();
}

// One unit of parallel work: a whole small tensor, or one chunk of a large one.
struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  bool whole;
};

// Small tensors first, then the chunks of each large tensor in order.
std::vector<Item> plan_items(const TensorList& params) {
  std::vector<Item> items;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (n > 0 && n <= kSmallTensor) items.push_back({t, 0, n, true});
  }
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (n <= kSmallTensor) continue;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk), false});
  }
  return items;
}

// Runs body(k) for k in [0, count) on the intra-op threads. Each thread claims the next
// unclaimed k until none is left, so a thread slowed by a busy core (a shared VM) does
// less of the work instead of holding up the others. Callers store each result by its
// k and add the results up in k order: sums stay deterministic.
template <typename F>
void parallel_over(int64_t count, F&& body) {
  if (count == 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < count; k = next.fetch_add(1)) body(k);
  });
}

// Each large tensor's gate, from its chunks' AGAR sums added in chunk order.
std::vector<GateConsts> large_tensor_gates(const std::vector<Item>& items, const std::vector<double>& agar,
                                           const TensorList& params, const Hyper& h) {
  std::vector<double> agar_sum(params.size(), 0.0);
  for (size_t k = 0; k < items.size(); ++k)
    if (!items[k].whole) agar_sum[items[k].tensor] += agar[k];
  std::vector<GateConsts> gates(params.size());
  for (size_t t = 0; t < params.size(); ++t)
    if (params[t].numel() > kSmallTensor)
      gates[t] = gate_consts(h, agar_sum[t], static_cast<double>(params[t].numel()));
  return gates;
}

template <typename scalar_t>
at::Tensor step_impl(const TensorList& params, const TensorList& grads, const TensorList& ms,
                     const TensorList& ss, const std::vector<double>& steps, const Hyper& h) {
  const Passes<scalar_t> pass = select_passes<scalar_t>();
  auto ptr = [](const at::Tensor& x, const Item& it) { return x.data_ptr<scalar_t>() + it.begin; };
  const std::vector<Item> items = plan_items(params);
  std::vector<MomentConsts> mc(params.size());
  for (size_t t = 0; t < params.size(); ++t) mc[t] = moment_consts(h, steps[t]);
  std::vector<double> agar(items.size()), conf(items.size());

  parallel_over(static_cast<int64_t>(items.size()), [&](int64_t k) {
    const Item& it = items[k];
    const int64_t t = it.tensor, n = it.end - it.begin;
    agar[k] = pass.moments(ptr(grads[t], it), ptr(ms[t], it), ptr(ss[t], it), n, h, mc[t]);
    if (it.whole) {
      const GateConsts gc = gate_consts(h, agar[k], static_cast<double>(n));
      conf[k] = pass.update(ptr(params[t], it), ptr(ms[t], it), ptr(ss[t], it), n, h, mc[t], gc);
    }
  });

  const std::vector<GateConsts> gates = large_tensor_gates(items, agar, params, h);
  std::vector<int64_t> chunks;  // large tensors' chunks, last first
  for (int64_t k = static_cast<int64_t>(items.size()) - 1; k >= 0 && !items[k].whole; --k) chunks.push_back(k);
  parallel_over(static_cast<int64_t>(chunks.size()), [&](int64_t j) {
    const Item& it = items[chunks[j]];
    const int64_t t = it.tensor;
    conf[chunks[j]] = pass.update(ptr(params[t], it), ptr(ms[t], it), ptr(ss[t], it), it.end - it.begin, h,
                                  mc[t], gates[t]);
  });

  double total_agar = 0.0, total_conf = 0.0;
  for (size_t k = 0; k < items.size(); ++k) {
    total_agar += agar[k];
    total_conf += conf[k];
  }
  return at::tensor({total_agar, total_conf}, at::TensorOptions().dtype(at::kDouble));
}

// casmo_math.h applied one element at a time, on one thread: what the vector passes are
// tested against.
template <typename scalar_t>
at::Tensor scalar_step_impl(const TensorList& params, const TensorList& grads, const TensorList& ms,
                            const TensorList& ss, const std::vector<double>& steps, const Hyper& h) {
  double total_agar = 0.0, total_conf = 0.0;
  for (size_t t = 0; t < params.size(); ++t) {
    scalar_t *p = params[t].data_ptr<scalar_t>(), *m = ms[t].data_ptr<scalar_t>();
    scalar_t *s = ss[t].data_ptr<scalar_t>(), *g = grads[t].data_ptr<scalar_t>();
    const int64_t n = params[t].numel();
    const MomentConsts mc = moment_consts(h, steps[t]);
    double agar_sum = 0.0;
    float m_hat, total, confidence;
    for (int64_t i = 0; i < n; ++i) {
      float mi = m[i], si = s[i];
      update_moments(unscale(static_cast<float>(g[i]), h), mi, si, h);
      m[i] = static_cast<scalar_t>(mi);
      s[i] = static_cast<scalar_t>(si);
      agar_sum += agar(static_cast<float>(m[i]), static_cast<float>(s[i]), mc, m_hat, total);
    }
    if (n == 0) continue;
    const GateConsts gc = gate_consts(h, agar_sum, static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) {
      const float agar_i = agar(static_cast<float>(m[i]), static_cast<float>(s[i]), mc, m_hat, total);
      p[i] = static_cast<scalar_t>(apply_update(static_cast<float>(p[i]), m_hat, total, agar_i, h, gc, confidence));
      total_conf += confidence;
    }
    total_agar += agar_sum;
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

namespace {

template <typename scalar_t>
at::Tensor step_dtype(bool vector, const TensorList& params, const TensorList& grads, const TensorList& ms,
                      const TensorList& ss, const std::vector<double>& steps, const Hyper& h) {
  return vector ? step_impl<scalar_t>(params, grads, ms, ss, steps, h)
                : scalar_step_impl<scalar_t>(params, grads, ms, ss, steps, h);
}

// The checks and the dtype dispatch of both CPU entry points.
at::Tensor checked_cpu_step(bool vector, const char* who, const TensorList& params, const TensorList& grads,
                            const TensorList& ms, const TensorList& ss, const std::vector<double>& steps,
                            const Hyper& h) {
  check_tensor_lists(params, grads, ms, ss, who);
  TORCH_CHECK(steps.size() == params.size(), who, ": one step count per tensor");
  if (params.empty()) return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  TORCH_CHECK(params[0].device().is_cpu(), who, ": tensors must be on the CPU");
  switch (params[0].scalar_type()) {
    case at::kFloat:
      return step_dtype<float>(vector, params, grads, ms, ss, steps, h);
    case at::kBFloat16:
      return step_dtype<c10::BFloat16>(vector, params, grads, ms, ss, steps, h);
    default:
      return step_dtype<c10::Half>(vector, params, grads, ms, ss, steps, h);
  }
}

// cpu_step's arithmetic one element at a time through casmo_math.h (for tests).
at::Tensor cpu_scalar_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                           const TensorList& ss, const std::vector<double>& steps, double lr, double beta1,
                           double beta2, double eps, double weight_decay, double c_min, double robustness,
                           double rel_floor) {
  const Hyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor);
  return checked_cpu_step(false, "casmo cpu_scalar_step", params, grads, ms, ss, steps, h);
}

}  // namespace

at::Tensor cpu_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                    const TensorList& ss, const std::vector<double>& steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c_min,
                    double robustness, double rel_floor) {
  const Hyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor);
  return checked_cpu_step(true, "casmo cpu_step", params, grads, ms, ss, steps, h);
}

namespace {

// The value of an optional one-element CPU tensor argument of the operator.
double host_scalar(const at::Tensor& x, const char* name, const char* who) {
  TORCH_CHECK(x.numel() == 1 && x.device().is_cpu(), who, ": ", name,
              " must be a one-element tensor on the CPU, like the parameters; got ", x.numel(),
              " elements on ", x.device());
  return x.item<double>();
}

// Each tensor's step count, from the floats or from the one-element CPU tensors.
std::vector<double> host_step_counts(c10::ArrayRef<double> steps, at::TensorList step_tensors, const char* who) {
  TORCH_CHECK(steps.empty() || step_tensors.empty(), who,
              ": pass the step counts as floats (steps) or as tensors (step_tensors), not both");
  std::vector<double> counts = steps.vec();
  for (const at::Tensor& step : step_tensors) counts.push_back(host_scalar(step, "a step tensor", who));
  return counts;
}

}  // namespace

at::Tensor cpu_step_op(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList ss,
                       c10::ArrayRef<double> steps, at::TensorList step_tensors, double lr,
                       const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                       double weight_decay, double c_min, double robustness, double rel_floor,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* who = "casmo_ext::step_ (CPU)";
  if (lr_tensor.has_value()) lr = host_scalar(*lr_tensor, "lr_tensor", who);
  Hyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor);
  if (grad_scale.has_value())
    h.inv_grad_scale = inv_grad_scale(static_cast<float>(host_scalar(*grad_scale, "grad_scale", who)));
  const std::vector<double> counts = host_step_counts(steps, step_tensors, who);
  if (found_inf.has_value() && host_scalar(*found_inf, "found_inf", who) != 0.0) {
    check_tensor_lists(params.vec(), grads.vec(), ms.vec(), ss.vec(), who);
    return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));  // skipped: nothing moves
  }
  return checked_cpu_step(true, who, params.vec(), grads.vec(), ms.vec(), ss.vec(), counts, h);
}

// The operator's ADInplaceOrView kernel: bumps the version counters of the tensors it
// writes, as ATen's in-place ops do, so autograd notices parameters saved for backward
// that the step has since changed. A C++ operator gets no such kernel by default.
at::Tensor step_inplace_or_view(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads,
                                at::TensorList ms, at::TensorList ss, c10::ArrayRef<double> steps,
                                at::TensorList step_tensors, double lr, const std::optional<at::Tensor>& lr_tensor,
                                double beta1, double beta2, double eps, double weight_decay, double c_min,
                                double robustness, double rel_floor, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("casmo_ext::step_", "")
                             .typed<decltype(cpu_step_op)>();
  at::Tensor sums;
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    sums = op.redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, ms, ss, steps, step_tensors, lr,
                         lr_tensor, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor, grad_scale,
                         found_inf);
  }
  for (const at::TensorList written : {params, ms, ss})
    for (const at::Tensor& x : written) torch::autograd::impl::bump_version(x);
  if (grad_scale.has_value())  // the gradients were unscaled in place
    for (const at::Tensor& x : grads) torch::autograd::impl::bump_version(x);
  return sums;
}

}  // namespace casmo

// Mutated lists are marked (a!) to (d!): functionalization (torch.compile) knows what
// the step writes. grads are written (unscaled) only when grad_scale is given.
TORCH_LIBRARY(casmo_ext, m) {
  m.def(
      "step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] m, Tensor(d!)[] s, float[] steps, "
      "Tensor[] step_tensors, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "
      "float weight_decay, float c_min, float robustness, float rel_floor, Tensor? grad_scale, "
      "Tensor? found_inf) -> Tensor");
}

TORCH_LIBRARY_IMPL(casmo_ext, CPU, m) { m.impl("step_", &casmo::cpu_step_op); }

TORCH_LIBRARY_IMPL(casmo_ext, ADInplaceOrView, m) { m.impl("step_", &casmo::step_inplace_or_view); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused CASMO optimizer steps (see casmo_ext.CASMO)";
  module.def("cpu_step", &casmo::cpu_step, "Step one group's CPU tensors of one dtype in place");
  module.def("cpu_scalar_step", &casmo::cpu_scalar_step,
             "cpu_step's arithmetic one element at a time through casmo_math.h (for tests)");
  module.def("cpu_capability", &casmo::kernel_capability,
             "The CPU kernel's compiled variant in use: the capability torch reports, where built");
  module.def("cuda_emulated_step", &casmo::cuda_emulated_step,
             "Run the CUDA kernels on CPU tensors through the emulation header (for tests)",
             pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("ms"), pybind11::arg("ss"),
             pybind11::arg("steps"), pybind11::arg("step_tensors"), pybind11::arg("lr"),
             pybind11::arg("lr_tensor"), pybind11::arg("beta1"), pybind11::arg("beta2"),
             pybind11::arg("eps"), pybind11::arg("weight_decay"), pybind11::arg("c_min"),
             pybind11::arg("robustness"), pybind11::arg("rel_floor"), pybind11::arg("chunk_size"),
             pybind11::arg("grad_scale") = pybind11::none(), pybind11::arg("found_inf") = pybind11::none());
  module.def("cuda_emulated_partials_read", &casmo::cuda_emulated_partials_read,
             "Partial sums the emulated kernels' reductions have read so far (for tests)");
  module.def("cuda_launch_limits", []() {
    pybind11::dict limits;
    for (const auto& [name, value] : casmo::cuda_launch_limits()) limits[pybind11::str(name)] = value;
    return limits;
  }, "The CUDA kernels' launch-packing limits and block sizes");
  module.def("built_with_cuda", []() {
#ifdef CASMO_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
