// The emulated build of csrc/cuda/stage_derivs.cu: that file, compiled as host C++
// (see csrc/emulated/cuda_emulation.h).
#include "../cuda/stage_derivs.cu"
