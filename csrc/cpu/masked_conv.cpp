// Masked (block-sparse) convolution on the CPU (semantics: spikeops/reference.py,
// masked_conv2d_reference; design notes: spikeops/ops/masked_conv.py).
//
// The output grid [N, C_out, Ho, Wo] is cut into bh x bw blocks, one per cell of the mask at its
// native resolution; `blocks` [nb, 3] int32 lists the visible ones as (n, by, bx) in
// torch.nonzero order. Nothing is computed for masked blocks; the output is written once
// (computed values in visible blocks, exactly 0 in masked ones). Two ways to run the product on
// the visible blocks, picked per call by block size:
//
//  * "window" (blocks of >= 16 pixels whose halo is small next to im2col's kh*kw copies, e.g. the
//    8x8 / 4x4 blocks of the 112 / 56 grids under a 14x14 mask, 3x3 kernel): gather each visible
//    block's input window, halo included (3x3/pad 1: (bh+2) x (bw+2), zero outside the image),
//    into a channels-last batch [nb, C, WH, WW] and run torch's own convolution on it
//    (at::convolution: oneDNN, fastest in NHWC), which gives exactly the [nb, C_out, bh, bw]
//    visible outputs. Backward: at::convolution_backward on the windows, then the window
//    gradients are added back into dx (overlapping halos add up).
//  * "pixel" (small blocks; non-overlapping kernels such as 2x2/stride 2): im2col of the visible
//    pixels, cols [P, K] (P = nb * bh * bw, K = C * kh * kw, pixel-major), one GEMM
//    rows [C_out, P] = W [C_out, K] @ cols^T (at::mm: the BLAS torch links), in chunks of
//    >= 1024 pixels / ~16 MB of cols. Backward:
//    G [C_out, P] = grad_out at the visible pixels; dW = G @ cols; db = sum_p G;
//    dcols = G^T @ W; dx = col2im(dcols).
//
// Input pixels outside every visible block's receptive field get exactly 0 gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "../ops.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = int64_t(1) << 22;  // im2col chunk: ~16 MB of fp32
constexpr int64_t kMinChunkPixels = 1024;           // keeps the GEMM's N dimension large
constexpr int64_t kWindowMinPixels = 16;            // blocks this large use the window path
constexpr auto kNHWC = at::MemoryFormat::ChannelsLast;

struct Geom {
  int64_t N, C, H, W;  // input
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Ho, Wo, bh, bw;  // output and block size
  int64_t WH() const { return (bh - 1) * sh + kh; }  // input window of one block
  int64_t WW() const { return (bw - 1) * sw + kw; }
};

void check_blocks(const at::Tensor& blocks, const char* fn) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == 3 && blocks.scalar_type() == at::kInt && blocks.is_contiguous(),
              fn, ": blocks must be contiguous int32 [nb, 3] (n, by, bx)");
}

void check_dtype(const at::Tensor& t, const char* fn) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, fn,
              ": float32, float16 or bfloat16 only, got ", t.scalar_type());
}

// Channels-last buffers are moved to / from NCHW planes in tiles of kTile channels: one pixel's
// kTile channels are one contiguous cache line on the NHWC side, and the kTile plane rows on the
// NCHW side stay in L1 while a row of pixels is walked.
constexpr int64_t kTile = 16;

// The visible-block index of every mask cell [N, h, w] (its row in `blocks`), -1 when masked.
std::vector<int32_t> block_index(const int32_t* blocks, int64_t nb, int64_t N, int64_t h, int64_t w) {
  std::vector<int32_t> map(N * h * w, -1);
  for (int64_t b = 0; b < nb; ++b) map[(blocks[3 * b] * h + blocks[3 * b + 1]) * w + blocks[3 * b + 2]] = int32_t(b);
  return map;
}

