// The entry points of casmo_ext._C. Each steps the tensors of one parameter group
// that share a device and dtype, in place, and returns float64
// [sum of agar_i, sum of C_i] over all their elements, on their device.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace casmo {

using TensorList = std::vector<at::Tensor>;

// steps: each tensor's step count after this step.
at::Tensor cpu_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                    const TensorList& ss, const std::vector<double>& steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double c_min,
                    double robustness, double rel_floor);

// Checks shared by every backend: equal lengths, one device and dtype, matching
// shapes and strides, dense memory. Raises a c10::Error naming the fix.
void check_tensor_lists(const TensorList& params, const TensorList& grads, const TensorList& ms,
                        const TensorList& ss, const char* who);

}  // namespace casmo
