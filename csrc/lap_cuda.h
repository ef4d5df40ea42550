// Dense linear assignment on a CUDA GPU: auction with epsilon scaling (see lap_cuda.cu).
#pragma once

#include <cstdint>
#include <string>

struct CUstream_st;

namespace moefuse {

// Device workspace of auction_assign for an n x n (padded) problem; all arrays live on the GPU.
struct AuctionWorkspace {
  double* price;                  // [n] column prices
  double* bid_price;              // [n] offer of the k-th bidder of a round
  unsigned long long* col_best;   // [n] bits of the highest offer per column this round (prices are >= 0)
  int* col_winner;                // [n] row that won the column this round, -1 if none
  int* owner;                     // [n] row holding each column, -1 if none
  int* row_col;                   // [n] column held by each row, -1 if none
  int* bidders;                   // [n] unassigned rows of the round
  int* next_bidders;              // [n] rows left unassigned by the round (evicted or outbid)
  int* bid_col;                   // [n] column the k-th bidder bids on
  int* count;                     // [1] number of bidders
};

// Minimize sum_i cost[i, x_i] over injective x for a row-major [rows, cols] cost on the GPU with
// rows <= cols, no infinities, and n = cols >= 2 (rows < n are padded with virtual zero-cost rows).
// Epsilon scaling from `range` / 8 down by 8x per phase to `final_eps`; the result is within
// n * final_eps of the optimum (exact for integer costs with final_eps < 1/n). Writes the column of
// each of the n (padded) rows to workspace.row_col. Returns "" or an error message.
std::string auction_assign_f32(const float* cost, int64_t rows, int64_t cols, double range, double final_eps,
                               const AuctionWorkspace& workspace, CUstream_st* stream);
std::string auction_assign_f64(const double* cost, int64_t rows, int64_t cols, double range, double final_eps,
                               const AuctionWorkspace& workspace, CUstream_st* stream);

}  // namespace moefuse
