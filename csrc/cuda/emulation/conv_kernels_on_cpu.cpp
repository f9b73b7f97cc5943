// The generic conv kernels (../conv_generic.cuh) on the CPU against a float64 loop reference:
// layouts, groups, depthwise, strides, dilation, padding, partial tiles, and grid-stride loops
// (a capped grid); and the stem's window packing (../pack_windows.cuh) against a loop. Run by run.sh.
#include "cuda_on_cpu.h"
#include "conv_generic.cuh"
#include "pack_windows.cuh"
#include <cstdio>
#include <random>
#include <cmath>
#include <algorithm>
using namespace cnnkernels::cuda;

struct Case { int N,C,H,W,K,R,S,sh,sw,ph,pw,dh,dw,G; int in_fmt, w_fmt, out_fmt, res_fmt; bool bias; unsigned ycap; };

// layouts: 0 = NCHW contiguous, 1 = NHWC (channels_last), 2 = NHWC inside a bigger buffer (sliced)
static Strides4 make_strides(int fmt, int n, int c, int h, int w, size_t* size, int64_t* offset) {
  *offset = 0;
  if (fmt == 0) { *size = (size_t)n*c*h*w; return {(int64_t)c*h*w, (int64_t)h*w, w, 1}; }
  if (fmt == 1) { *size = (size_t)n*c*h*w; return {(int64_t)h*w*c, 1, (int64_t)w*c, c}; }
  int C2 = c + 3, H2 = h + 1, W2 = w + 2;  // view [:, 1:, :h, 2:]
  *size = (size_t)n*C2*H2*W2;
  Strides4 s{(int64_t)H2*W2*C2, 1, (int64_t)W2*C2, C2};
  *offset = 1 * s.c + 2 * s.w;
  return s;
}

template <typename T, typename A>
bool run_case(const Case& c, std::mt19937& rng, bool direct) {
  int OH = (c.H + 2*c.ph - c.dh*(c.R-1) - 1)/c.sh + 1, OW = (c.W + 2*c.pw - c.dw*(c.S-1) - 1)/c.sw + 1;
  int Cg = c.C / c.G, Kg = c.K / c.G;
  std::normal_distribution<double> nd;
  size_t in_sz, w_sz, out_sz, res_sz; int64_t in_off, w_off, out_off, res_off;
  Strides4 si = make_strides(c.in_fmt, c.N, c.C, c.H, c.W, &in_sz, &in_off);
  Strides4 sw = make_strides(c.w_fmt, c.K, Cg, c.R, c.S, &w_sz, &w_off);
  Strides4 so = make_strides(c.out_fmt, c.N, c.K, OH, OW, &out_sz, &out_off);
  Strides4 sr{0,0,0,0}; res_sz = 0; res_off = 0;
  if (c.res_fmt >= 0) sr = make_strides(c.res_fmt, c.N, c.K, OH, OW, &res_sz, &res_off);
  std::vector<T> in(in_sz), w(w_sz), out(out_sz, T(NAN)), res(res_sz), bias(c.K);
  for (auto& v : in) v = T(nd(rng)); for (auto& v : w) v = T(nd(rng)); for (auto& v : res) v = T(nd(rng)); for (auto& v : bias) v = T(nd(rng));
  GenericConvParams p{};
  p.M = (int64_t)c.N*OH*OW; p.N=c.N; p.C=c.C; p.H=c.H; p.W=c.W; p.K=c.K; p.R=c.R; p.S=c.S; p.OH=OH; p.OW=OW;
  p.stride_h=c.sh; p.stride_w=c.sw; p.pad_h=c.ph; p.pad_w=c.pw; p.dil_h=c.dh; p.dil_w=c.dw;
  p.groups=c.G; p.Cg=Cg; p.Kg=Kg; p.Kred=Cg*c.R*c.S; p.in=si; p.wt=sw; p.res=sr; p.out=so;
  const T* ip = in.data() + in_off; const T* wp = w.data() + w_off; T* op = out.data() + out_off;
  const T* rp = c.res_fmt >= 0 ? res.data() + res_off : nullptr; const T* bp = c.bias ? bias.data() : nullptr;
  if (direct) {
    int64_t total = p.M * p.K; unsigned blocks = (unsigned)std::min<int64_t>((total + 255)/256, c.ycap);
    bool cl = c.out_fmt != 0;
    if (cl) launch_on_cpu({blocks,1,1}, 256, [&]{ conv_direct_kernel<T, A, true>(p, ip, wp, bp, rp, op); });
    else launch_on_cpu({blocks,1,1}, 256, [&]{ conv_direct_kernel<T, A, false>(p, ip, wp, bp, rp, op); });
  } else {
    unsigned mt = (unsigned)((p.M + igemm::BM - 1)/igemm::BM); int gn = c.G * ((Kg + igemm::BN - 1)/igemm::BN);
    launch_on_cpu({mt, (unsigned)std::min<int>(gn, c.ycap), 1}, igemm::kThreads, [&]{ conv_igemm_kernel<T, A>(p, ip, wp, bp, rp, op); });
  }
  double err = 0, ref_norm = 0; int64_t bad = 0;
  for (int n = 0; n < c.N; ++n) for (int k = 0; k < c.K; ++k) for (int oh = 0; oh < OH; ++oh) for (int ow = 0; ow < OW; ++ow) {
    int g = k / Kg; double acc = 0;
    for (int ci = 0; ci < Cg; ++ci) for (int r = 0; r < c.R; ++r) for (int s = 0; s < c.S; ++s) {
      int ih = oh*c.sh - c.ph + r*c.dh, iw = ow*c.sw - c.pw + s*c.dw;
      if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
      acc += (double)ip[n*si.n + (g*Cg+ci)*si.c + ih*si.h + iw*si.w] * (double)wp[k*sw.n + ci*sw.c + r*sw.h + s*sw.w];
    }
    if (bp) acc += (double)bp[k];
    if (rp) acc += (double)rp[n*sr.n + k*sr.c + oh*sr.h + ow*sr.w];
    acc = acc < 0 ? 0 : acc;
    double got = (double)op[n*so.n + k*so.c + oh*so.h + ow*so.w];
    if (std::isnan(got)) { ++bad; continue; }
    err += (got-acc)*(got-acc); ref_norm += acc*acc;
  }
  // nothing outside the output view may be written (sliced layout leaves NaN elsewhere)
  int64_t written = 0; for (auto& v : out) if (!std::isnan((double)v)) ++written;
  double rel = std::sqrt(err / std::max(ref_norm, 1e-300));
  bool ok = bad == 0 && written == (int64_t)c.N*c.K*OH*OW && rel < (sizeof(A) == 8 ? 1e-12 : 1e-5);
  printf("%s %s N%d C%d %dx%d K%d %dx%d s%d,%d p%d,%d d%d,%d g%d in%d w%d out%d res%d bias%d ycap%u: rel=%.2e unwritten=%lld written=%lld\n",
         ok ? "ok  " : "FAIL", direct ? "direct" : "igemm ", c.N,c.C,c.H,c.W,c.K,c.R,c.S,c.sh,c.sw,c.ph,c.pw,c.dh,c.dw,c.G,c.in_fmt,c.w_fmt,c.out_fmt,c.res_fmt,(int)c.bias,c.ycap,rel,(long long)bad,(long long)written);
  return ok;
}

