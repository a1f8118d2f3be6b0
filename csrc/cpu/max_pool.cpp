// 2-d max pooling on the CPU for [N, C, H, W] contiguous input (dilation 1, floor output size):
// the forward and a backward that finds each window's argmax itself, so that a layer can keep its
// (spike) input compactly instead of the int64 indices (spikeops/nn/spike_layers.py).
//
//   out[n, c, oy, ox] = max over the window rows iy in [oy sH - pH, + kH), cols ix in [ox sW - pW, + kW)
//                       (clipped to the input; NaN if the window holds one)
//   grad_in[n, c, argmax] += grad_out[n, c, oy, ox], outputs taken in order
//
// argmax is ATen's (aten/src/ATen/native/cpu/MaxPoolKernel.cpp, described, not copied): the window
// is scanned row by row, a value replacing the running maximum (from -inf, index the window's first
// position) when it is greater or NaN. The backward adds in the order ATen's does, so gradients
// are bitwise equal to max_pool2d_with_indices_backward's.
//
// max_pool2d_backward_bits: the same for 0/1 input given as bits (the flat N C H W order packed into
// int64 words, as spikeops.ops.compact saves a layer's contiguous spike input): the argmax is the
// first set bit of the window in row-major order, or its first position when it has none.
//
// Channels-last input ([N, C, H, W] with C innermost in memory, as a channels-last stem makes it):
// the same outputs and gradients, each window's pixels scanned in row-major order with the channels
// of a pixel as vector lanes (loops compiled for AVX-512, AVX2 and baseline x86-64, picked per call).
// The backward takes the input's values (a layer saving channels-last spikes as bits unpacks them
// first: 0.9 ms next to this backward's 7.0 ms for a [64, 192, 32, 32] bf16 on the 2-core VM).
// Threads split the images in the backward (windows overlap), the images' output rows in the forward.
//
// Forward: separable. Per output row, the max over the window's rows is taken for the whole input
// row (contiguous, vectorised), then over each window's columns. The values are the window's
// maximum either way (only the sign of a zero maximum may differ from ATen's first-in-scan-order
// pick: -0. and 0. compare equal). The planes (n, c) are split over the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ops.h"
#include "float_staging.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

struct Window {
  int64_t k, s, p, in, out;
  int64_t begin(int64_t o) const { return std::max<int64_t>(o * s - p, 0); }
  int64_t end(int64_t o) const { return std::min<int64_t>(o * s - p + k, in); }
};

// The running maximum's update (ATen's): greater, or NaN.
template <typename T>
inline bool replaces(T val, T maxval) { return val > maxval || std::isnan(val); }

// Whether x is laid out channels-last (else contiguous NCHW); anything else is refused.
bool channels_last(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)), op,
              ": input must be a contiguous or channels-last [N, C, H, W] tensor");
  return !x.is_contiguous();
}

// The row and column windows of an H x W input, after checking the geometry.
std::pair<Window, Window> windows(const char* op, int64_t H, int64_t W, int64_t kH, int64_t kW, int64_t sH, int64_t sW,
                                  int64_t pH, int64_t pW) {
  TORCH_CHECK(kH > 0 && kW > 0 && sH > 0 && sW > 0 && pH >= 0 && pW >= 0 && 2 * pH <= kH && 2 * pW <= kW, op,
              ": need kernel > 0, stride > 0, 0 <= padding <= kernel / 2");
  TORCH_CHECK(H + 2 * pH >= kH && W + 2 * pW >= kW, op, ": the padded input is smaller than the kernel");
  return {Window{kH, sH, pH, H, (H + 2 * pH - kH) / sH + 1}, Window{kW, sW, pW, W, (W + 2 * pW - kW) / sW + 1}};
}

void check_grad_out(const char* op, const at::Tensor& g, int64_t N, int64_t C, const Window& R, const Window& Cw,
                    bool nhwc = false) {
  const auto format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(g.dim() == 4 && g.is_contiguous(format) && g.size(0) == N && g.size(1) == C && g.size(2) == R.out &&
                  g.size(3) == Cw.out,
              op, ": grad_out must be a ", nhwc ? "channels-last" : "contiguous", " [", N, ", ", C, ", ", R.out, ", ",
              Cw.out, "] tensor (the output's shape and the input's layout)");
}

