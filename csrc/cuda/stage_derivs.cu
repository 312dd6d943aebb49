// CUDA kernel of hessmlp::stage_derivs: the shared per-element math of
// csrc/activations.h on the device, for tests against autograd.
#include "kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace hessmlp {
namespace cuda {
namespace {

template <typename T>
__global__ void stage_derivs_kernel(int64_t N, StageDesc stage, const T* z, T* out) {
  HM_GRID_LOOP(i, N) {
    const Derivs<T> f = stage_eval<T>(stage, z[i]);
    out[i] = f.s;
    out[N + i] = f.s1;
    out[2 * N + i] = f.s2;
    out[3 * N + i] = f.s3;
  }
}

at::Tensor stage_derivs_cuda(const at::Tensor& z_in, at::IntArrayRef act_codes,
                             at::ArrayRef<double> act_params) {
  const c10::DeviceGuard guard(z_in.device());
  const StageDerivsCall c = prepare_stage_derivs(z_in, act_codes, act_params);
  const int64_t N = c.z.numel();
  if (N == 0) return c.out;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(c.z.scalar_type(), "stage_derivs_cuda", [&] {
    HM_LAUNCH(blocks_for(N), kThreads, 0, stream, stage_derivs_kernel<scalar_t>)(
        N, c.stage, c.z.data_ptr<scalar_t>(), c.out.data_ptr<scalar_t>());
    HM_LAUNCH_CHECK();
  });
  return c.out;
}

}  // namespace
}  // namespace cuda
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(HESSMLP_LIBRARY, HESSMLP_CUDA_KEY, m) {
  m.impl("stage_derivs", &hessmlp::cuda::stage_derivs_cuda);
}
