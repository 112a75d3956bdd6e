// The CUDA kernels of the CASMO step and the host code that packs a parameter group
// into launches, written once for two compilers:
//   - nvcc, from casmo_cuda.cu, launching on a GPU;
//   - the host compiler, from casmo_cuda_emulated.cpp, after cuda_emulation.h, which
//     runs the same kernels on the CPU with one std::thread per CUDA thread.
// The launch mechanism is a template parameter ("launcher"), so the packing is shared.
//
// A group steps in three stages, all on the device's stream, with no host sync:
//   1. moments_kernel launches: each block updates m and s over one chunk of one
//      tensor and writes the chunk's sum of agar_i (float64) to agar_partials.
//   2. update_kernel launches, only after ALL stage-1 launches (a tensor's chunks may
//      span launches): each block sums its tensor's agar partials, derives the gate,
//      updates its chunk of p and writes the chunk's sum of C_i to conf_partials.
//   3. group_sums_kernel: one block sums all partials into [sum agar_i, sum C_i].
// Every sum is a fixed-order shared-memory tree (no atomics), so results are bitwise
// reproducible, and every block of a tensor derives bitwise the same gate.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "casmo_math.h"
#include "casmo_ops.h"

// Full unrolling keeps the kernels' per-thread arrays in registers (the emulation's
// host compiler needs no hint).
#if defined(__CUDACC__)
#define CASMO_UNROLL _Pragma("unroll")
#else
#define CASMO_UNROLL
#endif

