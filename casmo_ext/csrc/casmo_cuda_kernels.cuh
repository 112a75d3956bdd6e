// The CUDA kernels of the CASMO step, device code only, written once for two compilers:
//   - nvcc, from casmo_cuda.cu (through casmo_cuda_launch.h), launching on a GPU, and
//     from tools/check_ptxas.py, which checks their registers without a GPU;
//   - the host compiler, from casmo_cuda_emulated.cpp, after cuda_emulation.h, which
//     runs the same kernels on the CPU with one std::thread per CUDA thread.
// casmo_cuda_launch.h packs a parameter group into their launches.
//
// A group steps in four stages, all on the device's stream, with no host sync:
//   1. moments_kernel launches: each block updates m and s over one chunk of one
//      tensor (unscaling g in place under a GradScaler) and writes the chunk's sum of
//      agar_i (float64) to agar_partials.
//   2. tensor_sums_kernel launches, only after ALL stage-1 launches (a tensor's chunks
//      may span launches): one block per tensor sums its chunks' partials into
//      tensor_agar_sums, so each tensor's partials are read once, not once per block.
//   3. update_kernel launches: each block derives its tensor's gate from that sum,
//      updates its chunk of p and writes the chunk's sum of C_i to conf_partials.
//   4. group_sums_kernel: one block sums all partials into [sum agar_i, sum C_i].
// Every sum is a fixed-order shared-memory tree (no atomics), so results are bitwise
// reproducible. Every kernel is launched with kBlockSize threads and says so
// (__launch_bounds__): ptxas then keeps to the registers that many threads may have,
// also when a newer GPU compiles the PTX at load time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "casmo_math.h"

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
  double* tensor_agar_sums;  // a tensor's sum of agar_i, at its partial_offset
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

// The emulation counts the partial sums that reductions read (casmo_cuda_emulated.cpp);
// on a GPU this is nothing.
#ifndef CASMO_COUNT_PARTIALS_READ
#define CASMO_COUNT_PARTIALS_READ(count)
#endif

// Sum of values[0, count) in an order fixed by kBlockSize alone, returned to every
// thread: each thread adds a strided subsequence, then the block sums the threads.
template <int kBlockSize>
__device__ __forceinline__ double block_sum_range(const double* values, int64_t count,
                                                  double* buffer) {
  CASMO_COUNT_PARTIALS_READ(count);
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
__global__ void __launch_bounds__(kBlockSize) moments_kernel(LaunchArgs<scalar_t> args) {
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

// Stage 2: each tensor's sum of agar_i, once, by one block: block b serves slot
// first_slot + b. first_slot is 1 when slot 0 continues a tensor that an earlier launch
// began, and so sums.
template <typename scalar_t, int kBlockSize>
__global__ void __launch_bounds__(kBlockSize)
    tensor_sums_kernel(LaunchArgs<scalar_t> args, int first_slot) {
  __shared__ double reduction_buffer[kBlockSize];
  if (step_skipped(args.found_inf)) return;
  const int slot = first_slot + static_cast<int>(blockIdx.x);
  const int64_t offset = args.partial_offset[slot];
  const double sum = block_sum_range<kBlockSize>(args.agar_partials + offset,
                                                 num_chunks(args.numel[slot], args.chunk_size), reduction_buffer);
  if (threadIdx.x == 0) args.tensor_agar_sums[offset] = sum;
}

// Stage 3: the gated update of one chunk of p; the chunk's sum of C_i into conf_partials.
template <typename scalar_t, int kBlockSize>
__global__ void __launch_bounds__(kBlockSize) update_kernel(LaunchArgs<scalar_t> args) {
  __shared__ double reduction_buffer[kBlockSize];
  if (step_skipped(args.found_inf)) return;
  const BlockChunk c = block_chunk(args);
  const Hyper h = block_hyper(args);
  const MomentConsts mc = block_moment_consts(args, c.slot);
  const double tensor_agar_sum = args.tensor_agar_sums[args.partial_offset[c.slot]];
  const GateConsts gc = gate_consts(h, tensor_agar_sum, static_cast<double>(args.numel[c.slot]));
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

// Stage 4 (one block): out = [sum of agar partials, sum of conf partials]; zeros when the
// step was skipped (the partials were never written).
template <int kBlockSize>
__global__ void __launch_bounds__(kBlockSize)
    group_sums_kernel(const double* agar_partials, const double* conf_partials, int64_t count,
                      const float* found_inf, double* out) {
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

}  // namespace cuda_kernels
}  // namespace casmo