// pack_windows_kernel: every element of the (M x Kpad) rows, padding taps and columns zero.
// `first` and `count` (-1: all) pack one pass's images, as conv.cu does: the input pointer moved
// to image `first`, the rows of `count` images.
bool run_pack_case(const Case& c, std::mt19937& rng, unsigned blocks, unsigned threads, int first = 0,
                   int count = -1) {
  if (count < 0) count = c.N;
  int OH = (c.H + 2*c.ph - c.dh*(c.R-1) - 1)/c.sh + 1, OW = (c.W + 2*c.pw - c.dw*(c.S-1) - 1)/c.sw + 1;
  std::normal_distribution<float> nd;
  size_t in_sz; int64_t in_off;
  Strides4 si = make_strides(c.in_fmt, c.N, c.C, c.H, c.W, &in_sz, &in_off);
  std::vector<float> in(in_sz);
  for (auto& v : in) v = nd(rng);
  PackWindowsParams p{};
  p.M = count*OH*OW; p.C=c.C; p.H=c.H; p.W=c.W; p.R=c.R; p.S=c.S; p.OH=OH; p.OW=OW;
  p.stride_h=c.sh; p.stride_w=c.sw; p.pad_h=c.ph; p.pad_w=c.pw; p.dil_h=c.dh; p.dil_w=c.dw;
  p.Kred = c.C*c.R*c.S; p.Kpad = (p.Kred + 7) / 8 * 8; p.in = si;
  std::vector<float> cols((size_t)p.M * p.Kpad, NAN);
  const float* ip = in.data() + in_off;
  launch_on_cpu({blocks,1,1}, threads, [&]{ pack_windows_kernel<float>(p, ip + first*si.n, cols.data()); });
  int64_t bad = 0;
  for (int n = 0; n < count; ++n) for (int oh = 0; oh < OH; ++oh) for (int ow = 0; ow < OW; ++ow)
    for (int col = 0; col < p.Kpad; ++col) {
      float want = 0;
      if (col < p.Kred) {
        int r = col / (c.S*c.C), s = (col / c.C) % c.S, ci = col % c.C;
        int ih = oh*c.sh - c.ph + r*c.dh, iw = ow*c.sw - c.pw + s*c.dw;
        if (ih >= 0 && ih < c.H && iw >= 0 && iw < c.W) want = ip[(first+n)*si.n + ci*si.c + ih*si.h + iw*si.w];
      }
      bad += !(cols[(((int64_t)n*OH + oh)*OW + ow)*p.Kpad + col] == want);
    }
  printf("%s pack N%d C%d %dx%d %dx%d s%d,%d p%d,%d d%d,%d in%d blocks%u threads%u Kpad%d images %d+%d: %lld wrong\n",
         bad ? "FAIL" : "ok  ", c.N,c.C,c.H,c.W,c.R,c.S,c.sh,c.sw,c.ph,c.pw,c.dh,c.dw,c.in_fmt,blocks,threads,p.Kpad,
         first,count,(long long)bad);
  return bad == 0;
}

