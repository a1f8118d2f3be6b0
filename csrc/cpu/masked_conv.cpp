// Masked (block-sparse) convolution on the CPU (semantics: spikeops/reference.py,
// masked_conv2d_reference; design: spikeops/ops/masked_conv.py).
//
// The output grid [N, C_out, Ho, Wo] is cut into blocks of bh x bw pixels, one per cell of the
// mask at its native resolution; `blocks` [nb, 3] int32 lists the visible blocks as (n, by, bx)
// (torch.nonzero order: sorted by n, then by, then bx). Column p of a "rows" matrix [C, P],
// P = nb * bh * bw, is pixel (py, px) of visible block b with p = (b * bh + py) * bw + px.
//
//   forward:  cols [K, Pc] = im2col of the visible blocks (halo from x, zero outside the image),
//             K = C_in * kh * kw;  rows = W [C_out, K] @ cols  (at::mm: the BLAS torch links);
//             out = rows (+ bias) at visible pixels, exactly 0 elsewhere (one pass over out).
//   backward: G [C_out, Pc] = grad_out at visible pixels;  dW += G @ cols^T;  db = sum_p G;
//             dcols = W^T @ G;  dx = col2im(dcols) (scatter-add, visible receptive fields only).
// Blocks are processed in chunks so that cols stays a few MB (cache-friendly, bounded memory).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../ops.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = int64_t(1) << 21;  // cols chunk: ~8 MB of fp32

struct Geom {
  int64_t N, C, H, W;      // input
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Ho, Wo, bh, bw;  // output and block size
};

void check_blocks(const at::Tensor& blocks, const char* fn) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == 3 && blocks.scalar_type() == at::kInt && blocks.is_contiguous(),
              fn, ": blocks must be contiguous int32 [nb, 3] (n, by, bx)");
}

// cols[k, (b - b0) * BP + py * bw + px] for k = (c, dy, dx), blocks b0..b1.
template <typename scalar_t>
void im2col(const scalar_t* x, const int32_t* blocks, int64_t b0, int64_t b1, const Geom& g, scalar_t* cols) {
  const int64_t taps = g.kh * g.kw, K = g.C * taps, BP = g.bh * g.bw, Pc = (b1 - b0) * BP;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c = k / taps, dy = (k % taps) / g.kw, dx = k % g.kw;
      scalar_t* dst_row = cols + k * Pc;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = blocks[3 * b], oy0 = blocks[3 * b + 1] * g.bh, ox0 = blocks[3 * b + 2] * g.bw;
        const scalar_t* plane = x + (n * g.C + c) * g.H * g.W;
        // px range with 0 <= ix = (ox0 + px) * sw + dx - pw < W
        const int64_t base = ox0 * g.sw + dx - g.pw;
        int64_t lo = base >= 0 ? 0 : (-base + g.sw - 1) / g.sw;
        int64_t hi = base >= g.W ? 0 : (g.W - base + g.sw - 1) / g.sw;
        lo = std::min(lo, g.bw);
        hi = std::max(lo, std::min(hi, g.bw));
        for (int64_t py = 0; py < g.bh; ++py) {
          scalar_t* dst = dst_row + (b - b0) * BP + py * g.bw;
          const int64_t iy = (oy0 + py) * g.sh + dy - g.ph;
          if (iy < 0 || iy >= g.H) {
            for (int64_t px = 0; px < g.bw; ++px) dst[px] = scalar_t(0);
            continue;
          }
          const scalar_t* src = plane + iy * g.W + base;
          for (int64_t px = 0; px < lo; ++px) dst[px] = scalar_t(0);
          if (g.sw == 1) {
            for (int64_t px = lo; px < hi; ++px) dst[px] = src[px];
          } else {
            for (int64_t px = lo; px < hi; ++px) dst[px] = src[px * g.sw];
          }
          for (int64_t px = hi; px < g.bw; ++px) dst[px] = scalar_t(0);
        }
      }
    }
  });
}

