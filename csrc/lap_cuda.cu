// Dense linear assignment on the GPU: Bertsekas' auction with epsilon scaling (Jacobi rounds).
//
// Minimize sum_i c[i, x_i]; in auction terms row i values column j at a_ij = -c_ij and column j has
// price p_j >= 0. A round: every unassigned row finds its best value w1 = max_j (a_ij - p_j) at j1 and
// second best w2, and offers p_j1 + (w1 - w2) + eps for j1; each column takes its highest offer
// (ties: one of the tied rows), raising its price and evicting its holder. A phase ends when every row
// holds a column; the assignment then satisfies eps-complementary slackness, so its total is within
// n * eps of the optimum, and for integer costs with eps < 1/n it is optimal. Phases run eps from
// range / 8 down by 8x to the final eps, keeping prices and resetting assignments. Square problems
// only: rows past `rows` are virtual zero-cost rows (a rectangular problem padded with dummy rows).
//
// Kernels: one 256-thread block per bidder (a top-2 scan of its row), an atomic max of offers per
// column, a claim pass (the row whose offer equals the maximum takes the column), and an assignment
// pass that also lists the rows left unassigned for the next round.
#include "lap_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace moefuse {
namespace {

constexpr int kBidThreads = 256;
constexpr int kThreads = 256;
constexpr long long kMaxRounds = 20000000;

struct Top2 {
  double best, second;
  int index;
};

__device__ __forceinline__ void push(Top2& t, double value, int j) {
  if (value > t.best) {
    t.second = t.best;
    t.best = value;
    t.index = j;
  } else if (value > t.second) {
    t.second = value;
  }
}

__device__ __forceinline__ Top2 merge(const Top2& a, const Top2& b) {
  const bool a_first = a.best > b.best || (a.best == b.best && a.index >= 0 && (b.index < 0 || a.index < b.index));
  const Top2& hi = a_first ? a : b;
  const Top2& lo = a_first ? b : a;
  return Top2{hi.best, fmax(hi.second, lo.best), hi.index};
}

__device__ __forceinline__ Top2 shuffle_down(const Top2& t, int offset) {
  return Top2{__shfl_down_sync(0xffffffffu, t.best, offset), __shfl_down_sync(0xffffffffu, t.second, offset),
              __shfl_down_sync(0xffffffffu, t.index, offset)};
}

// One block per bidder: top-2 of a_ij - p_j over the row, then the offer for the best column.
template <typename T>
__global__ void bid_kernel(const T* __restrict__ cost, int64_t rows, int64_t n, const int* __restrict__ bidders,
                           const double* __restrict__ price, double eps, int* __restrict__ bid_col,
                           double* __restrict__ bid_price, unsigned long long* __restrict__ col_best) {
  const int k = blockIdx.x;
  const int i = bidders[k];
  const double neg_inf = -INFINITY;
  Top2 t{neg_inf, neg_inf, -1};
  if (i < rows) {
    const T* row = cost + static_cast<int64_t>(i) * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      push(t, -static_cast<double>(row[j]) - price[j], static_cast<int>(j));
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) push(t, -price[j], static_cast<int>(j));
  }
  for (int offset = 16; offset > 0; offset >>= 1) t = merge(t, shuffle_down(t, offset));
  __shared__ double best[kBidThreads / 32], second[kBidThreads / 32];
  __shared__ int index[kBidThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    best[warp] = t.best;
    second[warp] = t.second;
    index[warp] = t.index;
  }
  __syncthreads();
  if (warp == 0) {
    t = lane < kBidThreads / 32 ? Top2{best[lane], second[lane], index[lane]} : Top2{neg_inf, neg_inf, -1};
    for (int offset = 16; offset > 0; offset >>= 1) t = merge(t, shuffle_down(t, offset));
    if (lane == 0) {
      const double offer = price[t.index] + (t.best - t.second) + eps;
      bid_col[k] = t.index;
      bid_price[k] = offer;
      // offers are positive, so their IEEE bits order like unsigned integers
      atomicMax(&col_best[t.index], static_cast<unsigned long long>(__double_as_longlong(offer)));
    }
  }
}

__global__ void claim_kernel(int count, const int* __restrict__ bidders, const int* __restrict__ bid_col,
                             const double* __restrict__ bid_price, const unsigned long long* __restrict__ col_best,
                             int* __restrict__ col_winner) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= count) return;
  const int j = bid_col[k];
  if (static_cast<unsigned long long>(__double_as_longlong(bid_price[k])) == col_best[j]) {
    atomicCAS(&col_winner[j], -1, bidders[k]);
  }
}

