// CPU kernel of the grouped expert matmul for small batches (see moe_cpu.cpp).
#pragma once

#include <torch/extension.h>

namespace moefuse {

// For every expert e with 0 < counts[e] <= max_rows, its rows of x (consecutive, in expert
// order) times weight[e]^T into the same rows of out; the other rows of out are left as they are.
void expert_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& counts,
                        int64_t max_rows, at::Tensor& out);

}  // namespace moefuse
