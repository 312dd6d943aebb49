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
  TORCH_CHECK_TYPE(z_in.scalar_type() == at::kFloat || z_in.scalar_type() == at::kDouble,
                   "hessmlp: z must be float32 or float64, got ", z_in.scalar_type());
  const StageDesc st = make_stage(act_codes, act_params);
  const at::Tensor z = z_in.contiguous();
  std::vector<int64_t> shape{4};
  shape.insert(shape.end(), z.sizes().begin(), z.sizes().end());
  at::Tensor out = at::empty(shape, z.options());
  const int64_t N = z.numel();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "stage_derivs_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Derivs<scalar_t> f = stage_eval<scalar_t>(st, zp[i]);
        o[i] = f.s;
        o[N + i] = f.s1;
        o[2 * N + i] = f.s2;
        o[3 * N + i] = f.s3;
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("stage_derivs", &hessmlp::cpu::stage_derivs_cpu);
}
