// The CPU kernel's two passes over one contiguous range of one tensor, as ATen builds
// its own kernels: casmo_cpu_kernel.cpp is compiled once per CPU capability (setup.py
// sets CPU_CAPABILITY and the instruction-set flags), each copy in its own namespace,
// and casmo_cpu.cpp picks one at run time from the capability torch reports.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "casmo_math.h"

namespace casmo::cpu {

// Elements of one work item of a large tensor. Sums are added up per item and the items
// in a fixed order, so results do not depend on the thread count.
constexpr int64_t kChunk = 16384;

template <typename scalar_t>
struct Passes {
  // Pass 1 over n elements: moments updated in place, and g unscaled in place when
  // h.inv_grad_scale is not 1; returns the sum of agar_i.
  double (*moments)(scalar_t* g, scalar_t* m, scalar_t* s, int64_t n, const Hyper& h, const MomentConsts& mc);
  // Pass 2 over n elements: parameters updated in place; returns the sum of C_i.
  double (*update)(scalar_t* p, const scalar_t* m, const scalar_t* s, int64_t n, const Hyper& h,
                   const MomentConsts& mc, const GateConsts& gc);
};

#define CASMO_DECLARE_CAPABILITY(capability) \
  namespace capability {                     \
  template <typename scalar_t>               \
  Passes<scalar_t> passes();                 \
  }

CASMO_DECLARE_CAPABILITY(DEFAULT)
// Keep in step with CPU_CAPABILITIES in setup.py.
#if defined(__x86_64__) || defined(_M_X64)
#define CASMO_CPU_X86 1
CASMO_DECLARE_CAPABILITY(AVX2)
CASMO_DECLARE_CAPABILITY(AVX512)
#endif
#undef CASMO_DECLARE_CAPABILITY

}  // namespace casmo::cpu
