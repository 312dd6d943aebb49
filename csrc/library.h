// The name of hessmlp's op library: hessmlp, or hessmlp_emulated in the test-only
// emulated CUDA build (csrc/emulated), whose ops have the same schemas and run the
// CUDA kernels on the CPU.
#pragma once

#if defined(HESSMLP_EMULATE_CUDA)
#define HESSMLP_LIBRARY hessmlp_emulated
#else
#define HESSMLP_LIBRARY hessmlp
#endif

// TORCH_LIBRARY pastes its namespace argument as written: this expands it first.
// (TORCH_LIBRARY_IMPL expands its arguments itself.)
#define HESSMLP_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
