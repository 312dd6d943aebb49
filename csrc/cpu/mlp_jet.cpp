// CPU kernels of hessmlp::mlp_jet: the stage pass of the forward jet, the
// unpacking of the last layer's columns, and reverse-Gram's weighted Gram.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace hessmlp {
namespace cpu {

void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2) {
  const int64_t n = a.n, d = a.d;
  const int64_t C = 1 + d + n_pairs(a.mode, d);
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(a);
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* s1p = s1.defined() ? s1.data_ptr<scalar_t>() : nullptr;
    scalar_t* s2p = s2.defined() ? s2.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, a.batch, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* t = in.t_of(b);
        const scalar_t* s = in.s_of(b);
        scalar_t* o = op + b * C * n;
        for (int64_t i = 0; i < n; ++i) {
          const Derivs<scalar_t> f = stage_eval<scalar_t>(a.stage, in.z_at(b, i));
          if (s1p) s1p[b * n + i] = f.s1;
          if (s2p) s2p[b * n + i] = f.s2;
          jet_step_neuron<scalar_t>(a.mode, d, f, t + i, s ? s + i : nullptr, n, o + i);
        }
      }
    });
  });
}

void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
            at::Tensor& hess) {
  const int64_t B = cols.size(0), C = cols.size(1), m = cols.size(2);
  const int64_t h_per = mode == Mode::None ? 0 : hess.numel() / (B * m);  // per (b, k)
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "mlp_jet_unpack_cpu", [&] {
    const scalar_t* cp = cols.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* jp = jac.data_ptr<scalar_t>();
    scalar_t* hp = h_per ? hess.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain_for(C * m), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < m; ++k) {
          const int64_t r = b * m + k;
          unpack_output<scalar_t>(mode, d, cp + b * C * m + k, m, vp + r, jp + r * d,
                                  hp ? hp + r * h_per : nullptr);
        }
    });
  });
}

// packed[b, k, p] += sum_i w[b, k, i] T[b, p1, i] T[b, p2, i] over the pairs p1 <= p2.
void gram(const at::Tensor& w, const at::Tensor& t, at::Tensor& packed) {
  const int64_t B = w.size(0), m = w.size(1), n = w.size(2), d = t.size(1);
  const int64_t P = d * (d + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mlp_jet_gram_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* hp = packed.data_ptr<scalar_t>();
    const int64_t tb_stride = t.stride(0), tr_stride = t.stride(1), ti_stride = t.stride(2);
    at::parallel_for(0, B, std::max<int64_t>(1, 8192 / (m * P * n / 8 + 1)), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> wt(n);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* tb = tp + b * tb_stride;
        for (int64_t k = 0; k < m; ++k) {
          const scalar_t* wk = wp + (b * m + k) * n;
          scalar_t* h = hp + (b * m + k) * P;
          int64_t p = 0;
          for (int64_t a = 0; a < d; ++a) {
            const scalar_t* ta = tb + a * tr_stride;
            for (int64_t i = 0; i < n; ++i) wt[i] = wk[i] * ta[i * ti_stride];
            for (int64_t c = a; c < d; ++c, ++p) {
              const scalar_t* tc = tb + c * tr_stride;
              scalar_t acc = scalar_t(0);
              for (int64_t i = 0; i < n; ++i) acc += wt[i] * tc[i * ti_stride];
              h[p] += acc;
            }
          }
        }
      }
    });
  });
}

void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess) {
  const int64_t rows = packed.size(0), P = packed.size(1);
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mlp_jet_unpack_packed_cpu", [&] {
    const scalar_t* pp = packed.data_ptr<scalar_t>();
    scalar_t* hp = hess.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* h = pp + r * P;
        scalar_t* o = hp + r * d * d;
        int64_t p = 0;
        for (int64_t a = 0; a < d; ++a)
          for (int64_t c = a; c < d; ++c, ++p) o[a * d + c] = o[c * d + a] = h[p];
      }
    });
  });
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet", &hessmlp::mlp_jet_op<&hessmlp::cpu::kernels>);
}
