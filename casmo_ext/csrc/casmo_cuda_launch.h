// The host side of the CUDA kernels (casmo_cuda_kernels.cuh): from ATen tensors to
// launches, written once for two launchers, a template parameter:
//   - casmo_cuda.cu launches on the current CUDA stream;
//   - casmo_cuda_emulated.cpp runs the launches on the CPU through cuda_emulation.h,
//     included before this header.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "casmo_cuda_kernels.cuh"
#include "casmo_ops.h"

namespace casmo {
namespace cuda_kernels {

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
// tensors and kMaxBlocks chunks, calling launch_one(args, num_blocks, num_slots) for
// each. A tensor whose chunks overflow a launch continues, in slot 0, in the next one.
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
    launch_one(args, num_blocks, num_slots);
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

// Runs the four stages for one group. `launch(kernel, blocks, threads, args...)`
// launches a kernel; the partials arrays (and tensor_agar_sums) hold
// total_chunks(tensors, chunk_size) doubles each, and out two doubles.
template <typename scalar_t, int kBlockSize, typename Launcher>
void step_group(const std::vector<TensorRefs<scalar_t>>& tensors, const LaunchArgs<scalar_t>& common,
                double* out, Launcher&& launch) {
  for (const auto& t : tensors)
    TORCH_CHECK(num_chunks(t.numel, common.chunk_size) <= INT32_MAX,
                "casmo: a tensor of ", t.numel, " elements has too many chunks of ", common.chunk_size);
  for_each_launch(tensors, common, [&](const LaunchArgs<scalar_t>& args, int blocks, int) {
    launch(moments_kernel<scalar_t, kBlockSize>, blocks, kBlockSize, args);
  });
  // Only now is every tensor's agar partials complete. A launch's slot 0 whose first
  // block is not chunk 0 continues a tensor that the previous launch sums.
  for_each_launch(tensors, common, [&](const LaunchArgs<scalar_t>& args, int, int slots) {
    const int first_slot = args.block_chunk[0] == 0 ? 0 : 1;
    if (slots > first_slot)
      launch(tensor_sums_kernel<scalar_t, kBlockSize>, slots - first_slot, kBlockSize, args, first_slot);
  });
  for_each_launch(tensors, common, [&](const LaunchArgs<scalar_t>& args, int blocks, int) {
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
    at::Tensor partials = at::empty({3, chunks}, options);
    LaunchArgs<scalar_t> common;
    common.hyper = h;
    common.lr_device = lr_on_device.defined() ? lr_on_device.data_ptr<float>() : nullptr;
    common.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
    common.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
    common.step_on_device = step_on_device;
    common.chunk_size = chunk_size;
    common.agar_partials = partials[0].data_ptr<double>();
    common.conf_partials = partials[1].data_ptr<double>();
    common.tensor_agar_sums = partials[2].data_ptr<double>();
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