// dx[n, c, iy, ix] += dcols[k, p]: the transpose of im2col. Parallel over input channels, so
// no two threads touch one plane (taps of neighbouring blocks overlap in the halo).
template <typename scalar_t>
void col2im(const scalar_t* dcols, const int32_t* blocks, int64_t b0, int64_t b1, const Geom& g, float* dx) {
  const int64_t taps = g.kh * g.kw, BP = g.bh * g.bw, Pc = (b1 - b0) * BP;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t dy = t / g.kw, dx_ = t % g.kw;
        const scalar_t* src_row = dcols + (c * taps + t) * Pc;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n = blocks[3 * b], oy0 = blocks[3 * b + 1] * g.bh, ox0 = blocks[3 * b + 2] * g.bw;
          float* plane = dx + (n * g.C + c) * g.H * g.W;
          const int64_t base = ox0 * g.sw + dx_ - g.pw;
          int64_t lo = base >= 0 ? 0 : (-base + g.sw - 1) / g.sw;
          int64_t hi = base >= g.W ? 0 : (g.W - base + g.sw - 1) / g.sw;
          lo = std::min(lo, g.bw);
          hi = std::max(lo, std::min(hi, g.bw));
          for (int64_t py = 0; py < g.bh; ++py) {
            const int64_t iy = (oy0 + py) * g.sh + dy - g.ph;
            if (iy < 0 || iy >= g.H) continue;
            const scalar_t* src = src_row + (b - b0) * BP + py * g.bw;
            float* dst = plane + iy * g.W + base;
            if (g.sw == 1) {
              for (int64_t px = lo; px < hi; ++px) dst[px] += static_cast<float>(src[px]);
            } else {
              for (int64_t px = lo; px < hi; ++px) dst[px * g.sw] += static_cast<float>(src[px]);
            }
          }
        }
      }
    }
  });
}

// rows[c, (b - b0) * BP + q] = t[n, c, oy0 + q / bw, ox0 + q % bw] for blocks b0..b1.
template <typename scalar_t>
void gather(const scalar_t* t, const int32_t* blocks, int64_t b0, int64_t b1, int64_t C, int64_t H, int64_t W,
            int64_t bh, int64_t bw, scalar_t* rows) {
  const int64_t BP = bh * bw, Pc = (b1 - b0) * BP;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = blocks[3 * b], oy0 = blocks[3 * b + 1] * bh, ox0 = blocks[3 * b + 2] * bw;
        const scalar_t* src = t + ((n * C + c) * H + oy0) * W + ox0;
        scalar_t* dst = rows + c * Pc + (b - b0) * BP;
        for (int64_t py = 0; py < bh; ++py)
          for (int64_t px = 0; px < bw; ++px) dst[py * bw + px] = src[py * W + px];
      }
    }
  });
}

// One block-index map [N, h, w]: the visible block's index, or -1.
std::vector<int64_t> block_map(const int32_t* blocks, int64_t nb, int64_t N, int64_t h, int64_t w) {
  std::vector<int64_t> map(N * h * w, -1);
  for (int64_t b = 0; b < nb; ++b) map[(blocks[3 * b] * h + blocks[3 * b + 1]) * w + blocks[3 * b + 2]] = b;
  return map;
}

