// The emulated build of csrc/cuda/mlp_jet.cu: that file, compiled as host C++
// (see csrc/emulated/cuda_emulation.h).
#include "../cuda/mlp_jet.cu"
