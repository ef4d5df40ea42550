// CPU merge kernels (see merge_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace moefuse {

std::vector<int64_t> count_nonfinite(const std::vector<at::Tensor>& tensors);
// Level-1 histograms per range: int32 [inputs, max(1, ceil(n / size)), 32768]; range r covers
// the flat entries [r * size, (r + 1) * size). With bands (per input: lo0, hi0, lo1, hi1, ...
// ascending, at least one bin between two), only the bins inside them are counted one by one;
// bin lo0 - 1 counts every key below the first band, bin hi + 1 of a band every key between it
// and the next band (or above it, for the last).
at::Tensor histogram_level1(const at::Tensor& base, const std::vector<at::Tensor>& inputs, int64_t shift,
                            int64_t size, const std::vector<std::vector<int64_t>>& bands);
at::Tensor histogram_level2(const at::Tensor& base, const std::vector<at::Tensor>& inputs,
                            const std::vector<int64_t>& prefixes);
at::Tensor chunk_counts(const at::Tensor& base, const std::vector<at::Tensor>& inputs,
                        const std::vector<int64_t>& keys, int64_t chunk);
// The flat index of the entry of rank `left` (0-based, in index order) among those whose magnitude
// key is `key`, or -1 where there are not that many; and how many such entries were counted (up to
// and including it, or all of them). One thread, stopping at the entry.
std::tuple<int64_t, int64_t> nth_key_index(const at::Tensor& base, const at::Tensor& x, int64_t key, int64_t left);
// `offset`: the flat index of the slice's first entry in the whole tensor (rank cuts, draws).
// `keeps` (one uint8 buffer of ceil(n / 8) bytes per input, or none): l1_norms stores each
// random keep decision there (bit j % 8 of byte j / 8), or with `replay` reads the decisions from
// there instead of drawing them; fused_gta given them as `cached_keeps` replays them.
std::tuple<at::Tensor, at::Tensor> l1_norms(const at::Tensor& base, const std::vector<at::Tensor>& inputs,
                                            const at::Tensor& rules, int64_t seed, int64_t offset,
                                            const std::vector<at::Tensor>& keeps, bool replay);
// The fused pass and the weighted sum also return the NaN/Inf count of each input read
// (fused_gta: the base first, then the inputs). They write into `out` where given (a contiguous
// CPU tensor of out_dtype with as many entries as the inputs, e.g. a reused buffer), else into a
// new tensor.
std::tuple<at::Tensor, std::vector<int64_t>> fused_gta(
    const at::Tensor& base, const std::vector<at::Tensor>& inputs, const at::Tensor& rules, int64_t seed,
    const std::vector<double>& coefficients, const std::vector<double>& weights, bool consensus, bool normalize,
    double weight_sum, double lam, at::ScalarType out_dtype, int64_t offset, const std::vector<at::Tensor>& cached_keeps,
    const c10::optional<at::Tensor>& out);
std::tuple<at::Tensor, std::vector<int64_t>> weighted_sum(const std::vector<at::Tensor>& tensors,
                                                          const std::vector<double>& coefficients,
                                                          at::ScalarType out_dtype, const c10::optional<at::Tensor>& out);
at::Tensor gram(const std::vector<at::Tensor>& tensors, const c10::optional<at::Tensor>& base);
// Filter-wise Model Stock over rows of row_length entries: each row gets its own factor t from
// the Gram matrix of its task vectors, out = (1 - t) base + t / m sum_i inputs_i, written into
// `out` where given (as fused_gta). Also returns the NaN/Inf count of the base, then of each input.
std::tuple<at::Tensor, std::vector<int64_t>> model_stock_rows(const at::Tensor& base,
                                                              const std::vector<at::Tensor>& inputs,
                                                              int64_t row_length, at::ScalarType out_dtype,
                                                              const c10::optional<at::Tensor>& out);
// DELLA's keep mask over whole rows of probability.numel() entries: entry c of row r (flat index
// j = offset + r * len + c) is kept iff uniform(draw(seed, j, stream)) < probability[rank], draw the
// Philox word of moefuse/ops/philox.py, rank the ascending rank of |x - base| in its row (ties by
// column), uniform(u) = (u >> 8) / 2^24.
// Returned packed: uint8 [ceil(n / 8)], entry j in bit j % 8 of byte j / 8 (the other bits 0).
at::Tensor della_keep(const at::Tensor& base, const at::Tensor& x, const at::Tensor& probability, int64_t seed,
                      int64_t stream, int64_t offset);

}  // namespace moefuse
