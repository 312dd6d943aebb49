// A stand-in for the CUDA execution model, so that the kernels of csrc/cuda/*.cu
// compile with the host compiler and run on the CPU (docs/design.md §7): the
// test-only emulated build (setup.py with HESSMLP_EMULATED_CUDA=1, run by
// .ci/cuda_emulated). Not shipped: the user's build never includes this file.
//
// What it emulates:
// - __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__;
// - blockIdx, threadIdx, blockDim, gridDim: per-host-thread state that a launch sets
//   before it calls the kernel for each (block, thread) of the grid;
// - the launch's checks, as the CUDA runtime makes them ("invalid configuration
//   argument": an empty grid or block, more than 1024 threads a block, a grid or block
//   dimension over its limit, more than 48 KiB of dynamic shared memory), reported by
//   the launch check that follows (the device's wording for too much shared memory may
//   differ);
// - two kinds of launch. HM_LAUNCH: threads that neither share memory nor
//   wait for each other run one after another, blocks and threads in reverse order (a
//   kernel that reads what another thread writes without a barrier is likely to fail).
//   HM_LAUNCH_SHARED: one host thread per CUDA thread of a block,
//   __syncthreads a barrier among them (threads that have returned leave it), the
//   block's shared memory (HM_SHARED arrays, one per declaration; HM_DYNAMIC_SHARED) one
//   buffer filled with NaN bytes at the start of each block; blocks one after another.
//   __syncthreads or shared memory in a kernel launched the first way throws;
// - the grid's size cap of the launchers (kernels.cuh's max_blocks()), settable by tests
//   (small: the grid-stride loops go round several times), and counts of what ran: the
//   launches, blocks, threads, and the iterations of the grid-stride loops (HM_GRID_LOOP).
// What it does not: warps and their intrinsics, atomics, streams (launches are
// synchronous; the stream argument is ignored), device memory (pointers are host
// memory), the device's math library (HM_MATH takes std:: functions).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for the host compiler: nvcc builds the real kernels"
#endif

