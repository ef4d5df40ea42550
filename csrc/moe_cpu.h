// CPU kernels of the grouped expert matmul (see moe_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace moefuse {

// Whether this CPU has AVX512-BF16 (and the extension was built with it).
bool has_bf16_dot();

// For every expert e with 0 < counts[e] <= max_rows, its rows of x (consecutive, in expert
// order) times weight[e]^T into the same rows of out; the other rows of out are left as they are.
// Experts with up to row_kernel_rows rows go through the row kernel, the others through the tile
// kernel. bf16_dot: the row kernel multiplies bf16 rows with AVX512-BF16 dot products (needs
// has_bf16_dot()), else in fp32.
void experts_linear(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& counts,
                    int64_t row_kernel_rows, int64_t max_rows, at::Tensor& out, bool bf16_dot);

// In place: gate_up[:, :I] = silu(gate_up[:, :I]) * gate_up[:, I:] for gate_up [R, 2I], computed
// in fp32 and rounded once.
void silu_mul_(at::Tensor& gate_up);

// out[t] = sum_j weights[t, j] * y[positions[t, j]] for y [P, H], positions [T, k] (int64),
// weights [T, k] (fp32), out [T, H]: summed in fp32 over j in order, rounded once.
void combine_rows(const at::Tensor& y, const at::Tensor& positions, const at::Tensor& weights, at::Tensor& out);

}  // namespace moefuse
