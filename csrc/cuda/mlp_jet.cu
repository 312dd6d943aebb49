// CUDA kernels of hessmlp::mlp_jet: the stage pass of the forward jet, the
// unpacking of the last layer's columns, and reverse-Gram's weighted Gram.
// The GEMMs (cuBLAS through ATen) and their order are in csrc/jet_driver.cpp.
#include "kernels.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace hessmlp {
namespace cuda {
namespace {

template <typename T>
__global__ void stage_forward_kernel(Mode mode, int64_t B, int64_t n, int64_t d, StageDesc stage,
                                     StageInput<T> in, T* out, T* s1, T* s2) {
  const int64_t C = 1 + d + n_pairs(mode, d);
  HM_GRID_LOOP(idx, B * n) {
    const int64_t b = idx / n, i = idx - b * n;
    const Derivs<T> f = stage_eval<T>(stage, in.z_at(b, i));
    if (s1) s1[idx] = f.s1;
    if (s2) s2[idx] = f.s2;
    const T* s = in.s_of(b);
    jet_step_neuron<T>(mode, d, f, in.t_of(b) + i, s ? s + i : nullptr, n, out + b * C * n + i);
  }
}

template <typename T>
__global__ void unpack_kernel(Mode mode, int64_t B, int64_t m, int64_t d, int64_t C,
                              int64_t h_per, const T* cols, T* value, T* jac, T* hess) {
  HM_GRID_LOOP(r, B * m) {
    const int64_t b = r / m, k = r - b * m;
    unpack_output<T>(mode, d, cols + b * C * m + k, m, value + r, jac + r * d,
                     hess ? hess + r * h_per : nullptr);
  }
}

// One thread per (sample, output, entry q): its sum over the neurons and the mode's terms.
template <typename T>
__global__ void gram_kernel(Mode mode, int64_t B, int64_t m, int64_t n, int64_t d, const T* g,
                            const T* s2, const T* t, int64_t tb_stride, int64_t tr_stride,
                            T* packed, int64_t pb_stride) {
  const int64_t Q = n_pairs(mode, d), J = gram_terms(mode, d);
  HM_GRID_LOOP(idx, B * m * Q) {
    const int64_t bk = idx / Q, q = idx - bk * Q, b = bk / m, k = bk - b * m;
    const T* gk = g + bk * n;
    const T* s2b = s2 + b * n;
    T acc = T(0);
    for (int64_t j = 0; j < J; ++j) {
      int64_t a, c;
      gram_term(mode, d, q, j, &a, &c);
      const T* ta = t + b * tb_stride + a * tr_stride;
      const T* tc = t + b * tb_stride + c * tr_stride;
      for (int64_t i = 0; i < n; ++i) acc += gk[i] * s2b[i] * ta[i] * tc[i];
    }
    packed[b * pb_stride + k * Q + q] += acc;
  }
}

template <typename T>
__global__ void unpack_packed_kernel(int64_t rows, int64_t d, const T* packed, T* hess) {
  const int64_t P = d * (d + 1) / 2;
  HM_GRID_LOOP(idx, rows * P) {
    const int64_t r = idx / P, p = idx - r * P;
    int64_t a, c;
    pair_of(d, p, &a, &c);
    hess[(r * d + a) * d + c] = packed[idx];
    hess[(r * d + c) * d + a] = packed[idx];
  }
}

}  // namespace

void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2) {
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_cuda", [&] {
    HM_LAUNCH(blocks_for(a.batch * a.n), kThreads, 0, stream, stage_forward_kernel<scalar_t>)(
        a.mode, a.batch, a.n, a.d, a.stage, stage_input<scalar_t>(a), out.data_ptr<scalar_t>(),
        s1.defined() ? s1.data_ptr<scalar_t>() : nullptr,
        s2.defined() ? s2.data_ptr<scalar_t>() : nullptr);
    HM_LAUNCH_CHECK();
  });
}

void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
            at::Tensor& hess) {
  const int64_t B = cols.size(0), C = cols.size(1), m = cols.size(2);
  const int64_t h_per = mode == Mode::None ? 0 : hess.numel() / (B * m);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "mlp_jet_unpack_cuda", [&] {
    HM_LAUNCH(blocks_for(B * m), kThreads, 0, stream, unpack_kernel<scalar_t>)(
        mode, B, m, d, C, h_per, cols.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
        jac.data_ptr<scalar_t>(), h_per ? hess.data_ptr<scalar_t>() : nullptr);
    HM_LAUNCH_CHECK();
  });
}

void gram(Mode mode, at::Tensor& g, const at::Tensor& s1, const at::Tensor& s2,
          const at::Tensor& t, at::Tensor& packed) {
  const int64_t B = g.size(0), m = g.size(1), n = g.size(2), d = t.size(-2);
  const int64_t Q = packed.size(-1);
  const bool shared = t.dim() == 2;
  // (The strides of dimensions of size 1 are arbitrary.)
  TORCH_INTERNAL_ASSERT((n == 1 || t.stride(-1) == 1) && (Q == 1 || packed.stride(-1) == 1) &&
                        (m == 1 || packed.stride(-2) == Q));
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mlp_jet_gram_cuda", [&] {
    HM_LAUNCH(blocks_for(B * m * Q), kThreads, 0, stream, gram_kernel<scalar_t>)(
        mode, B, m, n, d, g.data_ptr<scalar_t>(), s2.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
        shared ? 0 : t.stride(0), t.stride(-2), packed.data_ptr<scalar_t>(), packed.stride(0));
    HM_LAUNCH_CHECK();
  });
  g.mul_(s1.unsqueeze(1));  // dy/da becomes dy/dz, after the kernel has read g (same stream)
}

void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess) {
  const int64_t rows = packed.size(0);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mlp_jet_unpack_packed_cuda", [&] {
    HM_LAUNCH(blocks_for(rows * packed.size(1)), kThreads, 0, stream,
              unpack_packed_kernel<scalar_t>)(rows, d, packed.data_ptr<scalar_t>(), hess.data_ptr<scalar_t>());
    HM_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(HESSMLP_LIBRARY, HESSMLP_CUDA_KEY, m) {
  m.impl("mlp_jet", &hessmlp::mlp_jet_op<&hessmlp::cuda::kernels>);
}
