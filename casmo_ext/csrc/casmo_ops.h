// The entry points of casmo_ext._C. Each steps the tensors of one parameter group
// that share a device and dtype, in place, and returns float64
// [sum of agar_i, sum of C_i] over all their elements, on their device.
//
// The optimizer calls the operator casmo_ext::step_ (torch.ops.casmo_ext.step_, schema in
// casmo_cpu.cpp), so its mutations go through the dispatcher: CPU and CUDA kernels below.
// Its arguments: each tensor's step count after this step, as floats (steps) or as
// float32 scalars on the tensors' device (step_tensors), one of the two lists empty; lr,
// or lr_tensor when given; the group's hyper-parameters; GradScaler's grad_scale (the
// gradients are multiplied by its reciprocal, in place, as torch's fused Adam unscales
// them) and found_inf (nonzero: nothing changes, the gradients included, and the sums
// are zeros), both optional one-element float32 tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace casmo {

using TensorList = std::vector<at::Tensor>;

// The operator's CPU kernel: reads its optional tensors on the host.
at::Tensor cpu_step_op(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList ss,
                       c10::ArrayRef<double> steps, at::TensorList step_tensors, double lr,
                       const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                       double weight_decay, double c_min, double robustness, double rel_floor,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// The CPU kernel with host arguments only (for tests); steps as above.
at::Tensor cpu_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                    const TensorList& ss, const std::vector<double>& steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c_min,
                    double robustness, double rel_floor);

// The operator's CUDA kernel (casmo_cuda.cu, built with CASMO_WITH_CUDA), on the current
// stream, without a host sync: step_tensors, grad_scale, found_inf and lr_tensor are read
// in the kernels (lr_tensor on the host when a CPU tensor).
at::Tensor cuda_step_op(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList ss,
                        c10::ArrayRef<double> steps, at::TensorList step_tensors, double lr,
                        const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                        double weight_decay, double c_min, double robustness, double rel_floor,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// The same kernels run on CPU tensors through cuda_emulation.h (always built; for
// tests). chunk_size: elements per block (the GPU uses 65536; tests pass small ones).
at::Tensor cuda_emulated_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                              const TensorList& ss, const std::vector<double>& steps,
                              const TensorList& step_tensors, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                              double eps, double weight_decay, double c_min, double robustness,
                              double rel_floor, int64_t chunk_size, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf);

// How many partial sums the emulated kernels' reductions have read since the process
// started (for tests: each tensor's partials are to be read once by its sum).
int64_t cuda_emulated_partials_read();

// The launch-packing limits of the CUDA kernels, so tests can exceed them:
// {"max_tensors", "max_blocks", "block_size", "emulated_block_size", "default_chunk_size"}.
std::vector<std::pair<std::string, int64_t>> cuda_launch_limits();

// Checks shared by every backend: equal lengths, one device and dtype, matching
// shapes and strides, dense memory. Raises a c10::Error naming the fix.
void check_tensor_lists(const TensorList& params, const TensorList& grads, const TensorList& ms,
                        const TensorList& ss, const char* who);

}  // namespace casmo
