// hessmlp's own CPU matrix product for the products with the weight matrices (the ops'
// GEMMs): register-blocked AVX-512 and AVX2 kernels, picked when the library loads.
// ATen's at::mm goes through MKL, whose fp32 GEMM runs at a fraction of the machine's FMA
// rate on some x86 CPUs (AMD: MKL's vendor dispatch) and whose threading does not help the
// small per-block products of the blocked jet passes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace hessmlp {
namespace cpu {

// The instruction sets of the product. Aten: at::mm (also the path of anything the kernels
// do not take: other dtypes, output rows not contiguous).
enum class Isa { Aten = 0, Avx2 = 1, Avx512 = 2 };

// The best the running CPU supports, lowered by the environment variable HESSMLP_CPU_ISA
// (aten | avx2 | avx512) when set; read once.
Isa active_isa();
// The ISA's name, as HESSMLP_CPU_ISA spells it.
const char* isa_name(Isa isa);
// Whether the running CPU can run the ISA's kernels.
bool isa_supported(Isa isa);

// out [M, N] = a [M, K] @ b [K, N], or += when accumulate. a and b may have any strides
// (a transposed view included); out's rows must be contiguous for the own kernels (else
// ATen). float and double; other dtypes go to ATen. Splits the rows among threads when not
// already inside a parallel region.
void mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
        Isa isa = active_isa());

}  // namespace cpu
}  // namespace hessmlp
