// CPU reverse-Gram full Hessian (DESIGN.md §3), the 'reverse' method of
// hessmlp::mlp_jet:  H[k] = sum_l T_l^T diag(g_l^k * s2_l) T_l,
// with g_l^k = dy_k/da_l from an ordinary backward pass of m columns.
#include "forward_pass.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace hessmlp {
namespace cpu {

namespace {

// Up to this d the weighted Gram is a fused loop over one triangle;
// above it, batched GEMMs.
constexpr int64_t kGramLoopMaxD = 32;

// hp[b, k, p] += sum_i w[b, k, i] T[b, p1, i] T[b, p2, i] over packed pairs p1 <= p2.
template <typename T>
void gram_loop(int64_t B, int64_t m, int64_t d, int64_t n, const T* w, const T* tp,
               int64_t t_bstride, int64_t t_rstride, T* hp) {
  const int64_t P = d * (d + 1) / 2;
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, m * P * n / 8 + 1)),
                   [&](int64_t b0, int64_t b1) {
    std::vector<T> wt(n);
    for (int64_t b = b0; b < b1; ++b) {
      const T* tb = tp + b * t_bstride;
      for (int64_t k = 0; k < m; ++k) {
        const T* wk = w + (b * m + k) * n;
        T* h = hp + (b * m + k) * P;
        int64_t p = 0;
        for (int64_t a = 0; a < d; ++a) {
          const T* ta = tb + a * t_rstride;
          for (int64_t i = 0; i < n; ++i) wt[i] = wk[i] * ta[i];
          for (int64_t c = a; c < d; ++c, ++p) {
            const T* tc = tb + c * t_rstride;
            T acc = T(0);
            for (int64_t i = 0; i < n; ++i) acc += wt[i] * tc[i];
            h[p] += acc;
          }
        }
      }
    }
  });
}

template <typename T>
void unpack_packed(int64_t rows, int64_t d, const T* hp, T* out) {
  const int64_t P = d * (d + 1) / 2;
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* h = hp + r * P;
      T* o = out + r * d * d;
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a)
        for (int64_t c = a; c < d; ++c, ++p) {
          o[a * d + c] = h[p];
          o[c * d + a] = h[p];
        }
    }
  });
}

}  // namespace

void reverse_gram(const NetSpec& net, const at::Tensor& x, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases,
                  at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                  at::Tensor& value, at::Tensor& jac, at::Tensor& hess) {
  const int64_t B = net.batch, d = net.d, m = net.m(), L = net.n_layers();
  const ForwardPass fp = forward_pass(net, Mode::None, x, weights, biases, act_codes, act_params,
                                      Keep::Gram);
  value.copy_(fp.out.select(1, 0));
  jac.copy_(fp.out.narrow(1, 1, d).transpose(1, 2));

  const bool loop = d <= kGramLoopMaxD;
  at::Tensor packed = loop ? at::zeros({B, m, d * (d + 1) / 2}, x.options()) : at::Tensor();
  if (!loop) hess.zero_();

  // g = dy_k/da_l for every output k: the identity at the top.
  at::Tensor g = at::eye(m, x.options()).unsqueeze(0).expand({B, m, m}).contiguous();
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t n = net.widths[l];
    const at::Tensor w = (g * fp.s2[l].unsqueeze(1)).contiguous();  // [B, m, n]
    const at::Tensor& tl = fp.jac[l];                                // [B, d, n]
    if (loop) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_jet_gram_cpu", [&] {
        gram_loop<scalar_t>(B, m, d, n, w.data_ptr<scalar_t>(), tl.data_ptr<scalar_t>(),
                            tl.stride(0), tl.stride(1), packed.data_ptr<scalar_t>());
      });
    } else if (l == 0) {
      // T_0 = W_0 for every sample: one GEMM over all (b, k).
      const at::Tensor w0t = tl.select(0, 0);  // [d, n]
      hess.view({B * m, d, d}).add_(at::matmul(w0t.unsqueeze(0) * w.view({B * m, 1, n}), weights[0]));
    } else {
      hess.add_(at::matmul(tl.unsqueeze(1) * w.unsqueeze(2), tl.transpose(1, 2).unsqueeze(1)));
    }
    if (l > 0) {
      const at::Tensor gz = g * fp.s1[l].unsqueeze(1);  // dy_k/dz_l
      g = at::mm(gz.view({B * m, n}), weights[l]).view({B, m, net.widths[l - 1]});
    }
  }
  if (loop) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_jet_gram_unpack_cpu", [&] {
      unpack_packed<scalar_t>(B * m, d, packed.data_ptr<scalar_t>(), hess.data_ptr<scalar_t>());
    });
  }
}

}  // namespace cpu
}  // namespace hessmlp