// The visible pixels of t [N, C, H, W] (NCHW) into vis [P, C] (pixel-major = a channels-last
// [nb, C, bh, bw]), pixel p = (b * bh + py) * bw + px. Walks the rows of t, skipping masked blocks.
template <typename scalar_t>
void gather_visible(const scalar_t* t, const int32_t* map, int64_t N, int64_t C, int64_t H, int64_t W, int64_t bh,
                    int64_t bw, scalar_t* vis) {
  const int64_t h = H / bh, w = W / bw, HW = H * W, tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, N * tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / tiles, c0 = (i % tiles) * kTile, cn = std::min(kTile, C - c0);
      const scalar_t* plane = t + (n * C + c0) * HW;
      for (int64_t y = 0; y < H; ++y) {
        const int32_t* mrow = map + (n * h + y / bh) * w;
        const int64_t py = y % bh;
        for (int64_t bx = 0; bx < w; ++bx) {
          const int64_t b = mrow[bx];
          if (b < 0) continue;
          const scalar_t* s = plane + y * W + bx * bw;
          scalar_t* d = vis + ((b * bh + py) * bw) * C + c0;
          if (cn == kTile) {  // constant trip count: unrolled
            for (int64_t px = 0; px < bw; ++px)
              for (int64_t cc = 0; cc < kTile; ++cc) d[px * C + cc] = s[cc * HW + px];
          } else {
            for (int64_t px = 0; px < bw; ++px)
              for (int64_t cc = 0; cc < cn; ++cc) d[px * C + cc] = s[cc * HW + px];
          }
        }
      }
    }
  });
}

// out [N, C, H, W] (NCHW) = vis [P, C] (+ bias) at the visible pixels, exactly 0 elsewhere: every
// output element is written once, row by row. Masked blocks go through the same loop, reading
// zeros with no bias (GCC turned a separate zero-store loop into a memset call per channel and
// block: 10x slower for blocks of 1 or 2 pixels).
template <typename scalar_t>
void fill_output(const scalar_t* vis, const int32_t* map, int64_t N, int64_t C, int64_t H, int64_t W, int64_t bh,
                 int64_t bw, const float* bias, scalar_t* out) {
  const int64_t h = H / bh, w = W / bw, HW = H * W, tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, N * tiles, 1, [&](int64_t i0, int64_t i1) {
    const scalar_t zeros[kTile] = {};
    const float no_bias[kTile] = {};
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / tiles, c0 = (i % tiles) * kTile, cn = std::min(kTile, C - c0);
      float bc[kTile];
      for (int64_t cc = 0; cc < kTile; ++cc) bc[cc] = bias && cc < cn ? bias[c0 + cc] : 0.0f;
      scalar_t* plane = out + (n * C + c0) * HW;
      for (int64_t y = 0; y < H; ++y) {
        const int32_t* mrow = map + (n * h + y / bh) * w;
        const int64_t py = y % bh;
        for (int64_t bx = 0; bx < w; ++bx) {
          const int64_t b = mrow[bx];
          const bool visible = b >= 0;
          const scalar_t* s = visible ? vis + ((b * bh + py) * bw) * C + c0 : zeros;
          const int64_t step = visible ? C : 0;
          const float* add = visible ? bc : no_bias;
          scalar_t* d = plane + y * W + bx * bw;
          if (cn == kTile) {  // constant trip count: unrolled
            for (int64_t px = 0; px < bw; ++px)
              for (int64_t cc = 0; cc < kTile; ++cc)
                d[cc * HW + px] = static_cast<scalar_t>(static_cast<float>(s[px * step + cc]) + add[cc]);
          } else {
            for (int64_t px = 0; px < bw; ++px)
              for (int64_t cc = 0; cc < cn; ++cc)
                d[cc * HW + px] = static_cast<scalar_t>(static_cast<float>(s[px * step + cc]) + add[cc]);
          }
        }
      }
    }
  });
}

// The valid range [lo, hi) of j for which 0 <= base + j < size, clipped to [0, len).
inline std::array<int64_t, 2> valid_range(int64_t base, int64_t size, int64_t len) {
  const int64_t lo = std::clamp<int64_t>(-base, 0, len);
  const int64_t hi = std::clamp<int64_t>(size - base, lo, len);
  return {lo, hi};
}

