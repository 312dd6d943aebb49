// The emulated build of csrc/cuda/graph.cu: that file, compiled as host C++
// (see csrc/emulated/cuda_emulation.h).
#include "../cuda/graph.cu"
