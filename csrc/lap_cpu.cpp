// Dense linear assignment: Jonker-Volgenant initialization plus shortest augmenting paths.
//
// Problem (after transposing so rows <= cols, and negating to maximize): choose distinct columns x_i
// for all rows i minimizing sum_i c[i, x_i]. Dual: column prices v_j <= 0 for columns left unassigned
// and implicit row duals u_i = c[i, x_i] - v[x_i]. Invariant of every phase, for each assigned row i:
//     c[i, x_i] - v[x_i] <= c[i, j] - v[j]   for all j,
// and prices only fall, so columns never assigned keep v_j = 0. When every row is assigned this is
// complementary slackness, hence the assignment is optimal.
//
// Phases (square, all-finite matrices): column reduction (v_j = min_i c_ij, each column offered to its
// cheapest row), reduction transfer (a row holding one column lowers that column's price to its
// second-best reduced cost), two passes of augmenting row reduction (a free row takes its best column
// and lowers its price by the gap to its second best, evicting the holder). Rows still free afterwards,
// and all rows of rectangular matrices or of matrices with forbidden (+inf) entries, are assigned by
// Dijkstra over the reduced costs from the free row to the nearest free column (shortest augmenting
// path), one contiguous vectorizable pass over the columns per scanned row.
//
// Costs stay in their dtype (float32 matrices take half the memory traffic; int64 costs need no converted
// copy); distances and prices are double, so inputs are solved as exactly as their float64 conversion.
#include "lap_cpu.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moefuse {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();


// v[j] = min(v[j], c[j]) and arg[j] = i where c[j] is smaller (one row of the column-minimum sweep).
template <typename T>
MOEFUSE_SIMD_CLONES void column_min_row(const T* c, double* v, int64_t* arg, int64_t n, int64_t i) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const double cij = static_cast<double>(c[j]);
    const bool lower = cij < v[j];
    v[j] = lower ? cij : v[j];
    arg[j] = lower ? i : arg[j];
  }
}

// The smallest and second smallest of c[j] - v[j] (the second may equal the first), in per-lane pairs.
template <typename T>
MOEFUSE_SIMD_CLONES std::pair<double, double> two_smallest(const T* c, const double* v, int64_t n) {
  constexpr int kLanes = 8;
  double first[kLanes], second[kLanes];
  for (int l = 0; l < kLanes; ++l) first[l] = second[l] = kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double h = static_cast<double>(c[j + l]) - v[j + l];
      second[l] = std::min(second[l], std::max(first[l], h));
      first[l] = std::min(first[l], h);
    }
  }
  for (; j < n; ++j) {
    const double h = static_cast<double>(c[j]) - v[j];
    second[0] = std::min(second[0], std::max(first[0], h));
    first[0] = std::min(first[0], h);
  }
  double u1 = kInf, u2 = kInf;
  for (int l = 0; l < kLanes; ++l) {
    u2 = std::min(u2, std::max(u1, first[l]));
    u1 = std::min(u1, first[l]);
    u2 = std::min(u2, second[l]);
  }
  return {u1, u2};
}

// Relax every column through row c reached at `offset` + reduced cost: d[j] = min(d[j], c[j] - w[j] +
// offset) with pred[j] = i where it falls; returns (min_j d[j], min_j d[j] + penalty[j]).
template <typename T>
MOEFUSE_SIMD_CLONES std::pair<double, double> relax_row(const T* c, const double* w, const double* penalty,
                                                         double* d, int64_t* pred, int64_t n, int64_t i,
                                                         double offset) {
  double low = kInf, low_free = kInf;
#pragma omp simd reduction(min : low, low_free)
  for (int64_t j = 0; j < n; ++j) {
    const double h = static_cast<double>(c[j]) - w[j] + offset;
    const bool shorter = h < d[j];
    const double dj = shorter ? h : d[j];
    d[j] = dj;
    pred[j] = shorter ? i : pred[j];
    low = std::min(low, dj);
    low_free = std::min(low_free, dj + penalty[j]);
  }
  return {low, low_free};
}

