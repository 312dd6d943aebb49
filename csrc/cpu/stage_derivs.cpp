// CPU kernel of hessmlp::stage_derivs: the shared per-element math of
// csrc/activations.h, exposed so that tests check it against autograd.
#include "../jet_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace hessmlp {
namespace cpu {
namespace {

at::Tensor stage_derivs_cpu(const at::Tensor& z_in, at::IntArrayRef act_codes,
                            at::ArrayRef<double> act_params) {
  const StageDerivsCall c = prepare_stage_derivs(z_in, act_codes, act_params);
  const int64_t N = c.z.numel();
  AT_DISPATCH_FLOATING_TYPES(c.z.scalar_type(), "stage_derivs_cpu", [&] {
    const scalar_t* zp = c.z.data_ptr<scalar_t>();
    scalar_t* o = c.out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Derivs<scalar_t> f = stage_eval<scalar_t>(c.stage, zp[i]);
        o[i] = f.s;
        o[N + i] = f.s1;
        o[2 * N + i] = f.s2;
        o[3 * N + i] = f.s3;
      }
    });
  });
  return c.out;
}

}  // namespace
}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("stage_derivs", &hessmlp::cpu::stage_derivs_cpu);
}
