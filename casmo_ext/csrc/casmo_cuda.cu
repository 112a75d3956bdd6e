// The CUDA entry point: steps one group's tensors on the current CUDA stream with the
// kernels of casmo_cuda_kernels.cuh. No host sync, no atomics: bitwise deterministic
// and capturable in a CUDA graph (step counts and lr read from device tensors).
// c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in the cuSPARSE and
// cuBLAS headers, which a bare CUDA toolkit may lack, and nothing here needs them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "casmo_cuda_launch.h"
#include "casmo_ops.h"

namespace casmo {
namespace {

struct CudaLauncher {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int blocks, int threads, Args&&... args) const {
    kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

at::Tensor cuda_step_op(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList ss,
                        c10::ArrayRef<double> steps, at::TensorList step_tensors, double lr,
                        const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                        double weight_decay, double c_min, double robustness, double rel_floor,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* who = "casmo_ext::step_ (CUDA)";
  for (const at::Tensor& p : params)
    TORCH_CHECK(p.is_cuda(), who, ": tensors must be on a CUDA device, got ", p.device());
  if (params.empty()) return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const Hyper hyper = make_hyper(lr, beta1, beta2, eps, weight_decay, c_min, robustness,
                                               rel_floor);
  return cuda_kernels::step_from_aten<cuda_kernels::kCudaBlockSize>(
      who, params.vec(), grads.vec(), ms.vec(), ss.vec(), steps.vec(), step_tensors.vec(), lr, lr_tensor, hyper,
      grad_scale, found_inf, cuda_kernels::kDefaultChunkSize, CudaLauncher{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace casmo

TORCH_LIBRARY_IMPL(casmo_ext, CUDA, m) { m.impl("step_", &casmo::cuda_step_op); }
