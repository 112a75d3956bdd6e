// Just enough of CUDA to run casmo_cuda_kernels.cuh on the CPU, with the host compiler,
// so the kernels' indexing, packing and reductions are tested where there is no GPU.
//
// A launch runs its blocks one after another, each with blockDim.x REAL threads that
// meet at __syncthreads() on a barrier: a missing __syncthreads or a race on
// shared memory shows up as in a real block. Because blocks never overlap,
// __shared__ can be `static`: one copy per kernel, reused by block after block.
// Launches are serialised by a mutex, since `static` shared memory is process-wide.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for the host compiler only; nvcc has the real thing"
#endif

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// The built-in variables, per emulated thread.
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emulation {

// A reusable barrier for a fixed number of threads. C++20 has std::barrier, but torch
// 2.11 (for one) builds extensions as C++17, and this header must build there too.
// Waiting threads yield rather than sleep: blocks are small and barriers frequent.
class Barrier {
 public:
  explicit Barrier(unsigned int count) : count_(count) {}

  void arrive_and_wait() {
    // All count_ threads must arrive before generation_ moves, so it cannot move between
    // this load and this thread's arrival. The acq_rel arrivals and the release of the
    // new generation order every thread's writes before any thread leaves.
    const unsigned int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) std::this_thread::yield();
  }

 private:
  const unsigned int count_;
  std::atomic<unsigned int> arrived_{0};
  std::atomic<unsigned int> generation_{0};
};

// The barrier of the block being run; set by emulate_launch before its threads start.
inline Barrier* current_block_barrier = nullptr;

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// Runs kernel<<<grid, block>>>(args...) (1-D grids and blocks), returning when done.
template <typename... Params, typename... Args>
void emulate_launch(unsigned int grid, unsigned int block, void (*kernel)(Params...),
                    Args&&... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  Barrier block_barrier(block);
  current_block_barrier = &block_barrier;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned int tid = 0; tid < block; ++tid) {
    threads.emplace_back([&, tid]() {
      threadIdx = dim3{tid, 0, 0};
      blockDim = dim3{block, 1, 1};
      gridDim = dim3{grid, 1, 1};
      for (unsigned int b = 0; b < grid; ++b) {
        blockIdx = dim3{b, 0, 0};
        kernel(args...);
        block_barrier.arrive_and_wait();  // the next block may reuse shared memory
      }
    });
  }
  for (std::thread& t : threads) t.join();
  current_block_barrier = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::current_block_barrier->arrive_and_wait(); }