// out[n, c, y, x] = rows[c, p(b, ...)] (+ bias[c]) if block (n, y / bh, x / bw) = b is in b0..b1;
// when zero_rest, 0 in masked blocks. Blocks visible but outside b0..b1 are left alone.
template <typename scalar_t>
void scatter(const scalar_t* rows, const int32_t* blocks, int64_t b0, int64_t b1, const std::vector<int64_t>& map,
             int64_t N, int64_t C, int64_t H, int64_t W, int64_t bh, int64_t bw, const float* bias, bool zero_rest,
             scalar_t* out) {
  const int64_t BP = bh * bw, Pc = (b1 - b0) * BP, h = H / bh, w = W / bw;
  at::parallel_for(0, N * C, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / C, c = i % C;
      const float bc = bias ? bias[c] : 0.0f;
      const scalar_t* src_c = rows + c * Pc;
      for (int64_t by = 0; by < h; ++by) {
        for (int64_t bx = 0; bx < w; ++bx) {
          const int64_t b = map[(n * h + by) * w + bx];
          scalar_t* dst = out + ((n * C + c) * H + by * bh) * W + bx * bw;
          if (b >= b0 && b < b1) {
            const scalar_t* src = src_c + (b - b0) * BP;
            for (int64_t py = 0; py < bh; ++py)
              for (int64_t px = 0; px < bw; ++px)
                dst[py * W + px] = bias ? static_cast<scalar_t>(static_cast<float>(src[py * bw + px]) + bc)
                                        : src[py * bw + px];
          } else if (b < 0 && zero_rest) {
            for (int64_t py = 0; py < bh; ++py)
              for (int64_t px = 0; px < bw; ++px) dst[py * W + px] = scalar_t(0);
          }
        }
      }
    }
  });
}

int64_t chunk_blocks(int64_t K, int64_t BP) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, K * BP)); }

}  // namespace

at::Tensor masked_gather(const at::Tensor& x, const at::Tensor& blocks, int64_t bh, int64_t bw) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "masked_gather: x must be contiguous [N, C, H, W]");
  check_blocks(blocks, "masked_gather");
  const int64_t C = x.size(1), nb = blocks.size(0);
  auto rows = at::empty({C, nb * bh * bw}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_gather", [&] {
    gather(x.const_data_ptr<scalar_t>(), blocks.const_data_ptr<int32_t>(), 0, nb, C, x.size(2), x.size(3), bh, bw,
           rows.mutable_data_ptr<scalar_t>());
  });
  return rows;
}

