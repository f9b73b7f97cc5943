// The relu_backward_bias_grad kernels (../relu_backward.cuh) on the CPU against a float64
// reference: channels_last and NCHW, every dtype, the 16-byte and the scalar path, unaligned
// starts, odd C and H*W, NaN in output and in grad, grids smaller than the work (grid-stride loops,
// chunked planes), out-of-bounds writes (sentinels), and bitwise-equal grad_bias across two launches.
// Run by run.sh.
#include "cuda_on_cpu.h"
#include "relu_backward.cuh"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
using namespace cnnkernels::cuda::relu_bwd;

constexpr int kPad = 16;  // sentinel elements on each side of every buffer the kernels write

template <typename T> double tol() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  else if constexpr (std::is_same_v<T, float>) return 1e-6;
  else if constexpr (std::is_same_v<T, c10::Half>) return 1e-3;   // the final cast: 2^-11
  else return 8e-3;                                                // bfloat16: 2^-8
}

template <typename T> const char* name() {
  if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, c10::Half>) return "half";
  else return "bfloat16";
}

template <typename T> double to_double(T v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return (double)(float)v;
}

template <typename T> bool same_bits(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

struct Case {
  int N, C, H, W;
  bool channels_last;
  int offset;          // elements: grad, output and grad_pre_relu start this far into their buffers
  bool vec;            // the 16-byte path (needs offset 0 and C or H*W a multiple of the vector)
  int64_t max_blocks;  // the grid cap, as multiprocessor_count() * kBlocksPerSM on a GPU
  int force_chunks = 0, force_group = 0;  // NCHW: split planes and size groups other than nchw_launch
};

// Runs phase 1 and phase 2 as relu_backward.cu does; returns grad_bias.
template <typename T, int kVec>
std::vector<T> run(const Case& c, const T* g, const T* o, T* r, int64_t* num_partials) {
  using acc_t = at::opmath_type<T>;
  const int64_t plane = int64_t{c.H} * c.W;
  const bool cl = c.channels_last || plane == 1;
  std::vector<acc_t> partial;
  int64_t P;
  if (cl) {
    const ChannelsLastLaunch l = channels_last_launch(c.N * plane, c.C, kVec, c.max_blocks);
    P = l.row_blocks;
    partial.assign((P * c.C) + 2 * kPad, acc_t(NAN));
    acc_t* pp = partial.data() + kPad;
    launch_on_cpu({(unsigned)l.strips, (unsigned)l.row_blocks, 1}, kThreads, [&] {
      relu_backward_channels_last_kernel<T, kVec>(g, o, r, pp, c.N * plane, c.C, l.tx_count);
    });
  } else {
    NchwLaunch l = nchw_launch(int64_t{c.N} * c.C, plane, kVec, c.max_blocks);
    if (c.force_group) l.group_size = c.force_group;
    if (c.force_chunks) {
      l.chunk_vecs = ceil_div(plane / kVec, c.force_chunks);
      l.chunks = ceil_div(plane / kVec, l.chunk_vecs);
    }
    l.blocks = std::min(ceil_div(c.N * c.C * l.chunks, kThreads / l.group_size), c.max_blocks);
    P = c.N * l.chunks;
    partial.assign((P * c.C) + 2 * kPad, acc_t(NAN));
    acc_t* pp = partial.data() + kPad;
    launch_on_cpu({(unsigned)l.blocks, 1, 1}, kThreads, [&] {
      relu_backward_nchw_kernel<T, kVec>(g, o, r, pp, int64_t{c.N} * c.C, c.C, plane, l.chunks, l.chunk_vecs,
                                         l.group_size);
    });
  }
  *num_partials = P;
  std::vector<T> bias(c.C + 2 * kPad, T(NAN));
  const int tx_count = finalize_tx_count(c.C);
  const int64_t blocks = std::min(ceil_div(c.C, tx_count), c.max_blocks);
  launch_on_cpu({(unsigned)blocks, 1, 1}, kThreads, [&] {
    bias_grad_finalize_kernel<T>(partial.data() + kPad, P, c.C, bias.data() + kPad, tx_count);
  });
  bool sentinels = true;
  for (int i = 0; i < kPad; ++i) {
    sentinels &= std::isnan((double)partial[i]) && std::isnan((double)partial[partial.size() - 1 - i]);
    sentinels &= std::isnan(to_double(bias[i])) && std::isnan(to_double(bias[bias.size() - 1 - i]));
  }
  if (!sentinels) printf("FAIL partial or grad_bias written out of bounds\n");
  return sentinels ? bias : std::vector<T>{};
}

template <typename T>
bool check(const Case& c, bool with_nan) {
  const int64_t plane = int64_t{c.H} * c.W, n = c.N * c.C * plane;
  std::mt19937 rng(unsigned(n * 131 + c.C));
  std::normal_distribution<float> nd;
  std::vector<T> g(n + 2 * kPad), o(n + 2 * kPad), r(n + 2 * kPad, T(NAN));
  for (auto& v : g) v = T(nd(rng));
  for (auto& v : o) v = T(nd(rng));
  for (int i = 0; i < n; i += 5) o[kPad + c.offset + i] = T(0.0f);  // exact zeros: output <= 0 masks
  // with_nan: NaN outputs (pass grad through), a NaN grad under output <= 0 (masked to 0), and
  // a NaN grad where output > 0 (its channel's grad_bias is NaN) in the last element.
  if (with_nan) {
    o[kPad + c.offset + n / 2] = T(NAN);
    o[kPad + c.offset + n / 3] = T(NAN);
    g[kPad + c.offset + 0] = T(NAN);
    o[kPad + c.offset + 0] = T(-1.0f);
    g[kPad + c.offset + n - 1] = T(NAN);
    o[kPad + c.offset + n - 1] = T(1.0f);
  }
  const T* pg = g.data() + kPad + c.offset;
  const T* po = o.data() + kPad + c.offset;
  T* pr = r.data() + kPad + c.offset;

  int64_t P1 = 0, P2 = 0;
  constexpr int kVec = vec16_size<T>();
  std::vector<T> b1 = c.vec ? run<T, kVec>(c, pg, po, pr, &P1) : run<T, 1>(c, pg, po, pr, &P1);
  std::vector<T> r1 = r;
  std::vector<T> b2 = b1;
  if (!with_nan) b2 = c.vec ? run<T, kVec>(c, pg, po, pr, &P2) : run<T, 1>(c, pg, po, pr, &P2);
  else P2 = P1;
  bool ok = !b1.empty() && !b2.empty();

  // grad_pre_relu: bit-exact grad or +0, sentinels untouched; the second launch writes the same.
  for (int64_t i = 0; ok && i < (int64_t)r.size(); ++i) {
    const int64_t k = i - kPad - c.offset;
    if (k < 0 || k >= n) { ok &= std::isnan(to_double(r[i])); continue; }
    const T want = to_double(o[i]) <= 0 ? T(0.0f) : g[i];
    ok &= same_bits(r[i], want) && same_bits(r1[i], want);
  }
  if (!ok) printf("FAIL grad_pre_relu\n");

  // grad_bias against float64, and bitwise equal across the two launches.
  std::vector<double> want(c.C, 0.0), scale(c.C, 0.0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t ch = c.channels_last ? k % c.C : (k / plane) % c.C;
    const double v = to_double(po[k]) <= 0 ? 0.0 : to_double(pg[k]);
    want[ch] += v;
    scale[ch] += std::abs(v);
  }
  for (int ch = 0; ok && ch < c.C; ++ch) {
    const T got = b1[kPad + ch];
    ok &= same_bits(got, b2[kPad + ch]);
    const double gd = to_double(got);
    if (std::isnan(want[ch])) { ok &= std::isnan(gd); continue; }
    const double acc_eps = std::is_same_v<T, double> ? 1e-14 : 1e-5;
    ok &= std::abs(gd - want[ch]) <= tol<T>() * std::abs(want[ch]) + acc_eps * scale[ch] + 1e-30;
    if (!ok) printf("FAIL channel %d: got %.9g want %.9g\n", ch, gd, want[ch]);
  }
  printf("%s %s %s N=%d C=%d H=%d W=%d offset=%d vec=%d max_blocks=%lld chunks=%d group=%d nan=%d "
         "partials=%lld\n", ok ? "ok  " : "FAIL", name<T>(), c.channels_last ? "channels_last" : "nchw", c.N,
         c.C, c.H, c.W, c.offset, c.vec, (long long)c.max_blocks, c.force_chunks, c.force_group, (int)with_nan,
         (long long)P1);
  return ok && P1 == P2;
}

template <typename T>
bool check_all(const Case& base) {
  const bool clean = check<T>(base, false);
  const bool with_nan = check<T>(base, true);
  return clean && with_nan;
}

// Phase 2 alone on more partials than its lanes cover in one step (the p loop and its tail).
template <typename T>
bool check_finalize(int64_t P, int64_t C, int64_t max_blocks) {
  using acc_t = at::opmath_type<T>;
  std::mt19937 rng(unsigned(P * 7 + C));
  std::normal_distribution<double> nd;
  std::vector<acc_t> partial(P * C);
  for (auto& v : partial) v = acc_t(nd(rng));
  const int tx_count = finalize_tx_count(C);
  const int64_t blocks = std::min(ceil_div(C, tx_count), max_blocks);
  std::vector<T> b1(C + kPad, T(NAN)), b2(C + kPad, T(NAN));
  for (auto* b : {&b1, &b2}) {
    launch_on_cpu({(unsigned)blocks, 1, 1}, kThreads, [&] {
      bias_grad_finalize_kernel<T>(partial.data(), P, C, b->data(), tx_count);
    });
  }
  bool ok = true;
  for (int64_t c = 0; c < C; ++c) {
    double want = 0, scale = 0;
    for (int64_t p = 0; p < P; ++p) want += partial[p * C + c], scale += std::abs((double)partial[p * C + c]);
    const double acc_eps = std::is_same_v<T, double> ? 1e-14 : 1e-5;
    ok &= same_bits(b1[c], b2[c]) &&
          std::abs(to_double(b1[c]) - want) <= tol<T>() * std::abs(want) + acc_eps * scale;
  }
  for (int i = 0; i < kPad; ++i) ok &= std::isnan(to_double(b1[C + i]));
  printf("%s finalize %s P=%lld C=%lld max_blocks=%lld\n", ok ? "ok  " : "FAIL", name<T>(), (long long)P,
         (long long)C, (long long)max_blocks);
  return ok;
}

int main() {
  bool ok = true;
  // (N, C, H, W, grid cap): C = 1, 3, 5, 67 and odd H * W take the scalar paths of one layout or
  // both; H * W == 1 runs NCHW as channels_last; the caps of 2 and 3 leave grid-stride loops.
  struct Shape { int N, C, H, W; int64_t max_blocks; };
  const Shape shapes[] = {{1, 1, 5, 3, 2},   {2, 3, 7, 5, 3},  {1, 5, 9, 9, 24},  {2, 67, 3, 5, 2},
                          {2, 16, 8, 8, 3},  {1, 64, 4, 6, 24}, {2, 8, 1, 1, 2},   {2, 40, 16, 16, 3}};
  for (const Shape& s : shapes) {
    for (bool cl : {true, false}) {
      auto run_dtype = [&](auto zero) {
        using T = decltype(zero);
        const int64_t vec_len = cl || s.H * s.W == 1 ? s.C : int64_t{s.H} * s.W;
        const bool vec_ok = vec_len % vec16_size<T>() == 0;
        Case c{s.N, s.C, s.H, s.W, cl, 0, vec_ok, s.max_blocks};
        ok &= check_all<T>(c);
        if (vec_ok) {  // an unaligned start: the scalar path, as relu_backward.cu would pick
          c.vec = false;
          c.offset = 1;
          ok &= check_all<T>(c);
        }
      };
      run_dtype(float{});
      run_dtype(double{});
      run_dtype(c10::Half{});
      run_dtype(c10::BFloat16{});
    }
  }
  // NCHW planes split into chunks: by nchw_launch (one plane of 4096 elements, a grid of 3) and
  // forced (uneven chunks, 8 groups of 32 threads per block sharing the tree).
  for (bool vec : {false, true}) {
    Case c{1, 1, 64, 64, false, 0, vec, 3};
    ok &= check_all<float>(c);
    ok &= check_all<c10::Half>(c);
    c = Case{2, 3, 40, 24, false, 0, vec, 2, 7, 32};
    ok &= check_all<float>(c);
    ok &= check_all<double>(c);
    ok &= check_all<c10::BFloat16>(c);
    c.force_group = 64;
    c.force_chunks = 3;
    ok &= check_all<c10::Half>(c);
  }
  for (int64_t P : {1, 1000, 1029}) {
    ok &= check_finalize<float>(P, 13, 1);
    ok &= check_finalize<double>(P, 1, 4);
    ok &= check_finalize<c10::Half>(P, 67, 3);
  }
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return !ok;
}