// The input pixels (iy * W + ix) of output (oy, ox)'s window in row-major order; returns how many.
inline int window_pixels(const Window& R, const Window& Cw, int64_t oy, int64_t ox, std::vector<int64_t>& pixels) {
  pixels.clear();
  for (int64_t iy = R.begin(oy); iy < R.end(oy); ++iy)
    for (int64_t ix = Cw.begin(ox); ix < Cw.end(ox); ++ix) pixels.push_back(iy * Cw.in + ix);
  return static_cast<int>(pixels.size());
}

// The channels-last loops take E: float, uint16_t (bf16 bits, float_staging.h), c10::Half or
// double, and compute in A: float, or double for double (the maximum is one of the inputs: exact).
template <typename E>
using acc_of = std::conditional_t<std::is_same_v<E, double>, double, float>;
inline float load_acc(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline double load_acc(const double* p, int64_t i) { return p[i]; }
inline float load_acc(const float* p, int64_t i) { return load_float(p, i); }
inline float load_acc(const uint16_t* p, int64_t i) { return load_float(p, i); }
inline void store_acc(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void store_acc(double* p, int64_t i, double v) { p[i] = v; }
inline void store_acc(float* p, int64_t i, float v) { store_float(p, i, v); }
inline void store_acc(uint16_t* p, int64_t i, float v) { store_float(p, i, v); }

// dst[c] = the maximum over the window's pixels of image[pixel, c] (ATen's running maximum).
template <typename E>
static inline __attribute__((always_inline)) void window_max_body(const E* image, const int64_t* pixels, int count,
                                                                  int64_t C, acc_of<E>* best, E* dst) {
  for (int64_t c = 0; c < C; ++c) best[c] = load_acc(image + pixels[0] * C, c);
  for (int j = 1; j < count; ++j) {
    const E* px = image + pixels[j] * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_of<E> v = load_acc(px, c);
      best[c] = replaces(v, best[c]) ? v : best[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) store_acc(dst, c, best[c]);
}

// arg[c] = the index into pixels of channel c's argmax over the window (ATen's: the first maximum,
// NaN wins; from -inf, so the first pixel when none is greater).
template <typename E>
static inline __attribute__((always_inline)) void window_argmax_body(const E* image, const int64_t* pixels,
                                                                     int count, int64_t C, acc_of<E>* best,
                                                                     int32_t* arg) {
  for (int64_t c = 0; c < C; ++c) best[c] = -std::numeric_limits<acc_of<E>>::infinity(), arg[c] = 0;
  for (int j = 0; j < count; ++j) {
    const E* px = image + pixels[j] * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_of<E> v = load_acc(px, c);
      const bool take = replaces(v, best[c]);
      best[c] = take ? v : best[c];
      arg[c] = take ? j : arg[c];
    }
  }
}

// grad[pixels[j], c] += g[c] where arg[c] == j, rounded to E after the add as ATen's backward
// rounds. Pixel by pixel over all channels with a select (vectorised): the other lanes are stored
// back as they were loaded (in bf16 a NaN's payload becomes 0x7FC0 on the way).
template <typename E>
static inline __attribute__((always_inline)) void add_at_argmax_body(E* grad, const int64_t* pixels, int count,
                                                                     int64_t C, const int32_t* arg, const E* g) {
  for (int j = 0; j < count; ++j) {
    E* dst = grad + pixels[j] * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_of<E> d = load_acc(dst, c);
      store_acc(dst, c, arg[c] == j ? d + load_acc(g, c) : d);
    }
  }
}

// Each loop above compiled for x86-64-v4, AVX2 and baseline x86-64, picked per call
// (simd_variants.h).
SPIKEOPS_SIMD_VARIANTS(template <typename E>, void, window_max, (const E* image, const int64_t* pixels, int count,
                       int64_t C, acc_of<E>* best, E* dst), (image, pixels, count, C, best, dst))
SPIKEOPS_SIMD_VARIANTS(template <typename E>, void, window_argmax, (const E* image, const int64_t* pixels, int count,
                       int64_t C, acc_of<E>* best, int32_t* arg), (image, pixels, count, C, best, arg))
SPIKEOPS_SIMD_VARIANTS(template <typename E>, void, add_at_argmax, (E* grad, const int64_t* pixels, int count,
                       int64_t C, const int32_t* arg, const E* g), (grad, pixels, count, C, arg, g))

// E for a dispatched scalar_t: bf16 as its bits.
template <typename scalar_t>
using pool_elem_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;
template <typename scalar_t>
pool_elem_t<scalar_t>* pool_elems(scalar_t* p) { return reinterpret_cast<pool_elem_t<scalar_t>*>(p); }
template <typename scalar_t>
const pool_elem_t<scalar_t>* pool_elems(const scalar_t* p) {
  return reinterpret_cast<const pool_elem_t<scalar_t>*>(p);
}

// Channels-last forward: out [N, H_out, W_out, C] from x [N, H, W, C].
template <typename E>
void max_pool_nhwc(const E* x, E* out, int64_t N, int64_t C, const Window R, const Window Cw) {
  at::parallel_for(0, N * R.out, 1, [&](int64_t r0, int64_t r1) {  // (image, output row)
    std::vector<acc_of<E>> best(C);
    std::vector<int64_t> pixels;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / R.out, oy = r % R.out;
      for (int64_t ox = 0; ox < Cw.out; ++ox) {
        const int count = window_pixels(R, Cw, oy, ox, pixels);
        window_max(x + n * R.in * Cw.in * C, pixels.data(), count, C, best.data(), out + (r * Cw.out + ox) * C);
      }
    }
  });
}