// patches[b, wy, wx, c] (NHWC, i.e. a channels-last [nb, C, WH, WW]) = x[n, c, iy0 + wy, ix0 + wx],
// 0 outside the image; iy0 = by * bh * sh - ph, ix0 = bx * bw * sw - pw: each visible block's input window.
template <typename scalar_t>
void gather_windows(const scalar_t* x, const Geom& g, const int32_t* blocks, int64_t nb, scalar_t* patches) {
  const int64_t WH = g.WH(), WW = g.WW(), C = g.C, HW = g.H * g.W;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = blocks[3 * b];
      const int64_t iy0 = blocks[3 * b + 1] * g.bh * g.sh - g.ph, ix0 = blocks[3 * b + 2] * g.bw * g.sw - g.pw;
      const auto [xlo, xhi] = valid_range(ix0, g.W, WW);
      const auto [ylo, yhi] = valid_range(iy0, g.H, WH);
      scalar_t* pb = patches + b * WH * WW * C;
      if (ylo > 0 || yhi < WH || xlo > 0 || xhi < WW) std::fill(pb, pb + WH * WW * C, scalar_t(0));
      const scalar_t* xb = x + n * C * HW + iy0 * g.W + ix0;
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        const int64_t cn = std::min(kTile, C - c0);
        for (int64_t wy = ylo; wy < yhi; ++wy)
          for (int64_t wx = xlo; wx < xhi; ++wx) {
            const scalar_t* s = xb + c0 * HW + wy * g.W + wx;
            scalar_t* d = pb + (wy * WW + wx) * C + c0;
            if (cn == kTile) {
              for (int64_t cc = 0; cc < kTile; ++cc) d[cc] = s[cc * HW];
            } else {
              for (int64_t cc = 0; cc < cn; ++cc) d[cc] = s[cc * HW];
            }
          }
      }
    }
  });
}

// dx[n, c, iy0 + wy, ix0 + wx] += gpatches[b, wy, wx, c] (NHWC) inside the image: the transpose of
// gather_windows. Windows of neighbouring blocks overlap, so threads split the channels (tiles).
template <typename scalar_t>
void scatter_add_windows(const scalar_t* gpatches, const Geom& g, const int32_t* blocks, int64_t nb, float* dx) {
  const int64_t WH = g.WH(), WW = g.WW(), C = g.C, HW = g.H * g.W;
  at::parallel_for(0, (C + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t n = blocks[3 * b];
      const int64_t iy0 = blocks[3 * b + 1] * g.bh * g.sh - g.ph, ix0 = blocks[3 * b + 2] * g.bw * g.sw - g.pw;
      const auto [xlo, xhi] = valid_range(ix0, g.W, WW);
      const auto [ylo, yhi] = valid_range(iy0, g.H, WH);
      const scalar_t* pb = gpatches + b * WH * WW * C;
      float* db = dx + n * C * HW + iy0 * g.W + ix0;
      for (int64_t c0 = t0 * kTile; c0 < std::min(C, t1 * kTile); c0 += kTile) {
        const int64_t cn = std::min(kTile, C - c0);
        for (int64_t wy = ylo; wy < yhi; ++wy)
          for (int64_t wx = xlo; wx < xhi; ++wx) {
            const scalar_t* s = pb + (wy * WW + wx) * C + c0;
            float* d = db + c0 * HW + wy * g.W + wx;
            if (cn == kTile) {
              for (int64_t cc = 0; cc < kTile; ++cc) d[cc * HW] += static_cast<float>(s[cc]);
            } else {
              for (int64_t cc = 0; cc < cn; ++cc) d[cc * HW] += static_cast<float>(s[cc]);
            }
          }
      }
    }
  });
}

// cols[(b - b0) * BP + py * bw + px, (c * kh + dy) * kw + dx] = x[n, c, oy * sh + dy - ph, ox * sw + dx - pw].
template <typename scalar_t>
void im2col(const scalar_t* x, const Geom& g, const int32_t* blocks, int64_t b0, int64_t b1, scalar_t* cols) {
  const int64_t BP = g.bh * g.bw, K = g.C * g.kh * g.kw, HW = g.H * g.W;
  at::parallel_for(0, (b1 - b0) * BP, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = b0 + q / BP, py = (q % BP) / g.bw, px = q % g.bw;
      const int64_t n = blocks[3 * b];
      const int64_t iy0 = (blocks[3 * b + 1] * g.bh + py) * g.sh - g.ph;
      const int64_t ix0 = (blocks[3 * b + 2] * g.bw + px) * g.sw - g.pw;
      const scalar_t* src = x + n * g.C * HW + iy0 * g.W + ix0;
      scalar_t* d = cols + q * K;
      const bool inside = iy0 >= 0 && ix0 >= 0 && iy0 + g.kh <= g.H && ix0 + g.kw <= g.W;
      if (inside) {
        for (int64_t c = 0; c < g.C; ++c, src += HW)
          for (int64_t dy = 0; dy < g.kh; ++dy)
            for (int64_t dx = 0; dx < g.kw; ++dx) *d++ = src[dy * g.W + dx];
      } else {
        const auto [xlo, xhi] = valid_range(ix0, g.W, g.kw);
        const auto [ylo, yhi] = valid_range(iy0, g.H, g.kh);
        for (int64_t c = 0; c < g.C; ++c, src += HW)
          for (int64_t dy = 0; dy < g.kh; ++dy)
            for (int64_t dx = 0; dx < g.kw; ++dx)
              *d++ = (dy >= ylo && dy < yhi && dx >= xlo && dx < xhi) ? src[dy * g.W + dx] : scalar_t(0);
      }
    }
  });
}