namespace casmo {
namespace cuda_kernels {

// Launch-packing limits. The argument struct is passed by value as a kernel
// parameter, which must stay under the classic 4 KB limit (see the static_assert).
constexpr int kMaxTensors = 32;   // tensors per launch; a block's tensor index is a uint8
constexpr int kMaxBlocks = 320;   // chunks (= blocks) per launch
constexpr int64_t kDefaultChunkSize = 65536;  // elements per block on a real GPU
constexpr int kCudaBlockSize = 512;           // threads per block (a power of two)
constexpr int kIlp = 4;                       // elements loaded ahead per thread

// A tensor's step count after this step: a host value, or (capturable) a pointer to a
// float32 on the device, read inside the kernel so a CUDA graph replays correctly.
union StepCount {
  double value;
  const float* device_ptr;
};

template <typename scalar_t>
struct LaunchArgs {
  Hyper hyper;
  const float* lr_device;  // when non-null, lr is read here (overrides hyper.lr)
  const float* grad_scale;  // GradScaler's scale on the device, or null (no unscaling)
  const float* found_inf;   // when non-null and nonzero, the step is skipped
  bool step_on_device;     // which member of StepCount is set
  int64_t chunk_size;
  double* agar_partials;  // one per chunk of the group, tensor after tensor
  double* conf_partials;
  scalar_t* params[kMaxTensors];
  scalar_t* grads[kMaxTensors];  // written (unscaled) when grad_scale is set
  scalar_t* ms[kMaxTensors];
  scalar_t* ss[kMaxTensors];
  int64_t numel[kMaxTensors];
  StepCount step[kMaxTensors];
  int64_t partial_offset[kMaxTensors];  // index of the tensor's first chunk in the partials
  uint8_t block_tensor[kMaxBlocks];     // block -> slot in the arrays above
  int32_t block_chunk[kMaxBlocks];      // block -> chunk index within its tensor
};
static_assert(sizeof(LaunchArgs<float>) <= 4096, "kernel arguments must stay under 4 KB");
static_assert(kMaxTensors <= 256, "block_tensor is a uint8");

// Rounds a float32 to the storage dtype and back: AGAR is computed from the moments
// as stored, so that pass 2 (which reloads them) sees the same agar_i as pass 1.
template <typename scalar_t>
__device__ __forceinline__ float round_to_storage(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Sum of `value` over the block's kBlockSize threads, in a fixed tree order, returned
// to every thread. `buffer` is kBlockSize doubles of shared memory.
template <int kBlockSize>
__device__ __forceinline__ double block_sum(double value, double* buffer) {
  const unsigned tid = threadIdx.x;
  buffer[tid] = value;
  __syncthreads();
  for (unsigned stride = kBlockSize / 2; stride > 0; stride >>= 1) {
    if (tid < stride) buffer[tid] += buffer[tid + stride];
    __syncthreads();
  }
  const double total = buffer[0];
  __syncthreads();  // the buffer is free again once every thread has read the total
  return total;
}

// Sum of values[0, count) in an order fixed by kBlockSize alone, returned to every
// thread: each thread adds a strided subsequence, then the block sums the threads.
template <int kBlockSize>
__device__ __forceinline__ double block_sum_range(const double* values, int64_t count,
                                                  double* buffer) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kBlockSize) acc += values[i];
  return block_sum<kBlockSize>(acc, buffer);
}

CASMO_HD int64_t num_chunks(int64_t numel, int64_t chunk_size) {
  return (numel + chunk_size - 1) / chunk_size;
}

// The block's chunk: tensor slot, first element, element count.
struct BlockChunk {
  int slot;
  int64_t chunk;
  int64_t begin;
  int64_t count;
};

template <typename scalar_t>
__device__ __forceinline__ BlockChunk block_chunk(const LaunchArgs<scalar_t>& args) {
  BlockChunk c;
  c.slot = args.block_tensor[blockIdx.x];
  c.chunk = args.block_chunk[blockIdx.x];
  c.begin = c.chunk * args.chunk_size;  // int64: tensors may exceed 2^31 elements
  const int64_t left = args.numel[c.slot] - c.begin;
  c.count = left < args.chunk_size ? left : args.chunk_size;
  return c;
}

template <typename scalar_t>
__device__ __forceinline__ MomentConsts block_moment_consts(const LaunchArgs<scalar_t>& args,
                                                            int slot) {
  const double step = args.step_on_device ? static_cast<double>(*args.step[slot].device_ptr)
                                          : args.step[slot].value;
  return moment_consts(args.hyper, step);
}

template <typename scalar_t>
__device__ __forceinline__ Hyper block_hyper(const LaunchArgs<scalar_t>& args) {
  Hyper h = args.hyper;
  if (args.lr_device != nullptr) h.lr = *args.lr_device;
  if (args.grad_scale != nullptr) h.inv_grad_scale = inv_grad_scale(*args.grad_scale);
  return h;
}

// GradScaler found an inf or NaN gradient: every block leaves its chunk as it was. Read
// on the device, so skipping needs no host sync.
__device__ __forceinline__ bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// One round of a thread's loads: elements base + u * kBlockSize (u < kIlp) of three
// tensors, as float; those past `count` stay as they were.
template <int kBlockSize, typename scalar_t>
__device__ __forceinline__ void load_round(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                           const scalar_t* __restrict__ c, int64_t base, int64_t count,
                                           float (&a_out)[kIlp], float (&b_out)[kIlp], float (&c_out)[kIlp]) {
  CASMO_UNROLL
  for (int u = 0; u < kIlp; ++u) {
    const int64_t i = base + u * kBlockSize;
    if (i < count) {
      a_out[u] = static_cast<float>(a[i]);
      b_out[u] = static_cast<float>(b[i]);
      c_out[u] = static_cast<float>(c[i]);
    }
  }
}

// Stage 1: m, s of one chunk; the chunk's sum of agar_i into agar_partials. Under a
// GradScaler the unscaled gradient is written back, as torch's fused Adam does.
template <typename scalar_t, int kBlockSize>
__global__ void moments_kernel(LaunchArgs<scalar_t> args) {
  __shared__ double reduction_buffer[kBlockSize];
  if (step_skipped(args.found_inf)) return;  // the whole block: no __syncthreads is left waiting
  const BlockChunk c = block_chunk(args);
  const Hyper h = block_hyper(args);
  const MomentConsts mc = block_moment_consts(args, c.slot);
  const bool store_grad = args.grad_scale != nullptr;
  scalar_t* __restrict__ g = args.grads[c.slot] + c.begin;
  scalar_t* __restrict__ m = args.ms[c.slot] + c.begin;
  scalar_t* __restrict__ s = args.ss[c.slot] + c.begin;

  // kIlp elements per thread per round, all loaded before any is computed, so each
  // thread keeps several loads in flight. Thread t still visits t, t + kBlockSize,
  // t + 2 kBlockSize, ... in that order, so the sums do not depend on kIlp.
  double agar_acc = 0.0;
  for (int64_t base = threadIdx.x; base < c.count; base += kIlp * kBlockSize) {
    float gi[kIlp] = {}, mi[kIlp] = {}, si[kIlp] = {};
    load_round<kBlockSize>(g, m, s, base, c.count, gi, mi, si);
    CASMO_UNROLL
    for (int u = 0; u < kIlp; ++u) {
      const int64_t i = base + u * kBlockSize;
      if (i < c.count) {
        const float unscaled = unscale(gi[u], h);
        if (store_grad) g[i] = static_cast<scalar_t>(unscaled);
        update_moments(unscaled, mi[u], si[u], h);
        m[i] = static_cast<scalar_t>(mi[u]);
        s[i] = static_cast<scalar_t>(si[u]);
        float m_hat, total;
        agar_acc += agar(round_to_storage<scalar_t>(mi[u]), round_to_storage<scalar_t>(si[u]), mc, m_hat,
                         total);
      }
    }
  }
  const double agar_sum = block_sum<kBlockSize>(agar_acc, reduction_buffer);
  if (threadIdx.x == 0) args.agar_partials[args.partial_offset[c.slot] + c.chunk] = agar_sum;
}

// Stage 2: the gated update of one chunk of p; the chunk's sum of C_i into conf_partials.
template <typename scalar_t, int kBlockSize>
__global__ void update_kernel(LaunchArgs<scalar_t> args) {
  __shared__ double reduction_buffer[kBlockSize];
  if (step_skipped(args.found_inf)) return;
  const BlockChunk c = block_chunk(args);
  const Hyper h = block_hyper(args);
  const MomentConsts mc = block_moment_consts(args, c.slot);
  const int64_t numel = args.numel[c.slot];
  const double tensor_agar_sum = block_sum_range<kBlockSize>(
      args.agar_partials + args.partial_offset[c.slot], num_chunks(numel, args.chunk_size),
      reduction_buffer);
  const GateConsts gc = gate_consts(h, tensor_agar_sum, static_cast<double>(numel));
  scalar_t* __restrict__ p = args.params[c.slot] + c.begin;
  const scalar_t* __restrict__ m = args.ms[c.slot] + c.begin;
  const scalar_t* __restrict__ s = args.ss[c.slot] + c.begin;

  double conf_acc = 0.0;  // rounds of kIlp elements, as in moments_kernel
  for (int64_t base = threadIdx.x; base < c.count; base += kIlp * kBlockSize) {
    float pi[kIlp] = {}, mi[kIlp] = {}, si[kIlp] = {};
    load_round<kBlockSize>(p, m, s, base, c.count, pi, mi, si);
    CASMO_UNROLL
    for (int u = 0; u < kIlp; ++u) {
      const int64_t i = base + u * kBlockSize;
      if (i < c.count) {
        float m_hat, total, confidence;
        const float agar_i = agar(mi[u], si[u], mc, m_hat, total);
        p[i] = static_cast<scalar_t>(apply_update(pi[u], m_hat, total, agar_i, h, gc, confidence));
        conf_acc += confidence;
      }
    }
  }
  const double conf_sum = block_sum<kBlockSize>(conf_acc, reduction_buffer);
  if (threadIdx.x == 0) args.conf_partials[args.partial_offset[c.slot] + c.chunk] = conf_sum;
}

// Stage 3 (one block): out = [sum of agar partials, sum of conf partials]; zeros when the
// step was skipped (the partials were never written).
template <int kBlockSize>
__global__ void group_sums_kernel(const double* agar_partials, const double* conf_partials,
                                  int64_t count, const float* found_inf, double* out) {
  __shared__ double reduction_buffer[kBlockSize];
  if (step_skipped(found_inf)) {
    if (threadIdx.x == 0) out[0] = out[1] = 0.0;
    return;
  }
  const double agar_sum = block_sum_range<kBlockSize>(agar_partials, count, reduction_buffer);
  const double conf_sum = block_sum_range<kBlockSize>(conf_partials, count, reduction_buffer);
  if (threadIdx.x == 0) {
    out[0] = agar_sum;
    out[1] = conf_sum;
  }
}

// ---------------------------------------------------------------------------------
// Host side: from ATen tensors to launches.

// One tensor of the group, as raw pointers.
template <typename scalar_t>
struct TensorRefs {
  scalar_t* param;
  scalar_t* grad;
  scalar_t* m;
  scalar_t* s;
  int64_t numel;
  StepCount step;
};

// The group's total chunk count: the length of each partials array.
template <typename scalar_t>
int64_t total_chunks(const std::vector<TensorRefs<scalar_t>>& tensors, int64_t chunk_size) {
  int64_t total = 0;
  for (const auto& t : tensors) total += num_chunks(t.numel, chunk_size);
  return total;
}

// Packs every chunk of every non-empty tensor into LaunchArgs of at most kMaxTensors
// tensors and kMaxBlocks chunks, calling launch_one(args, num_blocks) for each. A
// tensor whose chunks overflow a launch continues, in slot 0, in the next one.
template <typename scalar_t, typename LaunchOne>
void for_each_launch(const std::vector<TensorRefs<scalar_t>>& tensors, const LaunchArgs<scalar_t>& common,
                     LaunchOne&& launch_one) {
  LaunchArgs<scalar_t> args = common;
  int num_slots = 0, num_blocks = 0;
  int64_t partial_offset = 0;
  auto put_in_slot = [&](int slot, const TensorRefs<scalar_t>& t, int64_t offset) {
    args.params[slot] = t.param;
    args.grads[slot] = t.grad;
    args.ms[slot] = t.m;
    args.ss[slot] = t.s;
    args.numel[slot] = t.numel;
    args.step[slot] = t.step;
    args.partial_offset[slot] = offset;
  };
  auto flush = [&]() {
    launch_one(args, num_blocks);
    num_slots = num_blocks = 0;
  };
  for (const TensorRefs<scalar_t>& t : tensors) {
    if (t.numel == 0) continue;  // no chunks, no partials
    if (num_slots == kMaxTensors) flush();
    int slot = num_slots++;
    put_in_slot(slot, t, partial_offset);
    const int64_t chunks = num_chunks(t.numel, common.chunk_size);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (num_blocks == kMaxBlocks) {
        flush();
        slot = num_slots++;
        put_in_slot(slot, t, partial_offset);
      }
      args.block_tensor[num_blocks] = static_cast<uint8_t>(slot);
      args.block_chunk[num_blocks] = static_cast<int32_t>(chunk);
      ++num_blocks;
    }
    partial_offset += chunks;
  }
  if (num_blocks > 0) flush();
}