__global__ void assign_kernel(int count, const int* __restrict__ bidders, const int* __restrict__ bid_col,
                              const double* __restrict__ bid_price, double* __restrict__ price,
                              unsigned long long* __restrict__ col_best, int* __restrict__ col_winner,
                              int* __restrict__ owner, int* __restrict__ row_col, int* __restrict__ next_bidders,
                              int* __restrict__ next_count) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= count) return;
  const int i = bidders[k], j = bid_col[k];
  if (col_winner[j] != i) {  // outbid: bid again next round
    next_bidders[atomicAdd(next_count, 1)] = i;
    return;
  }
  const int evicted = owner[j];
  if (evicted >= 0) {
    row_col[evicted] = -1;
    next_bidders[atomicAdd(next_count, 1)] = evicted;
  }
  owner[j] = i;
  row_col[i] = j;
  price[j] = bid_price[k];
  col_best[j] = 0ull;
  col_winner[j] = -1;
}

__global__ void iota_kernel(int n, int* __restrict__ out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < n) out[k] = k;
}

std::string check(cudaError_t status, const char* what) {
  return status == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(status);
}

template <typename T>
std::string auction_assign(const T* cost, int64_t rows, int64_t cols, double range, double final_eps,
                           const AuctionWorkspace& ws, cudaStream_t stream) {
  const int n = static_cast<int>(cols);
  const int blocks_n = (n + kThreads - 1) / kThreads;
  std::string error = check(cudaMemsetAsync(ws.price, 0, sizeof(double) * n, stream), "price reset");
  if (!error.empty()) return error;
  double eps = std::max(range / 8.0, final_eps);
  long long rounds = 0;
  int* bidders = ws.bidders;
  int* next_bidders = ws.next_bidders;
  while (true) {
    cudaMemsetAsync(ws.owner, 0xff, sizeof(int) * n, stream);
    cudaMemsetAsync(ws.row_col, 0xff, sizeof(int) * n, stream);
    cudaMemsetAsync(ws.col_winner, 0xff, sizeof(int) * n, stream);
    cudaMemsetAsync(ws.col_best, 0, sizeof(unsigned long long) * n, stream);
    iota_kernel<<<blocks_n, kThreads, 0, stream>>>(n, bidders);
    int count = n;
    while (count > 0) {
      if (++rounds > kMaxRounds) return "the auction did not converge within its round limit";
      const int blocks = (count + kThreads - 1) / kThreads;
      bid_kernel<T><<<count, kBidThreads, 0, stream>>>(cost, rows, cols, bidders, ws.price, eps, ws.bid_col,
                                                       ws.bid_price, ws.col_best);
      claim_kernel<<<blocks, kThreads, 0, stream>>>(count, bidders, ws.bid_col, ws.bid_price, ws.col_best,
                                                    ws.col_winner);
      cudaMemsetAsync(ws.count, 0, sizeof(int), stream);
      assign_kernel<<<blocks, kThreads, 0, stream>>>(count, bidders, ws.bid_col, ws.bid_price, ws.price,
                                                     ws.col_best, ws.col_winner, ws.owner, ws.row_col,
                                                     next_bidders, ws.count);
      error = check(cudaMemcpyAsync(&count, ws.count, sizeof(int), cudaMemcpyDeviceToHost, stream), "count copy");
      if (error.empty()) error = check(cudaStreamSynchronize(stream), "auction round");
      if (!error.empty()) return error;
      std::swap(bidders, next_bidders);
    }
    if (eps <= final_eps) break;
    eps = std::max(eps / 8.0, final_eps);
  }
  return check(cudaGetLastError(), "auction kernels");
}

}  // namespace

std::string auction_assign_f32(const float* cost, int64_t rows, int64_t cols, double range, double final_eps,
                               const AuctionWorkspace& workspace, CUstream_st* stream) {
  return auction_assign(cost, rows, cols, range, final_eps, workspace, stream);
}

std::string auction_assign_f64(const double* cost, int64_t rows, int64_t cols, double range, double final_eps,
                               const AuctionWorkspace& workspace, CUstream_st* stream) {
  return auction_assign(cost, rows, cols, range, final_eps, workspace, stream);
}

}  // namespace moefuse
