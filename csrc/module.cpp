// Python bindings of the CPU kernels: spikeops._C. The autograd wrappers, validation and
// torch.library registration live in spikeops/ops/; this module only exposes raw kernels.
#include <torch/extension.h>

#include "cpu/cpu_features.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spikeops CPU kernels (raw; call through spikeops, which validates inputs)";
  m.def("lif_forward", &spikeops::cpu::lif_forward, "fused multi-step LIF forward");
  m.def("lif_backward", &spikeops::cpu::lif_backward, "fused multi-step LIF backward");
  m.def("lif_backward_from_input", &spikeops::cpu::lif_backward_from_input,
        "fused multi-step LIF backward, the state recomputed from the forward's input");
  m.def("lif_forward_from_bn_input", &spikeops::cpu::lif_forward_from_bn_input,
        "fused multi-step LIF forward on a training-mode BatchNorm's output, computed from its input");
  m.def("lif_backward_from_bn_input", &spikeops::cpu::lif_backward_from_bn_input,
        "fused multi-step LIF backward, its input recomputed from a training-mode BatchNorm's input");
  m.def("lif_backward_through_bn", &spikeops::cpu::lif_backward_through_bn,
        "LIF backward from the BatchNorm input, then BatchNorm's backward (training)");
  m.def("pack_spikes", &spikeops::cpu::pack_spikes, "pack 0/1 values into int64 words");
  m.def("spike_matmul_packed", &spikeops::cpu::spike_matmul_packed, "AND+popcount matmul of packed spikes");
  m.def("ssa_forward", &spikeops::cpu::ssa_forward, "fused spiking self-attention forward");
  m.def("ssa_backward", &spikeops::cpu::ssa_backward, "fused spiking self-attention backward");
  m.def("token_attention_forward", &spikeops::cpu::token_attention_forward, "fused token attention forward");
  m.def("token_attention_backward", &spikeops::cpu::token_attention_backward, "fused token attention backward");
  m.def("token_attention_cf_forward", &spikeops::cpu::token_attention_cf_forward,
        "fused token attention forward, channels-first [T, BH, d, N]");
  m.def("token_attention_cf_backward", &spikeops::cpu::token_attention_cf_backward,
        "fused token attention backward, channels-first [T, BH, d, N]");
  m.def("unpack_spikes", &spikeops::cpu::unpack_spikes, "unpack int64 words into 0/1 values");
  m.def("to_counts", &spikeops::cpu::to_counts, "uint8 copy of small integer counts, and whether they are");
  m.def("masked_gather", &spikeops::cpu::masked_gather, "gather the visible blocks of [N, C, H, W] into [nb, C, bh, bw]");
  m.def("masked_scatter", &spikeops::cpu::masked_scatter, "scatter [nb, C, bh, bw] blocks into a zero [N, C, H, W]");
  m.def("masked_conv2d_forward", &spikeops::cpu::masked_conv2d_forward, "conv2d on the visible output blocks");
  m.def("masked_conv2d_backward", &spikeops::cpu::masked_conv2d_backward, "masked conv2d backward");
  m.def("max_pool2d_forward", &spikeops::cpu::max_pool2d_forward, "max pooling of [N, C, H, W], dilation 1");
  m.def("max_pool2d_backward", &spikeops::cpu::max_pool2d_backward, "its backward, argmax found from the input");
  m.def("max_pool2d_backward_bits", &spikeops::cpu::max_pool2d_backward_bits, "its backward for 0/1 input given as bits");
  m.def("avx2_enabled", &spikeops::cpu::avx2_enabled, "whether the kernels take their AVX2 paths (cpu_features.h)");
  m.def("avx512_enabled", &spikeops::cpu::avx512_enabled, "whether the kernels take their AVX-512 paths (cpu_features.h)");
  m.def("avx512_bitops_enabled", &spikeops::cpu::avx512_bitops_enabled,
        "whether the kernels take their AVX-512 VPOPCNTDQ / VBMI / GFNI paths (cpu_features.h)");
}