// Runs the three stages for one group. `launch(kernel, blocks, threads, args...)`
// launches a kernel; the partials arrays hold total_chunks(tensors, chunk_size)
// doubles each, and out two doubles.
template <typename scalar_t, int kBlockSize, typename Launcher>
void step_group(const std::vector<TensorRefs<scalar_t>>& tensors, const LaunchArgs<scalar_t>& common,
                double* out, Launcher&& launch) {
  for (const auto& t : tensors)
    TORCH_CHECK(num_chunks(t.numel, common.chunk_size) <= INT32_MAX,
                "casmo: a tensor of ", t.numel, " elements has too many chunks of ", common.chunk_size);
  for_each_launch(tensors, common, [&](const LaunchArgs<scalar_t>& args, int blocks) {
    launch(moments_kernel<scalar_t, kBlockSize>, blocks, kBlockSize, args);
  });
  // Only now is every tensor's agar partials complete.
  for_each_launch(tensors, common, [&](const LaunchArgs<scalar_t>& args, int blocks) {
    launch(update_kernel<scalar_t, kBlockSize>, blocks, kBlockSize, args);
  });
  launch(group_sums_kernel<kBlockSize>, 1, kBlockSize, static_cast<const double*>(common.agar_partials),
         static_cast<const double*>(common.conf_partials), total_chunks(tensors, common.chunk_size),
         common.found_inf, out);
}