// Channels-last backward: grad_in [N, H, W, C] zeroed an image at a time, then, for each output
// pixel in order, each channel's gradient added at its argmax: each element gets one add per
// output whose argmax it is, in output order, as ATen adds.
template <typename E>
void max_pool_backward_nhwc(const E* g, const E* x, E* gi, int64_t N, int64_t C, const Window R, const Window Cw) {
  const int64_t HW = R.in * Cw.in;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<int64_t> pixels;
    std::vector<acc_of<E>> best(C);
    std::vector<int32_t> arg(C);
    for (int64_t n = n0; n < n1; ++n) {
      E* image_grad = gi + n * HW * C;
      std::memset(static_cast<void*>(image_grad), 0, HW * C * sizeof(E));  // all-zero bits: +0 in every float type
      for (int64_t oy = 0; oy < R.out; ++oy) {
        for (int64_t ox = 0; ox < Cw.out; ++ox) {
          const int count = window_pixels(R, Cw, oy, ox, pixels);
          window_argmax(x + n * HW * C, pixels.data(), count, C, best.data(), arg.data());
          add_at_argmax(image_grad, pixels.data(), count, C, arg.data(), g + ((n * R.out + oy) * Cw.out + ox) * C);
        }
      }
    }
  });
}

// Both backwards: grad_in [planes, H, W] zeroed a plane at a time (while it is in cache), then
// grad_in[plane, argmax(y0, y1, x0, x1)] += grad_out[plane, oy, ox] for the outputs in order, the
// window being rows [y0, y1) and columns [x0, x1); plane_argmax(plane, scratch) gives the plane's
// argmax, which returns a flat index into the plane (scratch: a buffer of the thread's own, reused).
template <typename scalar_t, typename PlaneArgMax>
void scatter_to_argmax(const scalar_t* g, scalar_t* gi, int64_t planes, const Window R, const Window Cw,
                       const PlaneArgMax& plane_argmax) {
  const int64_t H = R.in, W = Cw.in;
  std::vector<int64_t> x0(Cw.out), x1(Cw.out);  // the window columns of each output column
  for (int64_t ox = 0; ox < Cw.out; ++ox) x0[ox] = Cw.begin(ox), x1[ox] = Cw.end(ox);
  at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint64_t> scratch;
    std::vector<int64_t> args(Cw.out);
    for (int64_t plane = p0; plane < p1; ++plane) {
      const scalar_t* go = g + plane * R.out * Cw.out;
      scalar_t* dst = gi + plane * H * W;
      std::memset(static_cast<void*>(dst), 0, H * W * sizeof(scalar_t));  // all-zero bits: +0 in every float type
      const auto argmax = plane_argmax(plane, scratch);
      for (int64_t oy = 0; oy < R.out; ++oy) {
        // a row's argmaxes first, then its adds: the adds' loads and stores then do not hold up
        // the search of the next windows
        const int64_t y0 = R.begin(oy), y1 = R.end(oy);
        for (int64_t ox = 0; ox < Cw.out; ++ox) args[ox] = argmax(y0, y1, x0[ox], x1[ox]);
        for (int64_t ox = 0; ox < Cw.out; ++ox) dst[args[ox]] += go[oy * Cw.out + ox];
      }
    }
  });
}