// dx[n, c, iy, ix] += dcols[q, k]: the transpose of im2col, parallel over input channels.
template <typename scalar_t>
void col2im(const scalar_t* dcols, const Geom& g, const int32_t* blocks, int64_t b0, int64_t b1, float* dx) {
  const int64_t BP = g.bh * g.bw, taps = g.kh * g.kw, K = g.C * taps, HW = g.H * g.W;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t q = 0; q < (b1 - b0) * BP; ++q) {
      const int64_t b = b0 + q / BP, py = (q % BP) / g.bw, px = q % g.bw;
      const int64_t n = blocks[3 * b];
      const int64_t iy0 = (blocks[3 * b + 1] * g.bh + py) * g.sh - g.ph;
      const int64_t ix0 = (blocks[3 * b + 2] * g.bw + px) * g.sw - g.pw;
      const auto [xlo, xhi] = valid_range(ix0, g.W, g.kw);
      const auto [ylo, yhi] = valid_range(iy0, g.H, g.kh);
      for (int64_t c = c0; c < c1; ++c) {
        float* d = dx + (n * g.C + c) * HW + iy0 * g.W + ix0;
        const scalar_t* s = dcols + q * K + c * taps;
        for (int64_t dy = ylo; dy < yhi; ++dy)
          for (int64_t dx_ = xlo; dx_ < xhi; ++dx_) d[dy * g.W + dx_] += static_cast<float>(s[dy * g.kw + dx_]);
      }
    }
  });
}

bool use_windows(const Geom& g) {
  // The window path pays for the halo once per block; im2col pays kh*kw per pixel.
  return g.bh * g.bw >= kWindowMinPixels && g.kh * g.kw * g.bh * g.bw >= 2 * g.WH() * g.WW();
}

int64_t chunk_blocks(int64_t K, int64_t BP) {
  const int64_t pixels = std::max(kMinChunkPixels, kChunkElems / std::max<int64_t>(1, K));
  return std::max<int64_t>(1, pixels / BP);
}

}  // namespace