int main() {
  std::mt19937 rng(1234);
  bool ok = true;
  std::vector<Case> stems = {
    //N C  H  W  K  R S sh sw ph pw dh dw G  in w out res bias ycap
    {2, 3, 17, 15, 8, 7,7, 2,2, 3,3, 1,1, 1, 1, 0, 1, -1, true, 0},   // RGB 7x7 stem: Kred 147 -> 152
    {1, 3, 9, 9, 8, 3,3, 1,1, 1,1, 1,1, 1, 0, 0, 1, -1, true, 0},     // VGG's first layer, NCHW input
    {2, 12, 7, 8, 8, 3,3, 1,1, 1,1, 1,1, 1, 2, 0, 1, -1, true, 0},    // sliced input, Kred 108
    {1, 8, 12, 11, 8, 3,5, 1,2, 0,2, 2,1, 1, 1, 0, 1, -1, true, 0},   // non-square, stride, dilation
  };
  // threads below, at and above a row's length (columns looped), blocks below and above the rows
  for (auto& c : stems) for (unsigned blocks : {1u, 3u, 64u}) for (unsigned threads : {32u, 160u})
    ok &= run_pack_case(c, rng, blocks, threads);
  // A stem in passes: 5 images in passes of 2 (the last short), NCHW and sliced inputs.
  for (int in_fmt : {0, 2}) for (int first : {0, 2, 4}) {
    const Case c = {5, 3, 13, 11, 8, 7,7, 2,2, 3,3, 1,1, 1, in_fmt, 0, 1, -1, true, 0};
    ok &= run_pack_case(c, rng, 7, 160, first, std::min(2, c.N - first));
  }
  std::vector<Case> cases = {
    //N C  H  W  K  R S sh sw ph pw dh dw G  in w out res bias ycap
    {2, 5, 6, 7, 3, 1,1, 1,1, 0,0, 1,1, 1, 0, 0, 0, -1, true, 65535},
    {2, 3, 8, 8, 7, 3,3, 1,1, 1,1, 1,1, 1, 1, 0, 1, 1, true, 65535},
    {1, 4,11, 9, 6, 5,5, 2,2, 2,2, 1,1, 1, 2, 1, 0, 2, false, 65535},
    {1, 3,23,23, 4,11,11,4,4, 2,2, 1,1, 1, 0, 0, 1, 0, true, 65535},
    {2, 4, 7, 6, 5, 3,1, 1,1, 1,0, 1,1, 1, 1, 1, 1, -1, true, 65535},
    {1, 3, 6,10, 4, 1,5, 1,2, 0,2, 1,1, 1, 2, 0, 0, 1, true, 65535},
    {1, 4, 9, 9, 4, 3,3, 1,1, 2,2, 2,2, 1, 0, 0, 0, 0, true, 65535},
    {2, 6, 7, 7, 4, 3,3, 1,1, 1,1, 1,1, 2, 1, 0, 1, 1, true, 65535},
    {2, 6, 7, 7, 4, 3,3, 1,1, 1,1, 1,1, 2, 1, 0, 1, 1, true, 1},     // groups looped inside the block
    {3, 40, 9, 10, 130, 3,3, 2,1, 1,0, 1,2, 1, 1, 1, 1, 2, true, 65535}, // 3 column tiles, Kred=360
    {3, 40, 9, 10, 130, 3,3, 2,1, 1,0, 1,2, 1, 0, 0, 0, -1, true, 2},
    {1, 64, 12, 11, 96, 3,3, 1,1, 1,1, 1,1, 4, 1, 1, 1, 1, true, 3},   // groups 4, Cg=16, Kg=24
    {2, 17, 5, 5, 9, 2,4, 3,1, 0,3, 1,1, 1, 2, 0, 1, 0, true, 65535},
  };
  for (auto& c : cases) { ok &= run_case<double, double>(c, rng, false); ok &= run_case<float, float>(c, rng, false); }
  std::vector<Case> dw = {
    {1, 5, 8, 8, 5, 3,3, 1,1, 1,1, 1,1, 5, 0, 0, 0, -1, true, 65535},
    {2, 5, 8, 8, 5, 3,3, 1,1, 1,1, 1,1, 5, 1, 1, 1, 1, true, 65535},
    {2, 4, 9, 7, 8, 5,3, 2,1, 2,1, 2,1, 4, 2, 0, 1, 2, true, 3},     // channel multiplier 2, grid-stride
    {2, 4, 9, 7, 8, 5,3, 2,1, 2,1, 2,1, 4, 2, 0, 0, 0, false, 3},
    {1, 1, 9, 9, 3, 3,3, 1,1, 1,1, 1,1, 1, 0, 0, 0, -1, true, 65535}, // C == 1, groups 1
  };
  for (auto& c : dw) { ok &= run_case<double, double>(c, rng, true); ok &= run_case<float, float>(c, rng, true); }
  for (auto& c : dw) ok &= run_case<double, double>(c, rng, false);  // the GEMM kernel must handle Cg==1 too
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
