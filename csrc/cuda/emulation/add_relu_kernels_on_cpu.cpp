// The add_relu kernels (../add_relu.cuh) on the CPU: every dtype, tails, unaligned starts, NaN,
// and grid-stride loops over more work than the grid covers. Run by run.sh.
#include "cuda_on_cpu.h"
#include "add_relu.cuh"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdio>
#include <random>
using namespace cnnkernels::cuda;
template <typename T> bool check(int64_t n, int off, unsigned blocks, bool vec) {
  std::mt19937 rng(n); std::normal_distribution<float> nd;
  std::vector<T> a(n + 16), b(n + 16), o(n + 16, T(NAN));
  for (auto& v : a) v = T(nd(rng)); for (auto& v : b) v = T(nd(rng));
  a[off + n/2] = T(NAN);
  const T* pa = a.data() + off; const T* pb = b.data() + off; T* po = o.data() + off;
  if (vec) launch_on_cpu({blocks,1,1}, kThreads, [&]{ add_relu_vec16_kernel<T>(pa, pb, po, n); });
  else launch_on_cpu({blocks,1,1}, kThreads, [&]{ add_relu_scalar_kernel<T>(pa, pb, po, n); });
  bool ok = true;
  for (int64_t i = 0; i < n + 16; ++i) {
    bool inside = i >= off && i < off + n;
    double got = (double)(float)o[i];
    if (!inside) { ok &= std::isnan(got); continue; }
    double s = (double)(float)a[i] + (double)(float)b[i]; double want = s < 0 ? 0 : s;
    if (std::isnan(want)) { ok &= std::isnan(got); continue; }
    ok &= std::abs((double)(float)T(want) - got) <= 1e-2 * std::abs(want) + 1e-6;
  }
  printf("%s n=%lld off=%d blocks=%u vec=%d size=%zu\n", ok ? "ok  " : "FAIL", (long long)n, off, blocks, vec, sizeof(T));
  return ok;
}
int main() {
  bool ok = true;
  for (int64_t n : {1, 7, 8, 9, 1023, 4096, 4097, 10000}) for (unsigned blocks : {1u, 3u}) {
    ok &= check<float>(n, 0, blocks, true); ok &= check<double>(n, 0, blocks, true);
    ok &= check<c10::Half>(n, 0, blocks, true); ok &= check<c10::BFloat16>(n, 0, blocks, true);
    ok &= check<float>(n, 1, blocks, false); ok &= check<c10::Half>(n, 3, blocks, false);
  }
  printf(ok ? "ALL OK\n" : "SOME FAILED\n"); return !ok;
}
