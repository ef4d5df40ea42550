// Torch-facing launcher of the CUDA auction solver: layout, epsilon choice, workspace, outputs.
#ifdef MOEFUSE_CUDA
#include "lap_cuda_launch.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "lap_cuda.h"

namespace moefuse {

std::tuple<at::Tensor, at::Tensor> linear_assignment_cuda(const at::Tensor& cost, bool maximize, int64_t stream) {
  const auto dtype = cost.scalar_type();
  if (cost.dim() != 2 || !cost.is_cuda() || (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kLong)) {
    throw std::invalid_argument("invalid: the CUDA solver takes a 2-D float32/float64/int64 CUDA cost matrix, got " +
                                std::string(c10::toString(dtype)) + " of shape " + c10::str(cost.sizes()) + " on " +
                                cost.device().str());
  }
  const bool transpose = cost.size(0) > cost.size(1);
  at::Tensor work = transpose ? cost.t() : cost;
  if (dtype == at::kLong) work = work.to(at::kDouble);  // exact up to 2^53
  work = (maximize ? work.neg() : work).contiguous();
  const int64_t rows = work.size(0), cols = work.size(1);
  const auto index_options = work.options().dtype(at::kLong);
  if (rows == 0) return {at::empty({0}, index_options), at::empty({0}, index_options)};
  if (cols > std::numeric_limits<int>::max() / 2) {
    throw std::invalid_argument("invalid: the CUDA solver takes at most 2^30 columns, got shape " +
                                c10::str(cost.sizes()));
  }
  if (!at::isfinite(work).all().item<bool>()) {
    throw std::invalid_argument("invalid: the CUDA solver takes finite costs only, shape " + c10::str(cost.sizes()));
  }
  at::Tensor col_of_row;
  const auto [low, high] = at::aminmax(work);
  const double range = (high - low).item<double>();
  if (cols == 1 || range == 0.0) {  // every complete assignment is optimal
    col_of_row = at::arange(rows, index_options);
  } else {
    const bool integral = at::equal(work, work.round());
    // integer costs: n * eps < 1 makes the auction exact; otherwise n * eps = range * 2^-20
    const double final_eps = integral ? 1.0 / static_cast<double>(cols + 1) : std::ldexp(range, -20) / cols;
    const auto ints = work.options().dtype(at::kInt);
    const auto doubles = work.options().dtype(at::kDouble);
    at::Tensor price = at::empty({cols}, doubles), bid_price = at::empty({cols}, doubles);
    at::Tensor col_best = at::empty({cols}, work.options().dtype(at::kLong));
    at::Tensor col_winner = at::empty({cols}, ints), owner = at::empty({cols}, ints);
    at::Tensor row_col = at::empty({cols}, ints);
    at::Tensor bidders = at::empty({cols}, ints), next_bidders = at::empty({cols}, ints);
    at::Tensor bid_col = at::empty({cols}, ints);
    at::Tensor count = at::empty({1}, ints);
    const AuctionWorkspace workspace{
        price.data_ptr<double>(), bid_price.data_ptr<double>(),
        reinterpret_cast<unsigned long long*>(col_best.data_ptr<int64_t>()), col_winner.data_ptr<int>(),
        owner.data_ptr<int>(), row_col.data_ptr<int>(), bidders.data_ptr<int>(), next_bidders.data_ptr<int>(),
        bid_col.data_ptr<int>(), count.data_ptr<int>()};
    CUstream_st* cuda_stream = reinterpret_cast<CUstream_st*>(stream);
    const std::string error =
        work.scalar_type() == at::kFloat
            ? auction_assign_f32(work.data_ptr<float>(), rows, cols, range, final_eps, workspace, cuda_stream)
            : auction_assign_f64(work.data_ptr<double>(), rows, cols, range, final_eps, workspace, cuda_stream);
    if (!error.empty()) throw std::runtime_error("CUDA linear assignment failed: " + error);
    col_of_row = row_col.narrow(0, 0, rows).to(at::kLong);
  }
  if (!transpose) return {at::arange(rows, index_options), col_of_row};
  const at::Tensor order = at::argsort(col_of_row);
  return {col_of_row.index_select(0, order), order};
}

}  // namespace moefuse
#endif  // MOEFUSE_CUDA
