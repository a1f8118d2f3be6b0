// AND + popcount row product shared by spike_matmul.cpp and ssa.cpp (defined in spike_matmul.cpp,
// compiled with and without POPCNT and picked at load time).
#pragma once
#include <cstdint>

namespace spikeops {
namespace cpu {

// out[n] = sum_{w < W} popcount(a[w] & bt[n * W + w]) for n < N.
void popcount_row(const uint64_t* a, const uint64_t* bt, int64_t N, int64_t W, int32_t* out);

}  // namespace cpu
}  // namespace spikeops
