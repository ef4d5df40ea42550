// Dense linear assignment on the CPU (see lap_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace moefuse {

// Optimal assignment of a dense [rows, cols] float32/float64/int64 cost matrix: every row of the smaller side
// gets one distinct column (or the transpose), minimizing (or, with `maximize`, maximizing) the total.
// +inf entries (-inf when maximizing) are forbidden pairs. Returns (row_ind, col_ind), int64, row_ind
// ascending, like scipy.optimize.linear_sum_assignment. Throws std::invalid_argument whose message
// starts with "infeasible:" when no complete assignment avoids the forbidden pairs, and with
// "invalid:" for NaN entries or infinities of the wrong sign.
std::tuple<at::Tensor, at::Tensor> linear_assignment_cpu(const at::Tensor& cost, bool maximize);

}  // namespace moefuse
