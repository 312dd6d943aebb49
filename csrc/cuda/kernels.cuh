// The CUDA elementwise passes (see Kernels in csrc/jet_driver.h): one thread
// per (sample, neuron) or (sample, output), calling the shared per-neuron math
// of csrc/jet_math.h. 64-bit indices, grid-stride loops, the current stream.
//
// The same sources also build as host C++ with HESSMLP_EMULATE_CUDA (the test-only
// emulated build, csrc/emulated): launches, the launch check and the stream go
// through the macros below, which are CUDA's own under nvcc.
#pragma once

#include "../jet_driver.h"
#include "../library.h"

#include <algorithm>
#include <cstdint>

#if defined(HESSMLP_EMULATE_CUDA)
#include "../emulated/cuda_emulation.h"
// The kernels' dispatch key: the emulated ops take CPU tensors.
#define HESSMLP_CUDA_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#define HESSMLP_CUDA_KEY CUDA
#endif

// kernel<<<grid, block, smem, stream>>>(args...) is written
//   HM_LAUNCH(grid, block, smem, stream, kernel)(args...)
// for a kernel whose threads neither share memory nor wait for each other, and
//   HM_LAUNCH_SHARED(grid, block, smem, stream, kernel)(args...)
// for one that uses __syncthreads or shared memory, declared in the kernel with
// HM_SHARED(T, name, count) (a static array) or HM_DYNAMIC_SHARED(T, name) (the launch's
// smem bytes). HM_LAUNCH_CHECK() follows every launch.
#if defined(HESSMLP_EMULATE_CUDA)
#define HM_LAUNCH(grid, block, smem, stream, ...) \
  ::hessmlp::emu::launcher(&__VA_ARGS__, grid, block, smem, stream, false)
#define HM_LAUNCH_SHARED(grid, block, smem, stream, ...) \
  ::hessmlp::emu::launcher(&__VA_ARGS__, grid, block, smem, stream, true)
#define HM_LAUNCH_CHECK() ::hessmlp::emu::launch_check()
#define HM_SHARED(T, name, count)          \
  static const char hm_shared_##name = 0; \
  T* name = ::hessmlp::emu::static_shared<T>(&hm_shared_##name, count)
#define HM_DYNAMIC_SHARED(T, name) T* name = ::hessmlp::emu::dynamic_shared<T>()
#else
#define HM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define HM_LAUNCH_SHARED(grid, block, smem, stream, ...) \
  __VA_ARGS__<<<grid, block, smem, stream>>>
#define HM_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define HM_SHARED(T, name, count) __shared__ T name[count]
#define HM_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(16) unsigned char hm_smem_[]; \
  T* name = reinterpret_cast<T*>(hm_smem_)
#endif

namespace hessmlp {
namespace cuda {

#if defined(HESSMLP_EMULATE_CUDA)
inline emu::Stream current_stream() { return {}; }
#else
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
#endif

// The GPU takes the whole batch at once.
#define HESSMLP_ROWS_PER_BLOCK nullptr
#define HESSMLP_MM &aten_mm
HESSMLP_DECLARE_KERNELS()
#undef HESSMLP_ROWS_PER_BLOCK
#undef HESSMLP_MM

constexpr int kThreads = 256;

// The most blocks a launcher asks for; the grid-stride loops cover the rest. (The
// emulated build lets tests lower it, so that the loops go round several times.)
inline int64_t max_blocks() {
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
#if defined(HESSMLP_EMULATE_CUDA)
  const int64_t cap = emu::grid_cap().load();
  if (cap > 0) return std::min(cap, kMaxBlocks);
#endif
  return kMaxBlocks;
}

// Blocks for `work` items at kThreads each (at least one: a grid must not be empty).
inline unsigned int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, max_blocks())));
}

// for (i over this thread's share of 0 .. total - 1): the grid-stride loop. (The emulated
// build counts its iterations: emu::Stats.)
#if defined(HESSMLP_EMULATE_CUDA)
#define HM_GRID_LOOP_COUNT && ::hessmlp::emu::grid_item()
#else
#define HM_GRID_LOOP_COUNT
#endif
#define HM_GRID_LOOP(i, total)                                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;          \
       i < (total) HM_GRID_LOOP_COUNT; i += static_cast<int64_t>(blockDim.x) * gridDim.x)

}  // namespace cuda
}  // namespace hessmlp