#include <c10/util/Exception.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// (__shared__ is left undefined: shared memory is declared with HM_SHARED or
// HM_DYNAMIC_SHARED, which both builds understand.)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables: each host thread's own (set by the launch).
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace hessmlp {
namespace emu {

// The CUDA runtime's limits on a launch (compute capability 9.0).
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr unsigned int kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned int kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr size_t kMaxDynamicShared = 48 * 1024;

// A stream stands in for cudaStream_t: the emulation runs every launch at once.
struct Stream {};

// What the launches did, for tests; and the launchers' grid cap (0: the real one).
// items: the iterations of the kernels' grid-stride loops (HM_GRID_LOOP), all threads
// together; max_items: the most one thread did in one launch (1: a grid for every item).
struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0;
  int64_t max_grid = 0;
  int64_t shared_launches = 0;
  int64_t items = 0, max_items = 0;
};

inline std::mutex& state_mutex() {
  static std::mutex m;
  return m;
}
inline Stats& stats() {
  static Stats s;
  return s;
}
inline std::atomic<int64_t>& grid_cap() {
  static std::atomic<int64_t> cap{0};
  return cap;
}
// The last launch's error, read and cleared by the launch check (cudaGetLastError).
inline std::string& last_error() {
  static thread_local std::string e;
  return e;
}

inline void launch_check() {
  std::string e;
  std::swap(e, last_error());
  TORCH_CHECK(e.empty(), "CUDA error: ", e, " (emulated CUDA launch)");
}

// A barrier for the threads of one block: __syncthreads waits until every thread
// that has not returned arrives; a thread that returns leaves it (arrive_and_drop).
// broken: a thread threw; the others give up instead of waiting forever.
class BlockBarrier {
 public:
  void reset(int n) {
    std::lock_guard<std::mutex> lk(mu_);
    expected_ = n;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(mu_);
    if (broken_) throw Broken();
    const uint64_t phase = phase_;
    if (++arrived_ >= expected_) {
      release();
      return;
    }
    cv_.wait(lk, [&] { return phase_ != phase || broken_; });
    if (phase_ == phase) throw Broken();
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lk(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ >= expected_) release();
  }
  void break_all() {
    std::lock_guard<std::mutex> lk(mu_);
    broken_ = true;
    cv_.notify_all();
  }
  bool broken() {
    std::lock_guard<std::mutex> lk(mu_);
    return broken_;
  }
  struct Broken {};

 private:
  void release() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t phase_ = 0;
  bool broken_ = false;
};

// Where a shared launch's static shared arrays lie in its shared memory: by declaration
// (HM_SHARED's tag), after the launch's dynamic shared memory, the same for every block.
struct SharedLayout {
  std::mutex mu;
  std::vector<std::pair<const void*, size_t>> offsets;
  size_t end = 0;
};

// The block a host thread runs in a shared launch (null in a serial launch).
struct BlockContext {
  BlockBarrier* barrier = nullptr;
  unsigned char* shared = nullptr;  // the dynamic shared memory, then the static arrays
  SharedLayout* layout = nullptr;
};
inline thread_local BlockContext* block_context = nullptr;

[[noreturn]] inline void not_shared(const char* what) {
  throw std::runtime_error(std::string("emulated CUDA: ") + what +
                           " in a kernel launched with HM_LAUNCH; launch it with HM_LAUNCH_SHARED");
}

inline void syncthreads() {
  if (block_context == nullptr) not_shared("__syncthreads");
  block_context->barrier->arrive_and_wait();
}

// A static shared array (HM_SHARED): one place per declaration, tag, whichever thread
// reaches it first, and the same in every block; static and dynamic shared memory
// together at most 48 KiB, as on the device without an opt-in.
template <typename T>
T* static_shared(const void* tag, size_t count) {
  if (block_context == nullptr) not_shared("shared memory");
  SharedLayout& l = *block_context->layout;
  std::lock_guard<std::mutex> lk(l.mu);
  for (const auto& [t, at] : l.offsets) {
    if (t == tag) return reinterpret_cast<T*>(block_context->shared + at);
  }
  constexpr size_t align = alignof(T) < 16 ? 16 : alignof(T);
  const size_t at = (l.end + align - 1) / align * align;
  TORCH_CHECK(at + count * sizeof(T) <= kMaxDynamicShared,
              "emulated CUDA: more than 48 KiB of shared memory (static and dynamic)");
  l.offsets.emplace_back(tag, at);
  l.end = at + count * sizeof(T);
  return reinterpret_cast<T*>(block_context->shared + at);
}

template <typename T>
T* dynamic_shared() {
  if (block_context == nullptr) not_shared("shared memory");
  return reinterpret_cast<T*>(block_context->shared);
}

inline bool check_config(const dim3& grid, const dim3& block, size_t smem) {
  const unsigned int g[3] = {grid.x, grid.y, grid.z}, t[3] = {block.x, block.y, block.z};
  bool ok = smem <= kMaxDynamicShared;
  for (int i = 0; i < 3; ++i) ok = ok && g[i] >= 1 && g[i] <= kMaxGridDim[i] && t[i] >= 1 && t[i] <= kMaxBlockDim[i];
  ok = ok && uint64_t(block.x) * block.y * block.z <= kMaxThreadsPerBlock;
  if (!ok) last_error() = "invalid configuration argument";
  return ok;
}

inline void count(const dim3& grid, const dim3& block, bool shared) {
  std::lock_guard<std::mutex> lk(state_mutex());
  Stats& s = stats();
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  s.launches += 1;
  s.blocks += blocks;
  s.threads += blocks * block.x * block.y * block.z;
  if (blocks > s.max_grid) s.max_grid = blocks;
  if (shared) s.shared_launches += 1;
}

// The grid-stride loop iterations of the CUDA thread this host thread is running.
inline thread_local int64_t thread_items = 0;
inline bool grid_item() {
  ++thread_items;
  return true;
}
inline void count_items(int64_t items, int64_t max_items) {
  std::lock_guard<std::mutex> lk(state_mutex());
  Stats& s = stats();
  s.items += items;
  if (max_items > s.max_items) s.max_items = max_items;
}

inline uint3 unflatten(int64_t i, const dim3& dims) {
  const unsigned int x = static_cast<unsigned int>(i % dims.x);
  const int64_t yz = i / dims.x;
  return uint3{x, static_cast<unsigned int>(yz % dims.y), static_cast<unsigned int>(yz / dims.y)};
}

// Puts back this thread's built-in variables when a launch ends (or throws).
struct SavedBuiltins {
  uint3 b = blockIdx, t = threadIdx;
  dim3 bd = blockDim, gd = gridDim;
  ~SavedBuiltins() {
    blockIdx = b;
    threadIdx = t;
    blockDim = bd;
    gridDim = gd;
  }
};

// Threads that neither share memory nor synchronise: one after another on this thread.
template <typename... Params, typename... Args>
void launch_serial(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  if (!check_config(grid, block, smem)) return;
  count(grid, block, false);
  const int64_t n_blocks = int64_t(grid.x) * grid.y * grid.z;
  const int64_t n_threads = int64_t(block.x) * block.y * block.z;
  const SavedBuiltins saved;
  gridDim = grid;
  blockDim = block;
  int64_t items = 0, max_items = 0;
  for (int64_t bi = n_blocks - 1; bi >= 0; --bi) {
    blockIdx = unflatten(bi, grid);
    for (int64_t ti = n_threads - 1; ti >= 0; --ti) {
      threadIdx = unflatten(ti, block);
      thread_items = 0;
      kernel(args...);
      items += thread_items;
      if (thread_items > max_items) max_items = thread_items;
    }
  }
  count_items(items, max_items);
}

// Threads of a block that share memory and meet at __syncthreads: one host thread per
// CUDA thread of the block, running the blocks one after another.
template <typename... Params, typename... Args>
void launch_shared(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  if (!check_config(grid, block, smem)) return;
  count(grid, block, true);
  const int64_t n_blocks = int64_t(grid.x) * grid.y * grid.z;
  const int n_threads = static_cast<int>(block.x * block.y * block.z);
  std::vector<unsigned char> shared(kMaxDynamicShared);
  SharedLayout layout;
  layout.end = smem;
  BlockBarrier sync, block_end;
  std::mutex error_mu;
  std::exception_ptr error;
  // The block's start, run by one thread while all wait: a fresh barrier and shared
  // memory full of NaN bytes (a kernel that reads shared memory it did not write sees them).
  auto start_block = [&]() {
    sync.reset(n_threads);
    std::memset(shared.data(), 0xff, shared.size());
  };
  auto body = [&](int t) {
    gridDim = grid;
    blockDim = block;
    threadIdx = unflatten(t, block);
    BlockContext ctx;
    ctx.barrier = &sync;
    ctx.shared = shared.data();
    ctx.layout = &layout;
    block_context = &ctx;
    int64_t items = 0, max_items = 0;
    try {
      for (int64_t bi = 0; bi < n_blocks; ++bi) {
        blockIdx = unflatten(bi, grid);
        if (t == 0) start_block();
        block_end.arrive_and_wait();  // the block starts for everyone after its setup
        try {
          thread_items = 0;
          kernel(args...);
          items += thread_items;
          if (thread_items > max_items) max_items = thread_items;
        } catch (const BlockBarrier::Broken&) {
          throw;
        } catch (...) {
          {
            std::lock_guard<std::mutex> lk(error_mu);
            if (!error) error = std::current_exception();
          }
          sync.break_all();
          block_end.break_all();
          throw BlockBarrier::Broken();
        }
        sync.arrive_and_drop();
        block_end.arrive_and_wait();  // every thread is done before the next block's setup
      }
    } catch (const BlockBarrier::Broken&) {
      sync.break_all();
      block_end.break_all();
    }
    count_items(items, max_items);
    block_context = nullptr;
  };
  block_end.reset(n_threads);
  std::vector<std::thread> threads;
  threads.reserve(n_threads);
  try {
    for (int t = 0; t < n_threads; ++t) threads.emplace_back(body, t);
  } catch (...) {  // (no thread to be had: those started give up, then the error goes up)
    sync.break_all();
    block_end.break_all();
    for (auto& th : threads) th.join();
    throw;
  }
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

// What HM_LAUNCH(grid, block, smem, stream, kernel) is: called with the kernel's
// arguments, it runs the grid (the stream is ignored: launches are synchronous).
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  bool shared;
  template <typename... Args>
  void operator()(Args&&... args) const {
    if (shared) {
      launch_shared(kernel, grid, block, smem, std::forward<Args>(args)...);
    } else {
      launch_serial(kernel, grid, block, smem, std::forward<Args>(args)...);
    }
  }
};

template <typename... Params>
Launch<Params...> launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream,
                           bool shared) {
  return Launch<Params...>{kernel, grid, block, smem, shared};
}

}  // namespace emu
}  // namespace hessmlp

#define __syncthreads() ::hessmlp::emu::syncthreads()