// The whole entry point of a backend, from ATen arguments: validates them (the caller
// checks the device type), packs the group and runs step_group with `launch`. `who`
// names the entry point in errors.
// Non-capturable: `steps` holds each tensor's step count and step_tensors is empty.
// Capturable: `steps` is empty and step_tensors holds one float32 scalar per tensor on
// the tensors' device. lr_tensor (optional) on the tensors' device is read in the
// kernel; on the CPU (with device tensors) its value is read here, without a sync.
// grad_scale and found_inf (optional, GradScaler's) are float32 scalars on the tensors'
// device, read in the kernels; with grad_scale the gradients are unscaled in place
// (unless found_inf skips the step). Returns float64 [sum agar_i, sum C_i] on the tensors'
// device (zeros for a skipped step).
template <int kBlockSize, typename Launcher>
at::Tensor step_from_aten(const char* who, const std::vector<at::Tensor>& params,
                          const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& ms,
                          const std::vector<at::Tensor>& ss, const std::vector<double>& steps,
                          const std::vector<at::Tensor>& step_tensors, double lr,
                          const std::optional<at::Tensor>& lr_tensor, const Hyper& hyper,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          int64_t chunk_size, Launcher&& launch) {
  check_tensor_lists(params, grads, ms, ss, who);
  TORCH_CHECK(chunk_size > 0, who, ": chunk_size must be positive, got ", chunk_size);
  const size_t n = params.size();
  const bool step_on_device = !step_tensors.empty();
  TORCH_CHECK(step_on_device ? (steps.empty() && step_tensors.size() == n) : steps.size() == n, who,
              ": pass one step count per tensor, either as floats (steps) or, when capturable, as "
              "float32 tensors on the parameters' device (step_tensors), not both");
  if (n == 0) return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  const at::Device device = params[0].device();
  for (size_t i = 0; step_on_device && i < n; ++i) {
    TORCH_CHECK(step_tensors[i].device() == device && step_tensors[i].scalar_type() == at::kFloat &&
                    step_tensors[i].numel() == 1,
                who, ": step tensor ", i, " must be a one-element float32 tensor on ", device, ", got ",
                step_tensors[i].scalar_type(), " of ", step_tensors[i].numel(), " elements on ",
                step_tensors[i].device());
  }

  for (const auto* scalar : {&grad_scale, &found_inf}) {
    TORCH_CHECK(!scalar->has_value() || ((*scalar)->device() == device && (*scalar)->scalar_type() == at::kFloat &&
                                         (*scalar)->numel() == 1),
                who, ": grad_scale and found_inf must be one-element float32 tensors on ", device);
  }
  Hyper h = hyper;
  h.lr = static_cast<float>(lr);
  at::Tensor lr_on_device;  // keeps a converted lr tensor alive until the launches are queued
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->numel() == 1, who, ": lr tensor must have one element, got ",
                lr_tensor->numel());
    if (lr_tensor->device() == device) {
      lr_on_device = lr_tensor->to(at::kFloat);
    } else {
      TORCH_CHECK(lr_tensor->device().is_cpu(), who, ": lr tensor is on ", lr_tensor->device(),
                  " but the parameters are on ", device);
      h.lr = lr_tensor->item<float>();  // a CPU tensor: no device sync
    }
  }

  const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor out = at::empty({2}, options);
  auto run = [&](auto type_tag) -> at::Tensor {
    using scalar_t = decltype(type_tag);
    std::vector<TensorRefs<scalar_t>> refs(n);
    for (size_t i = 0; i < n; ++i) {
      refs[i].param = params[i].data_ptr<scalar_t>();
      refs[i].grad = grads[i].data_ptr<scalar_t>();
      refs[i].m = ms[i].data_ptr<scalar_t>();
      refs[i].s = ss[i].data_ptr<scalar_t>();
      refs[i].numel = params[i].numel();
      if (step_on_device)
        refs[i].step.device_ptr = step_tensors[i].data_ptr<float>();
      else
        refs[i].step.value = steps[i];
    }
    const int64_t chunks = total_chunks(refs, chunk_size);
    if (chunks == 0) return out.zero_();
    at::Tensor partials = at::empty({2, chunks}, options);
    LaunchArgs<scalar_t> common;
    common.hyper = h;
    common.lr_device = lr_on_device.defined() ? lr_on_device.data_ptr<float>() : nullptr;
    common.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
    common.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
    common.step_on_device = step_on_device;
    common.chunk_size = chunk_size;
    common.agar_partials = partials[0].data_ptr<double>();
    common.conf_partials = partials[1].data_ptr<double>();
    step_group<scalar_t, kBlockSize>(refs, common, out.data_ptr<double>(), launch);
    return out;
  };
  switch (params[0].scalar_type()) {
    case at::kFloat:
      return run(float{});
    case at::kBFloat16:
      return run(c10::BFloat16{});
    default:  // check_tensor_lists admits only float32, bfloat16 and float16
      return run(c10::Half{});
  }
}

}  // namespace cuda_kernels
}  // namespace casmo