at::Tensor masked_scatter(const at::Tensor& rows, const at::Tensor& blocks, int64_t N, int64_t H, int64_t W,
                          int64_t bh, int64_t bw) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "masked_scatter: rows must be contiguous [C, P]");
  check_blocks(blocks, "masked_scatter");
  const int64_t C = rows.size(0), nb = blocks.size(0);
  TORCH_CHECK(rows.size(1) == nb * bh * bw && H % bh == 0 && W % bw == 0, "masked_scatter: shapes do not agree");
  auto out = at::empty({N, C, H, W}, rows.options());
  const int32_t* bp = blocks.const_data_ptr<int32_t>();
  const auto map = block_map(bp, nb, N, H / bh, W / bw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "masked_scatter", [&] {
    scatter(rows.const_data_ptr<scalar_t>(), bp, 0, nb, map, N, C, H, W, bh, bw, nullptr, true,
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
  TORCH_CHECK(Ho % bh == 0 && Wo % bw == 0, "masked_conv2d_forward: blocks must tile the output");
  const Geom g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), sh, sw, ph, pw, Ho, Wo, bh, bw};
  const int64_t Cout = weight.size(0), K = g.C * g.kh * g.kw, BP = bh * bw, nb = blocks.size(0);
  const at::Tensor w2 = weight.view({Cout, K});
  at::Tensor bias_f;
  if (bias) bias_f = bias->to(at::kFloat).contiguous();
  auto out = at::empty({g.N, Cout, Ho, Wo}, x.options());
  const int32_t* bp = blocks.const_data_ptr<int32_t>();
  const auto map = block_map(bp, nb, g.N, Ho / bh, Wo / bw);
  const int64_t step = chunk_blocks(K, BP);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_forward", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const float* biasp = bias ? bias_f.const_data_ptr<float>() : nullptr;
    // masked blocks: exactly 0 (the visible ones are written chunk by chunk below)
    scatter<scalar_t>(nullptr, bp, 0, 0, map, g.N, Cout, Ho, Wo, bh, bw, nullptr, true, op);
    at::Tensor cols = at::empty({std::min(step, nb) * K * BP}, x.options());
    for (int64_t b0 = 0; b0 < nb; b0 += step) {
      const int64_t b1 = std::min(nb, b0 + step), Pc = (b1 - b0) * BP;
      at::Tensor c = cols.narrow(0, 0, K * Pc).view({K, Pc});
      im2col(x.const_data_ptr<scalar_t>(), bp, b0, b1, g, c.mutable_data_ptr<scalar_t>());
      const at::Tensor rows = at::mm(w2, c);
      scatter(rows.const_data_ptr<scalar_t>(), bp, b0, b1, map, g.N, Cout, Ho, Wo, bh, bw, biasp, false, op);
    }
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
  const int64_t N = grad_out.size(0), Cout = weight.size(0), C = weight.size(1), Ho = grad_out.size(2),
                Wo = grad_out.size(3);
  TORCH_CHECK(!need_w || (x.dim() == 4 && x.is_contiguous() && x.size(0) == N && x.size(1) == C && x.size(2) == H &&
                          x.size(3) == W && x.scalar_type() == weight.scalar_type()),
              "masked_conv2d_backward: x must be contiguous [N, C, H, W] when the weight needs a gradient");
  const Geom g{N, C, H, W, weight.size(2), weight.size(3), sh, sw, ph, pw, Ho, Wo, bh, bw};
  const int64_t K = C * g.kh * g.kw, BP = bh * bw, nb = blocks.size(0);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat || grad_out.scalar_type() == at::kHalf ||
                  grad_out.scalar_type() == at::kBFloat16,
              "masked_conv2d_backward: float32, float16 or bfloat16 only");
  const auto opts = grad_out.options();
  const auto fopts = opts.dtype(at::kFloat);
  const bool half = grad_out.scalar_type() != at::kFloat;
  // dx, dW and db accumulate in fp32 (then cast to the input dtype)
  at::Tensor gx = need_x ? at::zeros({N, C, H, W}, fopts) : at::empty({0}, opts);
  at::Tensor gw = need_w ? at::zeros({Cout, K}, fopts) : at::empty({0}, opts);
  at::Tensor gb = need_b ? at::zeros({Cout}, fopts) : at::empty({0}, opts);
  const at::Tensor w2t = weight.view({Cout, K}).t();
  const int32_t* bp = blocks.const_data_ptr<int32_t>();
  const int64_t step = chunk_blocks(K, BP);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "masked_conv2d_backward", [&] {
    at::Tensor gbuf = at::empty({Cout * std::min(step, nb) * BP}, opts);
    at::Tensor cols = need_w ? at::empty({std::min(step, nb) * K * BP}, opts) : at::Tensor();
    for (int64_t b0 = 0; b0 < nb; b0 += step) {
      const int64_t b1 = std::min(nb, b0 + step), Pc = (b1 - b0) * BP;
      at::Tensor G = gbuf.narrow(0, 0, Cout * Pc).view({Cout, Pc});
      gather(grad_out.const_data_ptr<scalar_t>(), bp, b0, b1, Cout, Ho, Wo, bh, bw, G.mutable_data_ptr<scalar_t>());
      if (need_b) gb.add_(G.sum(1, false, at::kFloat));
      if (need_w) {
        at::Tensor c = cols.narrow(0, 0, K * Pc).view({K, Pc});
        im2col(x.const_data_ptr<scalar_t>(), bp, b0, b1, g, c.mutable_data_ptr<scalar_t>());
        if (half) gw.add_(at::mm(G, c.t()).to(at::kFloat));
        else gw.addmm_(G, c.t());
      }
      if (need_x) {
        const at::Tensor dcols = at::mm(w2t, G);
        col2im(dcols.const_data_ptr<scalar_t>(), bp, b0, b1, g, gx.mutable_data_ptr<float>());
      }
    }
  });
  if (need_x) gx = gx.to(grad_out.scalar_type());
  if (need_w) gw = gw.view({Cout, C, g.kh, g.kw}).to(grad_out.scalar_type());
  if (need_b) gb = gb.to(grad_out.scalar_type());
  return {gx, gw, gb};
}

}  // namespace cpu
}  // namespace spikeops
