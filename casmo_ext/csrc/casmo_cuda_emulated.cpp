// The CUDA kernels of casmo_cuda_kernels.cuh, compiled by the host compiler against
// cuda_emulation.h and run on CPU tensors: the kernels' tests run in CI without a GPU.
// Slow by design (one std::thread per CUDA thread); for testing only.
#include "cuda_emulation.h"  // first: defines the CUDA keywords the kernels use

#include <atomic>

// Counts the partial sums the kernels' reductions read, so a test can check that each
// tensor's partials are read a fixed number of times, not once per block of the tensor.
namespace casmo {
inline std::atomic<int64_t> partials_read{0};
}
#define CASMO_COUNT_PARTIALS_READ(count) \
  do {                                     \
    if (threadIdx.x == 0) casmo::partials_read += (count); \
  } while (0)

#include <torch/extension.h>

#include "casmo_cuda_launch.h"
#include "casmo_ops.h"

namespace casmo {
namespace {

// Threads per emulated block. Smaller than the GPU's 512 (kCudaBlockSize): each
// __syncthreads is a barrier across real threads, and on a 2-core CI runner a
// 256-thread barrier cost ~3.6 ms against ~0.2 ms for 32 (measured with std::barrier),
// which would make the tests that overflow a launch take minutes. The kernels take the
// block size as a template parameter, so the same code runs; only the reduction trees
// are shallower (5 levels, not 9).
constexpr int kEmulatedBlockSize = 32;

struct EmulatedLauncher {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int blocks, int threads, Args&&... args) const {
    cuda_emulation::emulate_launch(static_cast<unsigned int>(blocks), static_cast<unsigned int>(threads),
                                   kernel, std::forward<Args>(args)...);
  }
};

}  // namespace

at::Tensor cuda_emulated_step(const TensorList& params, const TensorList& grads, const TensorList& ms,
                              const TensorList& ss, const std::vector<double>& steps,
                              const TensorList& step_tensors, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                              double eps, double weight_decay, double c_min, double robustness,
                              double rel_floor, int64_t chunk_size, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  constexpr const char* who = "casmo cuda_emulated_step";
  for (const at::Tensor& p : params)
    TORCH_CHECK(p.device().is_cpu(), who, ": the emulated CUDA kernels step CPU tensors, got ", p.device());
  const Hyper hyper = make_hyper(lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor);
  return cuda_kernels::step_from_aten<kEmulatedBlockSize>(who, params, grads, ms, ss, steps, step_tensors,
                                                          lr, lr_tensor, hyper, grad_scale, found_inf,
                                                          chunk_size, EmulatedLauncher{});
}

int64_t cuda_emulated_partials_read() { return partials_read.load(); }

std::vector<std::pair<std::string, int64_t>> cuda_launch_limits() {
  return {{"max_tensors", cuda_kernels::kMaxTensors},
          {"max_blocks", cuda_kernels::kMaxBlocks},
          {"block_size", cuda_kernels::kCudaBlockSize},
          {"emulated_block_size", kEmulatedBlockSize},
          {"default_chunk_size", cuda_kernels::kDefaultChunkSize}};
}

}  // namespace casmo