// Bits e .. e + len (len <= 64) of the flat bit array, e.g. of an input row: one word or two.
inline uint64_t bit_run(const uint64_t* bits, int64_t e, int64_t len) {
  const int64_t word = e >> 6, shift = e & 63;
  uint64_t r = bits[word] >> shift;
  if (shift + len > 64) r |= bits[word + 1] << (64 - shift);
  return len == 64 ? r : r & ((1ull << len) - 1);
}

// The argmax of a window of <= 4 rows of <= 16 columns from (y0, x0), given its rows' bits 16
// apart in one word: the first set bit is the first spike in row-major order (found without a
// branch on the data: spikes fall at random); no spike: the window's first position (0 > -inf).
inline int64_t first_spike(uint64_t all, int64_t y0, int64_t x0, int64_t W) {
  const int64_t k = __builtin_ctzll(all | (1ull << 63));
  return all ? (y0 + (k >> 4)) * W + x0 + (k & 15) : y0 * W + x0;
}

// The argmaxes (first_spike) of one output row of a plane whose rows are words (rows[iy], W <= 64
// bits), for windows of NR rows from y0 and at most 16 columns (x0[ox], mask[ox]).
template <int NR>
inline void row_argmax(const uint64_t* rows, int64_t y0, int64_t W, const int64_t* x0, const uint64_t* mask,
                       int64_t n_out, int64_t* args) {
  for (int64_t ox = 0; ox < n_out; ++ox) {
    uint64_t all = 0;
    for (int r = 0; r < NR; ++r) all |= ((rows[y0 + r] >> x0[ox]) & mask[ox]) << (16 * r);
    args[ox] = first_spike(all, y0, x0[ox], W);
  }
}

// max_pool2d_backward_bits where every row fits a word and every window 4 rows of 16 columns (the
// pooling of Spikformer's stems: 3 x 3, stride 2), for grads of fp32 or bf16 (E, float_staging.h):
// scatter_to_argmax's work without its per-window calls, a row's argmaxes first, then its adds.
template <typename E>
void scatter_to_argmax_small(const uint64_t* bits, const E* g, E* gi, int64_t planes, const Window R,
                             const Window Cw) {
  const int64_t H = R.in, W = Cw.in;
  std::vector<int64_t> x0(Cw.out);
  std::vector<uint64_t> mask(Cw.out);
  for (int64_t ox = 0; ox < Cw.out; ++ox) {
    x0[ox] = Cw.begin(ox);
    mask[ox] = (1ull << (Cw.end(ox) - x0[ox])) - 1;  // <= 16 columns
  }
  at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint64_t> rows(H);
    std::vector<int64_t> args(Cw.out);
    for (int64_t plane = p0; plane < p1; ++plane) {
      for (int64_t iy = 0; iy < H; ++iy) rows[iy] = bit_run(bits, (plane * H + iy) * W, W);
      const E* go = g + plane * R.out * Cw.out;
      E* dst = gi + plane * H * W;
      std::memset(static_cast<void*>(dst), 0, H * W * sizeof(E));
      for (int64_t oy = 0; oy < R.out; ++oy) {
        const int64_t y0 = R.begin(oy);
        switch (R.end(oy) - y0) {
          case 1: row_argmax<1>(rows.data(), y0, W, x0.data(), mask.data(), Cw.out, args.data()); break;
          case 2: row_argmax<2>(rows.data(), y0, W, x0.data(), mask.data(), Cw.out, args.data()); break;
          case 3: row_argmax<3>(rows.data(), y0, W, x0.data(), mask.data(), Cw.out, args.data()); break;
          default: row_argmax<4>(rows.data(), y0, W, x0.data(), mask.data(), Cw.out, args.data()); break;
        }
        const E* grow = go + oy * Cw.out;
        for (int64_t ox = 0; ox < Cw.out; ++ox)  // in output order, rounded after each add, as ATen adds
          store_float(dst, args[ox], load_float(dst, args[ox]) + load_float(grow, ox));
      }
    }
  });
}

