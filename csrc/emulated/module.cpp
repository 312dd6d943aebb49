// The test-only emulated CUDA build's module (hessmlp._C_emulated): its import, the
// emulation's knobs for tests, and a kernel that tests the emulation itself (shared
// memory, __syncthreads, threads that return early). The ops' schemas are
// csrc/ops.cpp's, in the library hessmlp_emulated (csrc/library.h).
#include "../cuda/kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// `import hessmlp._C_emulated` loads this library, which runs the registrations.
PyMODINIT_FUNC PyInit__C_emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

namespace hessmlp {
namespace emu {
namespace {

// The launchers' grid cap (kernels.cuh's max_blocks()): cap > 0 lowers it, 0 restores
// the real one. Returns the previous setting.
int64_t set_grid_cap(int64_t cap) {
  TORCH_CHECK_VALUE(cap >= 0, "set_grid_cap: cap must be >= 0 (0: the real cap), got ", cap);
  return grid_cap().exchange(cap);
}

// [launches, blocks, threads, largest grid, launches with shared memory, grid-stride
// loop iterations, the most of them in one thread] since the last reset (emu::Stats);
// reset = true clears them after reading.
std::vector<int64_t> launch_stats(bool reset) {
  std::lock_guard<std::mutex> lk(state_mutex());
  Stats& s = stats();
  std::vector<int64_t> out{s.launches, s.blocks,          s.threads,  s.max_grid,
                           s.shared_launches, s.items, s.max_items};
  if (reset) s = Stats{};
  return out;
}

// Each of `active` threads of a block sums x[i] over its grid-stride share, the block
// adds those up by a tree in shared memory, and every active thread writes the block's
// sum: out[b * active + t]. Threads from `active` on return at once. Reads of shared
// memory before the barriers' writes would see NaN. Thread fail_thread of the last block
// throws after the first barrier (a test of the emulation: the launch must end, not hang).
template <typename T>
__global__ void block_sums_kernel(int64_t n, int active, int fail_thread, const T* x, T* out) {
  HM_DYNAMIC_SHARED(T, partial);  // active entries
  HM_SHARED(T, total, 1);
  const int t = static_cast<int>(threadIdx.x);
  if (t >= active) return;
  T acc = T(0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * active + t; i < n;
       i += static_cast<int64_t>(active) * gridDim.x) {
    acc += x[i];
  }
  partial[t] = acc;
  __syncthreads();
  if (t == fail_thread && blockIdx.x == gridDim.x - 1) {
    throw std::runtime_error("block_sums: thread " + std::to_string(t) + " fails");
  }
  for (int s = active / 2; s > 0; s /= 2) {
    if (t < s) partial[t] += partial[t + s];
    __syncthreads();
  }
  if (t == 0) total[0] = partial[0];
  __syncthreads();
  out[static_cast<int64_t>(blockIdx.x) * active + t] = total[0];
}

at::Tensor block_sums(const at::Tensor& x_in, int64_t blocks, int64_t threads, int64_t active,
                      bool shared, int64_t fail_thread) {
  TORCH_CHECK_VALUE(x_in.dim() == 1 && x_in.is_floating_point(), "block_sums: x must be 1-d float");
  TORCH_CHECK_VALUE(active >= 1 && (active & (active - 1)) == 0 && (threads < 1 || active <= threads),
                    "block_sums: active must be a power of two <= threads");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::full({std::max<int64_t>(blocks, 0) * active}, NAN, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_sums", [&] {
    const dim3 grid(static_cast<unsigned int>(blocks)), block(static_cast<unsigned int>(threads));
    const size_t smem = static_cast<size_t>(active) * sizeof(scalar_t);
    const auto stream = cuda::current_stream();
    if (shared) {
      HM_LAUNCH_SHARED(grid, block, smem, stream, block_sums_kernel<scalar_t>)(
          x.numel(), static_cast<int>(active), static_cast<int>(fail_thread),
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    } else {
      HM_LAUNCH(grid, block, smem, stream, block_sums_kernel<scalar_t>)(
          x.numel(), static_cast<int>(active), static_cast<int>(fail_thread),
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    }
    HM_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace emu
}  // namespace hessmlp

TORCH_LIBRARY_FRAGMENT(hessmlp_emulated, m) {
  m.def("set_grid_cap(int cap) -> int", &hessmlp::emu::set_grid_cap);
  m.def("launch_stats(bool reset=False) -> int[]", &hessmlp::emu::launch_stats);
  m.def("block_sums(Tensor x, int blocks, int threads, int active, bool shared, "
        "int fail_thread=-1) -> Tensor",
        &hessmlp::emu::block_sums);
}
