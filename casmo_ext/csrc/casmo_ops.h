// The entry points of casmo_ext._C. Each steps the tensors of one parameter group
// that share a device and dtype, in place, and returns float64
// [sum of agar_i, sum of C_i] over all their elements, on their device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace casmo {

using TensorList = std::vector<at::Tensor>;

// steps: each tensor's step count after this step.
at::Tensor cpu_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                    const TensorList& ss, const std::vector<double>& steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c_min,
                    double robustness, double rel_floor);

// The CUDA kernels (casmo_cuda.cu, built with CASMO_WITH_CUDA), on the current stream.
// Non-capturable: `steps` as above and step_tensors empty. Capturable: `steps` empty and
// step_tensors one float32 device scalar per tensor (already incremented). lr_tensor,
// when given, replaces lr: read in the kernel when on the device, on the host when a
// CPU tensor.
at::Tensor cuda_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                     const TensorList& ss, const std::vector<double>& steps, const TensorList& step_tensors,
                     double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                     double eps, double weight_decay, double c_min, double robustness, double rel_floor);

// The same kernels run on CPU tensors through cuda_emulation.h (always built; for
// tests). chunk_size: elements per block (the GPU uses 65536; tests pass small ones).
at::Tensor cuda_emulated_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                              const TensorList& ss, const std::vector<double>& steps,
                              const TensorList& step_tensors, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                              double eps, double weight_decay, double c_min, double robustness,
                              double rel_floor, int64_t chunk_size);

// The launch-packing limits of the CUDA kernels, so tests can exceed them:
// {"max_tensors", "max_blocks", "block_size", "emulated_block_size", "default_chunk_size"}.
std::vector<std::pair<std::string, int64_t>> cuda_launch_limits();

// Checks shared by every backend: equal lengths, one device and dtype, matching
// shapes and strides, dense memory. Raises a c10::Error naming the fix.
void check_tensor_lists(const TensorList& params, const TensorList& grads, const TensorList& ms,
                        const TensorList& ss, const char* who);

}  // namespace casmo