// scatter_to_argmax_small where it applies (fp32 / bf16, rows of <= 64 bits, windows of <= 4 x
// 16): true; else false (nothing done).
template <typename scalar_t>
bool scatter_to_argmax_small_if(const uint64_t* bits, const scalar_t* g, scalar_t* gi, int64_t planes,
                                const Window R, const Window Cw) {
  if constexpr (kInLoop<scalar_t>) {
    if (Cw.in <= 64 && R.k <= 4 && Cw.k <= 16) {
      scatter_to_argmax_small(bits, in_loop(g), in_loop(gi), planes, R, Cw);
      return true;
    }
  }
  return false;
}

}  // namespace

at::Tensor max_pool2d_forward(const at::Tensor& x, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t pH,
                              int64_t pW) {
  const bool nhwc = channels_last("max_pool2d_forward", x);
  const std::pair<Window, Window> rc = windows("max_pool2d_forward", x.size(2), x.size(3), kH, kW, sH, sW, pH, pW);
  const Window R = rc.first, Cw = rc.second;
  const int64_t planes = x.size(0) * x.size(1), H = R.in, W = Cw.in;
  auto out = at::empty({x.size(0), x.size(1), R.out, Cw.out},
                       x.options().memory_format(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (nhwc) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_forward", [&] {
      max_pool_nhwc(pool_elems(x.const_data_ptr<scalar_t>()), pool_elems(out.mutable_data_ptr<scalar_t>()), x.size(0),
                    x.size(1), R, Cw);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for fp16 / bf16: exact, the maximum is an input
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> rowmax(W);
      for (int64_t plane = p0; plane < p1; ++plane) {
        const scalar_t* src = in + plane * H * W;
        for (int64_t oy = 0; oy < R.out; ++oy) {
          const int64_t y0 = R.begin(oy), y1 = R.end(oy);
          acc_t* m = rowmax.data();
          for (int64_t ix = 0; ix < W; ++ix) m[ix] = static_cast<acc_t>(src[y0 * W + ix]);
          for (int64_t iy = y0 + 1; iy < y1; ++iy) {
            const scalar_t* row = src + iy * W;
            for (int64_t ix = 0; ix < W; ++ix) {
              const acc_t v = static_cast<acc_t>(row[ix]);
              m[ix] = replaces(v, m[ix]) ? v : m[ix];
            }
          }
          scalar_t* dst = o + (plane * R.out + oy) * Cw.out;
          for (int64_t ox = 0; ox < Cw.out; ++ox) {
            const int64_t x0 = Cw.begin(ox), x1 = Cw.end(ox);
            acc_t best = m[x0];
            for (int64_t ix = x0 + 1; ix < x1; ++ix) best = replaces(m[ix], best) ? m[ix] : best;
            dst[ox] = static_cast<scalar_t>(best);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& x, int64_t kH, int64_t kW, int64_t sH,
                               int64_t sW, int64_t pH, int64_t pW) {
  const bool nhwc = channels_last("max_pool2d_backward", x);
  const std::pair<Window, Window> rc = windows("max_pool2d_backward", x.size(2), x.size(3), kH, kW, sH, sW, pH, pW);
  const Window R = rc.first, Cw = rc.second;
  check_grad_out("max_pool2d_backward", grad_out, x.size(0), x.size(1), R, Cw, nhwc);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "max_pool2d_backward: grad_out must have the input's dtype");
  const int64_t H = R.in, W = Cw.in;
  auto grad_in = at::empty_like(x);  // (x's layout)
  if (nhwc) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_backward", [&] {
      max_pool_backward_nhwc(pool_elems(grad_out.const_data_ptr<scalar_t>()), pool_elems(x.const_data_ptr<scalar_t>()),
                             pool_elems(grad_in.mutable_data_ptr<scalar_t>()), x.size(0), x.size(1), R, Cw);
    });
    return grad_in;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scatter_to_argmax(grad_out.const_data_ptr<scalar_t>(), grad_in.mutable_data_ptr<scalar_t>(), x.size(0) * x.size(1),
                      R, Cw, [in, H, W](int64_t plane, std::vector<uint64_t>&) {
      const scalar_t* src = in + plane * H * W;
      return [src, W](int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
        int64_t arg = y0 * W + x0;
        acc_t best = -std::numeric_limits<acc_t>::infinity();
        for (int64_t iy = y0; iy < y1; ++iy) {
          for (int64_t ix = x0; ix < x1; ++ix) {
            const acc_t v = static_cast<acc_t>(src[iy * W + ix]);
            const bool take = replaces(v, best);  // selects, not branches: spikes tie at random
            best = take ? v : best;
            arg = take ? iy * W + ix : arg;
          }
        }
        return arg;
      };
    });
  });
  return grad_in;
}