at::Tensor masked_gather(const at::Tensor& x, const at::Tensor& blocks, int64_t bh, int64_t bw) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "masked_gather: x must be contiguous [N, C, H, W]");
  check_blocks(blocks, "masked_gather");
  check_dtype(x, "masked_gather");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nb = blocks.size(0);
  TORCH_CHECK(H % bh == 0 && W % bw == 0, "masked_gather: blocks must tile x");
  auto out = at::empty({nb, C, bh, bw}, x.options().memory_format(kNHWC));
  const auto map = block_index(blocks.const_data_ptr<int32_t>(), nb, N, H / bh, W / bw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_gather", [&] {
    gather_visible(x.const_data_ptr<scalar_t>(), map.data(), N, C, H, W, bh, bw, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor masked_scatter(const at::Tensor& src, const at::Tensor& blocks, int64_t N, int64_t H, int64_t W) {
  TORCH_CHECK(src.dim() == 4 && src.is_contiguous(kNHWC),
              "masked_scatter: src must be a channels-last [nb, C, bh, bw]");
  check_blocks(blocks, "masked_scatter");
  check_dtype(src, "masked_scatter");
  const int64_t nb = blocks.size(0), C = src.size(1), bh = src.size(2), bw = src.size(3);
  TORCH_CHECK(src.size(0) == nb && H % bh == 0 && W % bw == 0, "masked_scatter: shapes do not agree");
  auto out = at::empty({N, C, H, W}, src.options().memory_format(at::MemoryFormat::Contiguous));
  const auto map = block_index(blocks.const_data_ptr<int32_t>(), nb, N, H / bh, W / bw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "masked_scatter", [&] {
    fill_output(src.const_data_ptr<scalar_t>(), map.data(), N, C, H, W, bh, bw, nullptr,
                out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor masked_conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& blocks, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t bh,
                                 int64_t bw, int64_t Ho, int64_t Wo) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && weight.dim() == 4 && weight.is_contiguous() &&
                  weight.size(1) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "masked_conv2d_forward: x [N, C, H, W] and weight [C_out, C, kh, kw] must be contiguous, one dtype");
  check_blocks(blocks, "masked_conv2d_forward");
  check_dtype(x, "masked_conv2d_forward");
  TORCH_CHECK(Ho % bh == 0 && Wo % bw == 0, "masked_conv2d_forward: blocks must tile the output");
  const Geom g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), sh, sw, ph, pw, Ho, Wo, bh, bw};
  const int64_t Cout = weight.size(0), K = g.C * g.kh * g.kw, BP = bh * bw, nb = blocks.size(0), P = nb * BP;
  auto out = at::empty({g.N, Cout, Ho, Wo}, x.options());
  at::Tensor bias_f;
  if (bias) bias_f = bias->to(at::kFloat).contiguous();
  const int32_t* bp = blocks.const_data_ptr<int32_t>();
  const auto map = block_index(bp, nb, g.N, Ho / bh, Wo / bw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_forward", [&] {
    at::Tensor vis;  // the visible outputs, [P, C_out] pixel-major
    if (nb == 0) {
      vis = at::empty({0, Cout}, x.options());
    } else if (use_windows(g)) {
      auto patches = at::empty({nb, g.C, g.WH(), g.WW()}, x.options().memory_format(kNHWC));
      gather_windows(x.const_data_ptr<scalar_t>(), g, bp, nb, patches.mutable_data_ptr<scalar_t>());
      vis = at::convolution(patches, weight.contiguous(kNHWC), std::nullopt, {sh, sw}, {0, 0}, {1, 1}, false, {0, 0},
                            1)
                .contiguous(kNHWC);  // [nb, C_out, bh, bw] channels last = [P, C_out]
    } else {
      vis = at::empty({P, Cout}, x.options());
      const at::Tensor w2t = weight.view({Cout, K}).t();
      const int64_t step = chunk_blocks(K, BP);
      at::Tensor cols = at::empty({std::min(step, nb) * BP * K}, x.options());
      for (int64_t b0 = 0; b0 < nb; b0 += step) {
        const int64_t b1 = std::min(nb, b0 + step), Pc = (b1 - b0) * BP;
        at::Tensor c = cols.narrow(0, 0, Pc * K).view({Pc, K});
        im2col(x.const_data_ptr<scalar_t>(), g, bp, b0, b1, c.mutable_data_ptr<scalar_t>());
        at::Tensor rows = vis.narrow(0, b0 * BP, Pc);
        at::mm_out(rows, c, w2t);  // [Pc, C_out]
      }
    }
    fill_output(vis.const_data_ptr<scalar_t>(), map.data(), g.N, Cout, Ho, Wo, bh, bw,
                bias ? bias_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& blocks, int64_t sh,
    int64_t sw, int64_t ph, int64_t pw, int64_t bh, int64_t bw, int64_t H, int64_t W, bool need_x, bool need_w,
    bool need_b) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.is_contiguous() && weight.dim() == 4 && weight.is_contiguous() &&
                  grad_out.size(1) == weight.size(0) && grad_out.scalar_type() == weight.scalar_type(),
              "masked_conv2d_backward: grad_out [N, C_out, Ho, Wo] and weight must be contiguous, one dtype");
  check_blocks(blocks, "masked_conv2d_backward");
  check_dtype(grad_out, "masked_conv2d_backward");
  const int64_t N = grad_out.size(0), Cout = weight.size(0), C = weight.size(1), Ho = grad_out.size(2),
                Wo = grad_out.size(3);
  TORCH_CHECK(!need_w || (x.dim() == 4 && x.is_contiguous() && x.size(0) == N && x.size(1) == C && x.size(2) == H &&
                          x.size(3) == W && x.scalar_type() == weight.scalar_type()),
              "masked_conv2d_backward: x must be contiguous [N, C, H, W] when the weight needs a gradient");
  const Geom g{N, C, H, W, weight.size(2), weight.size(3), sh, sw, ph, pw, Ho, Wo, bh, bw};
  const int64_t K = C * g.kh * g.kw, BP = bh * bw, nb = blocks.size(0), P = nb * BP;
  const auto opts = grad_out.options();
  const auto fopts = opts.dtype(at::kFloat);
  const bool reduced = grad_out.scalar_type() != at::kFloat;
  // dx accumulates in fp32 (overlapping halos / taps add up), then is cast to the input dtype
  at::Tensor gx = need_x ? at::zeros({N, C, H, W}, fopts) : at::empty({0}, opts);
  at::Tensor gw = need_w ? at::zeros({Cout, K}, fopts) : at::empty({0}, opts);
  at::Tensor gb = need_b ? at::zeros({Cout}, fopts) : at::empty({0}, opts);
  const int32_t* bp = blocks.const_data_ptr<int32_t>();
  if (nb > 0) {
    const auto map = block_index(bp, nb, N, Ho / bh, Wo / bw);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "masked_conv2d_backward", [&] {
      // grad_out at the visible pixels, [P, C_out] pixel-major (= channels-last [nb, C_out, bh, bw])
      auto G = at::empty({P, Cout}, opts);
      gather_visible(grad_out.const_data_ptr<scalar_t>(), map.data(), N, Cout, Ho, Wo, bh, bw,
                     G.mutable_data_ptr<scalar_t>());
      if (need_b) gb.copy_(G.sum(0, false, at::kFloat));
      if (use_windows(g)) {
        const at::Tensor G4 = G.view({nb, bh, bw, Cout}).permute({0, 3, 1, 2});
        // without a weight gradient the input gradient only needs the windows' shape (never read)
        auto patches = at::empty({nb, C, g.WH(), g.WW()}, opts.memory_format(kNHWC));
        if (need_w) gather_windows(x.const_data_ptr<scalar_t>(), g, bp, nb, patches.mutable_data_ptr<scalar_t>());
        auto [gp, gw_, gb_] = at::convolution_backward(G4, patches, weight.contiguous(kNHWC), std::nullopt, {sh, sw},
                                                       {0, 0}, {1, 1}, false, {0, 0}, 1, {need_x, need_w, false});
        if (need_x) {
          gp = gp.contiguous(kNHWC);
          scatter_add_windows(gp.const_data_ptr<scalar_t>(), g, bp, nb, gx.mutable_data_ptr<float>());
        }
        if (need_w) gw.copy_(gw_.contiguous().view({Cout, K}));
        return;
      }
      const at::Tensor w2 = weight.view({Cout, K});
      const int64_t step = chunk_blocks(K, BP);
      at::Tensor cols = need_w ? at::empty({std::min(step, nb) * BP * K}, opts) : at::Tensor();
      for (int64_t b0 = 0; b0 < nb; b0 += step) {
        const int64_t b1 = std::min(nb, b0 + step), Pc = (b1 - b0) * BP;
        const at::Tensor Gc = G.narrow(0, b0 * BP, Pc);  // [Pc, C_out]
        if (need_w) {
          at::Tensor c = cols.narrow(0, 0, Pc * K).view({Pc, K});
          im2col(x.const_data_ptr<scalar_t>(), g, bp, b0, b1, c.mutable_data_ptr<scalar_t>());
          if (reduced) gw.add_(at::mm(Gc.t(), c).to(at::kFloat));
          else gw.addmm_(Gc.t(), c);
        }
        if (need_x) {
          const at::Tensor dcols = at::mm(Gc, w2);  // [Pc, K]
          col2im(dcols.const_data_ptr<scalar_t>(), g, bp, b0, b1, gx.mutable_data_ptr<float>());
        }
      }
    });
  }
  if (need_x && reduced) gx = gx.to(grad_out.scalar_type());
  if (need_w) gw = gw.view({Cout, C, g.kh, g.kw}).to(grad_out.scalar_type());
  if (need_b) gb = gb.to(grad_out.scalar_type());
  return {gx, gw, gb};
}

}  // namespace cpu
}  // namespace spikeops
