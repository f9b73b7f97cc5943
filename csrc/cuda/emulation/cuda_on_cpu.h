// Runs this folder's CUDA kernels on the CPU to check their index arithmetic where no GPU is:
// one std::thread per CUDA thread, one block at a time, __syncthreads() as a std::barrier,
// __shared__ arrays as function statics (shared by the block's threads). Nothing here models
// warps, timing or memory ordering beyond the barrier, so it proves the math, not the speed.
#pragma once

#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

using std::fma;

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim, gridDim;
inline thread_local std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() block_barrier->arrive_and_wait()

template <class Kernel>
void launch_on_cpu(EmulatedDim3 grid, unsigned threads, Kernel kernel) {
  gridDim = grid;
  blockDim = {threads, 1, 1};
  // One std::thread per CUDA thread for the whole launch, running the blocks in turn; the barrier
  // at the end of each block keeps them one at a time (the __shared__ statics are per kernel).
  std::barrier<> barrier(threads);
  std::vector<std::thread> block;
  for (unsigned t = 0; t < threads; ++t) {
    block.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      block_barrier = &barrier;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = {bx, by, bz};
            kernel();
            barrier.arrive_and_wait();
          }
    });
  }
  for (auto& thread : block) thread.join();
}