at::Tensor max_pool2d_backward_bits(const at::Tensor& grad_out, const at::Tensor& words, int64_t H, int64_t W,
                                    int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t pH, int64_t pW) {
  const std::pair<Window, Window> rc = windows("max_pool2d_backward_bits", H, W, kH, kW, sH, sW, pH, pW);
  const Window R = rc.first, Cw = rc.second;
  TORCH_CHECK(kW <= 64, "max_pool2d_backward_bits: kernel width must be <= 64");
  TORCH_CHECK(grad_out.dim() == 4, "max_pool2d_backward_bits: grad_out must be [N, C, H_out, W_out]");
  check_grad_out("max_pool2d_backward_bits", grad_out, grad_out.size(0), grad_out.size(1), R, Cw);
  const int64_t planes = grad_out.size(0) * grad_out.size(1);
  TORCH_CHECK(words.scalar_type() == at::kLong && words.is_contiguous() && words.numel() * 64 == planes * H * W,
              "max_pool2d_backward_bits: words must be contiguous int64 holding the N C H W input bits in order");
  auto grad_in = at::empty({grad_out.size(0), grad_out.size(1), H, W}, grad_out.options());
  const uint64_t* bits = reinterpret_cast<const uint64_t*>(words.const_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward_bits", [&] {
    if (scatter_to_argmax_small_if(bits, grad_out.const_data_ptr<scalar_t>(), grad_in.mutable_data_ptr<scalar_t>(),
                                   planes, R, Cw))
      return;
    scatter_to_argmax(grad_out.const_data_ptr<scalar_t>(), grad_in.mutable_data_ptr<scalar_t>(), planes, R, Cw,
                      [bits, H, W](int64_t plane, std::vector<uint64_t>& rows) {
      // the plane's rows as words, each extracted once (not once per window holding it), when they fit
      rows.resize(W <= 64 ? H : 0);
      for (int64_t iy = 0; iy < static_cast<int64_t>(rows.size()); ++iy)
        rows[iy] = bit_run(bits, (plane * H + iy) * W, W);
      return [bits, rows = rows.data(), plane, H, W](int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
        const int64_t len = x1 - x0;
        const uint64_t lane_mask = len == 64 ? ~0ull : (1ull << len) - 1;
        // the window's bits of input row iy
        auto window = [&](int64_t iy) {
          return W <= 64 ? (rows[iy] >> x0) & lane_mask : bit_run(bits, (plane * H + iy) * W + x0, len);
        };
        if (len <= 16 && y1 - y0 <= 4) {  // the window's rows 16 bits apart in one word
          uint64_t all = 0;
          for (int64_t r = 0; r < y1 - y0; ++r) all |= window(y0 + r) << (16 * r);
          return first_spike(all, y0, x0, W);
        }
        for (int64_t iy = y0; iy < y1; ++iy) {
          const uint64_t r = window(iy);
          if (r) return iy * W + x0 + static_cast<int64_t>(__builtin_ctzll(r));
        }
        return y0 * W + x0;  // no spike: the first position (0 > -inf)
      };
    });
  });
  return grad_in;
}

}  // namespace cpu
}  // namespace spikeops