std::string shape_text(int64_t rows, int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

template <typename T>
class DenseLap {
 public:
  // `shape` names the caller's matrix in errors.
  DenseLap(const T* cost, int64_t rows, int64_t cols, std::string shape)
      : cost_(cost), rows_(rows), cols_(cols), shape_(std::move(shape)), v_(cols, 0.0), x_(rows, -1), y_(cols, -1) {}

  // The column of each row. `warm_start` runs the JV reductions first (only valid without +inf entries).
  const std::vector<int64_t>& solve(bool warm_start) {
    std::vector<int64_t> free_rows;
    if (warm_start && rows_ == cols_) {
      free_rows = column_reduction();
    } else {
      free_rows.resize(rows_);
      for (int64_t i = 0; i < rows_; ++i) free_rows[i] = i;
    }
    if (warm_start && cols_ >= 2) {
      for (int pass = 0; pass < 2 && !free_rows.empty(); ++pass) augmenting_row_reduction(free_rows);
    }
    if (!free_rows.empty()) {
      d_.assign(cols_, kInf);
      w_.assign(cols_, 0.0);
      pred_.assign(cols_, 0);
      final_.assign(cols_, 0.0);
      penalty_.resize(cols_);
      for (int64_t j = 0; j < cols_; ++j) penalty_[j] = y_[j] < 0 ? 0.0 : kInf;
      for (int64_t f : free_rows) augment(f);
    }
    return x_;
  }

 private:
  const T* row(int64_t i) const { return cost_ + i * cols_; }

  // v_j = min_i c_ij in one row-major sweep; column j goes to its cheapest row unless that row already
  // holds a cheaper column. Then rows holding exactly one column transfer their slack to its price.
  std::vector<int64_t> column_reduction() {
    const int64_t n = cols_;
    std::vector<int64_t> argmin(n, 0);
    std::fill(v_.begin(), v_.end(), kInf);
    double* v = v_.data();
    int64_t* arg = argmin.data();
    for (int64_t i = 0; i < rows_; ++i) column_min_row(row(i), v, arg, n, i);
    std::vector<int> matches(rows_, 0);
    for (int64_t j = n - 1; j >= 0; --j) {
      const int64_t i = arg[j];
      if (++matches[i] == 1) {
        x_[i] = j;
        y_[j] = i;
      } else if (v[j] < v[x_[i]]) {
        y_[x_[i]] = -1;
        x_[i] = j;
        y_[j] = i;
      }
    }
    std::vector<int64_t> free_rows;
    for (int64_t i = 0; i < rows_; ++i) {
      if (matches[i] == 0) {
        free_rows.push_back(i);
      } else if (matches[i] == 1) {
        const int64_t j1 = x_[i];
        const T* c = row(i);
        double second = kInf;
        for (int64_t j = 0; j < n; ++j) {
          if (j != j1) second = std::min(second, static_cast<double>(c[j]) - v[j]);
        }
        if (second < kInf) v[j1] -= second;
      }
    }
    return free_rows;
  }

  // One pass over the free rows: each takes the column of its smallest reduced cost u1; if its second
  // smallest u2 is larger, the price falls by u2 - u1 and an evicted holder retries at once, otherwise it
  // takes the tied second column and an evicted holder waits for the next pass. A step budget bounds
  // the retries on nearly-tied floats; rows left over stay free for the augmenting phase.
  void augmenting_row_reduction(std::vector<int64_t>& free_rows) {
    const int64_t previous = static_cast<int64_t>(free_rows.size());
    const int64_t budget = 4 * rows_ + 64;
    int64_t next = 0, kept = 0, steps = 0;
    double* v = v_.data();
    while (next < previous && steps++ < budget) {
      const int64_t i = free_rows[next++];
      const T* c = row(i);
      const auto [u1, u2] = two_smallest(c, v, cols_);
      int64_t j1 = 0;
      while (static_cast<double>(c[j1]) - v[j1] != u1) ++j1;
      int64_t evicted = y_[j1];
      const bool strict = u1 < u2;
      if (strict) {
        v[j1] -= u2 - u1;
      } else if (evicted >= 0) {  // a tie: take the other column of the smallest reduced cost
        int64_t j2 = 0;
        while (j2 == j1 || static_cast<double>(c[j2]) - v[j2] != u2) ++j2;
        j1 = j2;
        evicted = y_[j1];
      }
      x_[i] = j1;
      y_[j1] = i;
      if (evicted >= 0) {
        x_[evicted] = -1;
        if (strict) {
          free_rows[--next] = evicted;
        } else {
          free_rows[kept++] = evicted;
        }
      }
    }
    // rows not reached within the budget join the rows freed for the next pass
    std::move(free_rows.begin() + next, free_rows.begin() + previous, free_rows.begin() + kept);
    free_rows.resize(kept + (previous - next));
  }

  // Relax every unscanned column through row i reached at distance offset + (c_i,x_i - v_x_i);
  // returns (min over unscanned columns of d, min over unscanned free columns of d).
  std::pair<double, double> relax(int64_t i, double offset) {
    return relax_row(row(i), w_.data(), penalty_.data(), d_.data(), pred_.data(), cols_, i, offset);
  }

  // Shortest augmenting path from free row f (Dijkstra on reduced costs; scanned columns get w = -inf
  // and d = +inf so the dense pass skips them without branches), then price update and augmentation.
  void augment(int64_t f) {
    std::fill(d_.begin(), d_.end(), kInf);
    std::copy(v_.begin(), v_.end(), w_.begin());
    scanned_.clear();
    auto [low, low_free] = relax(f, 0.0);
    int64_t sink = -1;
    while (true) {
      if (!(low < kInf)) {
        throw std::invalid_argument("infeasible: the cost matrix of shape " + shape_ +
                                    " has no complete assignment avoiding its forbidden (infinite) entries");
      }
      if (low_free == low) {
        int64_t j = 0;
        while (d_[j] + penalty_[j] != low) ++j;
        sink = j;
        break;
      }
      int64_t j = 0;
      while (d_[j] != low) ++j;
      final_[j] = low;
      scanned_.push_back(j);
      d_[j] = kInf;
      w_[j] = -kInf;
      const int64_t i = y_[j];
      std::tie(low, low_free) = relax(i, low - (static_cast<double>(row(i)[j]) - v_[j]));
    }
    for (int64_t j : scanned_) v_[j] += final_[j] - low;
    penalty_[sink] = kInf;
    int64_t j = sink;
    while (true) {
      const int64_t i = pred_[j];
      y_[j] = i;
      std::swap(x_[i], j);
      if (i == f) break;
    }
  }

  const T* cost_;
  int64_t rows_, cols_;
  std::string shape_;
  std::vector<double> v_;
  std::vector<int64_t> x_, y_;
  std::vector<double> d_, w_, final_, penalty_;
  std::vector<int64_t> pred_, scanned_;
};

struct Entries {
  bool nan = false, negative_inf = false, positive_inf = false;
};

template <typename T>
Entries scan_entries(const T* data, int64_t count) {
  bool nan = false, negative_inf = false, positive_inf = false;
  if constexpr (std::is_floating_point_v<T>) {
#pragma omp simd reduction(| : nan, negative_inf, positive_inf)
    for (int64_t k = 0; k < count; ++k) {
      const T value = data[k];
      nan |= value != value;
      negative_inf |= value == -std::numeric_limits<T>::infinity();
      positive_inf |= value == std::numeric_limits<T>::infinity();
    }
  }
  return {nan, negative_inf, positive_inf};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_assignment_cpu(const at::Tensor& cost, bool maximize) {
  if (cost.dim() != 2) {
    throw std::invalid_argument("invalid: the cost matrix must be 2-D, got shape " + c10::str(cost.sizes()));
  }
  const auto dtype = cost.scalar_type();
  if (!cost.device().is_cpu() || (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kLong)) {
    throw std::invalid_argument("invalid: the CPU solver takes float32/float64/int64 CPU tensors, got " +
                                std::string(c10::toString(cost.scalar_type())) + " on " + cost.device().str());
  }
  const bool transpose = cost.size(0) > cost.size(1);
  at::Tensor work = transpose ? cost.t() : cost;
  work = (maximize ? work.neg() : work).contiguous();
  const int64_t rows = work.size(0), cols = work.size(1);
  const auto options = at::TensorOptions().dtype(at::kLong);
  if (rows == 0) return {at::empty({0}, options), at::empty({0}, options)};

  std::vector<int64_t> assigned;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kLong, work.scalar_type(), "linear_assignment_cpu", [&] {
    const scalar_t* data = work.data_ptr<scalar_t>();
    const Entries entries = scan_entries(data, rows * cols);
    if (entries.nan || entries.negative_inf) {
      throw std::invalid_argument(
          std::string("invalid: the cost matrix of shape ") + shape_text(cost.size(0), cost.size(1)) + " holds " +
          (entries.nan ? "NaN" : (maximize ? "+inf" : "-inf")) + " entries; only finite values and " +
          (maximize ? "-inf" : "+inf") + " (a forbidden pair) are allowed");
    }
    DenseLap<scalar_t> solver(data, rows, cols, shape_text(cost.size(0), cost.size(1)));
    assigned = solver.solve(!entries.positive_inf);
  });

  at::Tensor row_ind = at::empty({rows}, options), col_ind = at::empty({rows}, options);
  int64_t* r = row_ind.data_ptr<int64_t>();
  int64_t* c = col_ind.data_ptr<int64_t>();
  if (!transpose) {
    for (int64_t i = 0; i < rows; ++i) {
      r[i] = i;
      c[i] = assigned[i];
    }
  } else {  // solver rows are the input's columns: list them by ascending input row
    std::vector<int64_t> order(rows);
    for (int64_t k = 0; k < rows; ++k) order[k] = k;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return assigned[a] < assigned[b]; });
    for (int64_t k = 0; k < rows; ++k) {
      r[k] = assigned[order[k]];
      c[k] = order[k];
    }
  }
  return {row_ind, col_ind};
}

}  // namespace moefuse
