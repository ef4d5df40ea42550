// Grouped expert matmul on CPU, for the experts of an MoE block in one call.
//
//   out[r, n] = sum_k x[r, k] * weight[e(r), n, k]      (fp32 accumulation, one rounding to T)
//
// where the rows of x are sorted by expert (counts[e] rows for expert e). Both kernels read the
// weights in their stored [N, K] layout, with no packing pass (a BLAS matmul first copies them
// into a layout of its own, a second pass over them):
// - the row kernel, for experts with a handful of rows (decoding), is bound by reading the
//   weights. It streams each weight row once, in order, and multiplies it with up to ROW_GROUP of
//   the expert's rows: in fp32 (16-bit weights converted with bit operations), or for bf16 on
//   CPUs with AVX512-BF16 with bf16 dot products.
// - the tile kernel, for experts with more rows, is bound by the multiply-adds. A tile of
//   ROW_GROUP rows of x by ROW_GROUP weight rows keeps 16 vector accumulators of partial dot
//   products along K (8 vector loads per 16 multiply-adds), and one transposing reduction turns
//   them into the tile's 16 sums; in fp32.
// Work is split over (expert, block of weight rows) on torch's thread pool. Around the two
// projections, silu_mul_ forms SiLU(gate) * up in one pass and combine_rows sums each token's
// weighted expert rows (a gather per token: no scatter, no atomics).

#include "moe_cpu.h"
#include "elem.h"
#include "simd.h"

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace moefuse {
namespace {

constexpr int64_t LANES = 16;       // fp32 partial sums per (row, weight row): one AVX-512 vector
constexpr int ROW_GROUP = 4;        // x rows multiplied per pass over the weight rows
constexpr int64_t BLOCK_BYTES = 128 << 10;  // weight bytes per work item (stays in L2 across row groups)
constexpr int64_t PREFETCH_TILES = 4;  // the tile kernel reads the weights this many tiles ahead

// Small loops over accumulators, unrolled before GCC's scalar replacement so that the tile's
// accumulators stay in registers (otherwise they live on the stack between tiles).
#define MOEFUSE_UNROLL _Pragma("GCC unroll 16")

typedef float Floats __attribute__((vector_size(4 * LANES)));
typedef uint16_t Halves __attribute__((vector_size(2 * LANES)));
typedef uint32_t Words __attribute__((vector_size(4 * LANES)));
typedef int32_t Lanes __attribute__((vector_size(4 * LANES)));

// LANES consecutive values as floats.
__attribute__((always_inline)) inline Floats load_floats(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline Floats load_floats(const c10::BFloat16* p) {
  Halves h;
  std::memcpy(&h, p, sizeof(h));
  const Words w = __builtin_convertvector(h, Words) << 16;
  Floats v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// IEEE half -> float with integer operations: the exponent and mantissa shifted into place and
// scaled by 2^112 (exact, subnormals included), Inf/NaN given the all-ones exponent, sign copied.
__attribute__((always_inline)) inline Floats load_floats(const c10::Half* p) {
  Halves h;
  std::memcpy(&h, p, sizeof(h));
  const Words w = __builtin_convertvector(h, Words), magnitude = w & 0x7FFFu;
  Floats scaled;
  const Words shifted = magnitude << 13;
  std::memcpy(&scaled, &shifted, sizeof(scaled));
  scaled *= 0x1p112f;
  Words bits;
  std::memcpy(&bits, &scaled, sizeof(bits));
  bits |= (Words)(magnitude >= 0x7C00u) & 0x7F800000u;
  bits |= (w & 0x8000u) << 16;
  Floats v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The first `count` < LANES values at p as floats, the other lanes zero.
template <typename T>
__attribute__((always_inline)) inline Floats load_floats_tail(const T* p, int64_t count) {
  T padded[LANES];
  std::memset(padded, 0, sizeof(padded));
  std::memcpy(padded, p, count * sizeof(T));
  return load_floats(padded);
}

// Stores the LANES floats of v at p, each rounded to T.
template <typename T>
__attribute__((always_inline)) inline void store_floats(T* p, Floats v) {
  MOEFUSE_UNROLL for (int i = 0; i < LANES; ++i) p[i] = Elem<T>::cast(v[i]);
}

// To bf16 as round_to_bf16 does (nearest even, NaN -> 0x7FC0), on whole vectors: GCC did not
// vectorize the per-lane casts (combine_rows of 4096 bf16 rows: 0.52 ms with them, 0.20 ms with this).
template <>
__attribute__((always_inline)) inline void store_floats(c10::BFloat16* p, Floats v) {
  Words bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const Words rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const Words nan = (Words)((bits & 0x7FFFFFFFu) > 0x7F800000u);
  const Halves h = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), Halves);
  std::memcpy(p, &h, sizeof(h));
}

// e^x per lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error below 2e-7), 2^n from the exponent bits; 0 below -87.3, Inf above 88.3, NaN kept.
__attribute__((always_inline)) inline Floats exp_lanes(Floats x) {
  const Floats zero = {}, high = zero + 88.3f, low = zero - 87.3f;
  const Floats finite = x == x ? (x > high ? high : (x < low ? low : x)) : zero;
  const Floats n = (finite * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const Floats r = (finite - n * 0.693145752f) - n * 1.42860677e-6f;      // ln 2 in two parts
  Floats p = zero + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Lanes bits = (__builtin_convertvector(n, Lanes) + 127) << 23;
  Floats scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const Floats e = p * scale;
  return x == x ? (x > high ? zero + __builtin_inff() : (x < low ? zero : e)) : x;
}

// The sum of the lanes of v, added pairwise (a chain of LANES dependent scalar additions would
// cost as much as the dot product it ends).
__attribute__((always_inline)) inline float lane_sum(Floats v) {
  float t[LANES];
  std::memcpy(t, &v, sizeof(t));
  for (int width = LANES / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) t[j] += t[j + width];
  }
  return t[0];
}

// y[r * ldy + n] = sum_k x[r * ldx + k] * w[n * k_size + k] for r < R, n < n_rows: each weight
// row is read once, each of its vectors multiplied with all R rows of x.
template <int R, typename T>
MOEFUSE_SIMD_CLONES void rows_times_weight(const float* x, int64_t ldx, const T* w, int64_t n_rows, int64_t k_size,
                                           T* y, int64_t ldy) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const T* wn = w + n * k_size;
    Floats acc[R] = {};
    int64_t k = 0;
    for (; k + LANES <= k_size; k += LANES) {
      const Floats wv = load_floats(wn + k);
      for (int r = 0; r < R; ++r) acc[r] += wv * load_floats(x + r * ldx + k);
    }
    for (int r = 0; r < R; ++r) {
      float sum = lane_sum(acc[r]);
      for (int64_t t = k; t < k_size; ++t) sum += Elem<T>::value(wn[t]) * x[r * ldx + t];
      y[r * ldy + n] = Elem<T>::cast(sum);
    }
  }
}

// Accumulator slot of tile output o = row * ROW_GROUP + weight row: the reduction below leaves
// the sum of accumulator s in lane bit_reversed(s), so output o, accumulated in slot
// bit_reversed(o), comes out in lane o.
constexpr int slot(int o) { return ((o & 1) << 3) | ((o & 2) << 1) | ((o & 4) >> 1) | ((o & 8) >> 3); }
static_assert(ROW_GROUP * ROW_GROUP == LANES, "a tile's sums fill one vector");

// One level of the reduction: in blocks of 2H lanes, the first H lanes of the result add the
// lanes H apart in a, the last H those in b.
template <int H>
__attribute__((always_inline)) inline Floats fold(Floats a, Floats b) {
  Lanes low, high;
  MOEFUSE_UNROLL for (int i = 0; i < LANES; ++i) {
    const int block = i / (2 * H) * (2 * H), offset = i % (2 * H);
    low[i] = offset < H ? block + offset : LANES + block + offset - H;
    high[i] = low[i] + H;
  }
  return __builtin_shuffle(a, b, low) + __builtin_shuffle(a, b, high);
}

// The sums of 16 accumulators in one vector: lane i holds the sum of acc[bit_reversed(i)].
__attribute__((always_inline)) inline Floats reduce_lanes(const Floats* acc) {
  Floats eight[8], four[4], two[2];
  MOEFUSE_UNROLL for (int i = 0; i < 8; ++i) eight[i] = fold<8>(acc[2 * i], acc[2 * i + 1]);
  MOEFUSE_UNROLL for (int i = 0; i < 4; ++i) four[i] = fold<4>(eight[2 * i], eight[2 * i + 1]);
  MOEFUSE_UNROLL for (int i = 0; i < 2; ++i) two[i] = fold<2>(four[2 * i], four[2 * i + 1]);
  return fold<1>(two[0], two[1]);
}

// The same product as rows_times_weight, in tiles of R x rows by ROW_GROUP weight rows (a last
// partial tile repeats its last weight row and drops the extra sums). With Prefetch (the first
// row group, which reads the weights from memory; the next ones find them in L2), the weight
// bytes PREFETCH_TILES tiles ahead are prefetched in order as a tile proceeds: reading ROW_GROUP
// rows side by side, the hardware prefetcher alone kept up with only half the bandwidth. On the
// later row groups the prefetches would only take load slots (25% slower at 128 rows).
template <int R, bool Prefetch, typename T>
MOEFUSE_SIMD_CLONES void tile_times_weight(const float* x, int64_t ldx, const T* w, int64_t n_rows, int64_t k_size,
                                           T* y, int64_t ldy) {
  constexpr int64_t step_bytes = ROW_GROUP * LANES * sizeof(T);  // weight bytes read per step
  for (int64_t n = 0; n < n_rows; n += ROW_GROUP) {
    const T* wn[ROW_GROUP];
    MOEFUSE_UNROLL for (int j = 0; j < ROW_GROUP; ++j) wn[j] = w + std::min(n + j, n_rows - 1) * k_size;
    const char* ahead = reinterpret_cast<const char*>(w + std::min(n + ROW_GROUP * PREFETCH_TILES, n_rows) * k_size);
    Floats acc[LANES] = {};
    int64_t k = 0;
    for (; k + LANES <= k_size; k += LANES, ahead += step_bytes) {
      if (Prefetch) {
        MOEFUSE_UNROLL for (int64_t line = 0; line < step_bytes; line += 64) __builtin_prefetch(ahead + line);
      }
      Floats wv[ROW_GROUP];
      MOEFUSE_UNROLL for (int j = 0; j < ROW_GROUP; ++j) wv[j] = load_floats(wn[j] + k);
      MOEFUSE_UNROLL for (int r = 0; r < R; ++r) {
        const Floats xv = load_floats(x + r * ldx + k);
        MOEFUSE_UNROLL for (int j = 0; j < ROW_GROUP; ++j) acc[slot(r * ROW_GROUP + j)] += xv * wv[j];
      }
    }
    if (k < k_size) {
      Floats wv[ROW_GROUP];
      MOEFUSE_UNROLL for (int j = 0; j < ROW_GROUP; ++j) wv[j] = load_floats_tail(wn[j] + k, k_size - k);
      MOEFUSE_UNROLL for (int r = 0; r < R; ++r) {
        const Floats xv = load_floats_tail(x + r * ldx + k, k_size - k);
        MOEFUSE_UNROLL for (int j = 0; j < ROW_GROUP; ++j) acc[slot(r * ROW_GROUP + j)] += xv * wv[j];
      }
    }
    const Floats sums = reduce_lanes(acc);
    const int64_t columns = std::min<int64_t>(ROW_GROUP, n_rows - n);
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < columns; ++j) y[r * ldy + n + j] = Elem<T>::cast(sums[r * ROW_GROUP + j]);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOEFUSE_BF16_DOT 1

// rows_times_weight for bf16 on CPUs with AVX512-BF16: vdpbf16ps multiplies pairs of bf16 values
// exactly and adds them into fp32 lanes, so x and the weights are used as stored, 32 per step.
// (Like oneDNN's bf16 kernels, it reads bf16 subnormals as zero.)
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_times_weight_bf16_dot(
    const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t n_rows, int64_t k_size, c10::BFloat16* y,
    int64_t ldy) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const c10::BFloat16* wn = w + n * k_size;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_size; k += 32) {
      const int64_t left = k_size - k;
      const __mmask32 mask = left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wn + k);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ldx + k));
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = Elem<c10::BFloat16>::cast(_mm512_reduce_add_ps(acc[r]));
  }
}

#endif

// gate[i] = round(silu(gate[i]) * up[i]) for i < count, silu(g) = g / (1 + e^-g), in fp32.
template <typename T>
MOEFUSE_SIMD_CLONES void silu_times_row(T* gate, const T* up, int64_t count) {
  int64_t i = 0;
  for (; i + LANES <= count; i += LANES) {
    const Floats g = load_floats(gate + i);
    store_floats(gate + i, g / (1.0f + exp_lanes(-g)) * load_floats(up + i));
  }
  if (i < count) {
    const Floats g = load_floats_tail(gate + i, count - i);
    T h[LANES];
    store_floats(h, g / (1.0f + exp_lanes(-g)) * load_floats_tail(up + i, count - i));
    std::memcpy(gate + i, h, (count - i) * sizeof(T));
  }
}

// out[c] = round(sum_j weights[j] * rows[j][c]) for c < columns, j < k, summed in fp32 in order.
template <typename T>
MOEFUSE_SIMD_CLONES void weighted_row_sum(const T* const* rows, const float* weights, int64_t k, int64_t columns,
                                          T* out) {
  int64_t c = 0;
  for (; c + LANES <= columns; c += LANES) {
    Floats acc = {};
    for (int64_t j = 0; j < k; ++j) acc += weights[j] * load_floats(rows[j] + c);
    store_floats(out + c, acc);
  }
  for (; c < columns; ++c) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) acc += weights[j] * Elem<T>::value(rows[j][c]);
    out[c] = Elem<T>::cast(acc);
  }
}

// Calls kernel(std::integral_constant<int, R>(), r) for consecutive groups [r, r + R) of `rows`
// rows, R <= ROW_GROUP.
template <typename Kernel>
void for_row_groups(int64_t rows, Kernel kernel) {
  for (int64_t r = 0; r < rows; r += ROW_GROUP) {
    switch (std::min<int64_t>(ROW_GROUP, rows - r)) {
      case 1: kernel(std::integral_constant<int, 1>(), r); break;
      case 2: kernel(std::integral_constant<int, 2>(), r); break;
      case 3: kernel(std::integral_constant<int, 3>(), r); break;
      default: kernel(std::integral_constant<int, 4>(), r); break;
    }
  }
}

}  // namespace

bool has_bf16_dot() {
#ifdef MOEFUSE_BF16_DOT
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

void experts_linear(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& counts,
                    int64_t row_kernel_rows, int64_t max_rows, at::Tensor& out, bool bf16_dot) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && out.dim() == 2, "x [R, K], weight [E, N, K], out [R, N]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && out.scalar_type() == x.scalar_type(),
              "x, weight and out must share a dtype");
  const int64_t k_size = x.size(1), n_size = weight.size(1), experts = weight.size(0);
  TORCH_CHECK(weight.size(2) == k_size && out.size(0) == x.size(0) && out.size(1) == n_size,
              "shapes: x [R, K], weight [E, N, K], out [R, N]");
  TORCH_CHECK(k_size == 0 || (weight.stride(2) == 1 && weight.stride(1) == k_size),
              "weight rows must be contiguous along K");
  TORCH_CHECK(out.stride(1) == 1, "out rows must be contiguous");
  TORCH_CHECK(int64_t(counts.size()) == experts, "one count per expert");
  std::vector<int64_t> first(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) first[e + 1] = first[e] + counts[e];
  TORCH_CHECK(first[experts] == x.size(0), "counts must add up to the rows of x");
  TORCH_CHECK(!bf16_dot || (x.scalar_type() == at::kBFloat16 && has_bf16_dot()),
              "bf16_dot needs bf16 tensors and a CPU with AVX512-BF16");

  std::vector<int64_t> items;  // (expert, block of weight rows), flattened as e * blocks + block
  const int64_t block_rows = std::max<int64_t>(
      ROW_GROUP, BLOCK_BYTES / std::max<int64_t>(1, k_size * int64_t(weight.element_size())) / ROW_GROUP * ROW_GROUP);
  const int64_t blocks = (n_size + block_rows - 1) / block_rows;
  for (int64_t e = 0; e < experts; ++e) {
    if (counts[e] > 0 && counts[e] <= max_rows) {
      for (int64_t b = 0; b < blocks; ++b) items.push_back(e * blocks + b);
    }
  }
  if (items.empty()) return;
  const auto x_rows = x.stride(1) == 1 ? x : x.contiguous();
  // x in fp32 for the fp32 kernels: converted once, unless x is fp32 or only bf16 dot products run.
  bool tiles_run = false;
  for (int64_t e = 0; e < experts; ++e) tiles_run |= counts[e] > row_kernel_rows && counts[e] <= max_rows;
  const auto x_float = x_rows.scalar_type() == at::kFloat || (bf16_dot && !tiles_run) ? x_rows : x_rows.to(at::kFloat);
  [[maybe_unused]] const int64_t ldx = x_rows.stride(0);
  const int64_t ldf = x_float.stride(0), ldy = out.stride(0);
  MOEFUSE_DISPATCH_FLOAT(x.scalar_type(), "experts_linear", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    [[maybe_unused]] const scalar_t* xs = x_rows.data_ptr<scalar_t>();  // for the bf16 dot products
    const float* xf = x_float.scalar_type() == at::kFloat ? x_float.data_ptr<float>() : nullptr;
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = items[i] / blocks, n0 = (items[i] % blocks) * block_rows;
        const int64_t n_rows = std::min(block_rows, n_size - n0);
        const scalar_t* wb = w + e * weight.stride(0) + n0 * k_size;
        const bool tiles = counts[e] > row_kernel_rows;
        for_row_groups(counts[e], [&](auto group, int64_t r) {
          constexpr int R = decltype(group)::value;
          const int64_t row = first[e] + r;
          scalar_t* yb = y + row * ldy + n0;
          if (tiles && r == 0) return tile_times_weight<R, true>(xf + row * ldf, ldf, wb, n_rows, k_size, yb, ldy);
          if (tiles) return tile_times_weight<R, false>(xf + row * ldf, ldf, wb, n_rows, k_size, yb, ldy);
#ifdef MOEFUSE_BF16_DOT
          if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
            if (bf16_dot) return rows_times_weight_bf16_dot<R>(xs + row * ldx, ldx, wb, n_rows, k_size, yb, ldy);
          }
#endif
          rows_times_weight<R>(xf + row * ldf, ldf, wb, n_rows, k_size, yb, ldy);
        });
      }
    });
  });
}

void silu_mul_(at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.device().is_cpu() && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up: a CPU tensor [R, 2I] with contiguous rows");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2, ld = gate_up.stride(0);
  MOEFUSE_DISPATCH_FLOAT(gate_up.scalar_type(), "silu_mul_", [&] {
    scalar_t* data = gate_up.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inter)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) silu_times_row(data + r * ld, data + r * ld + inter, inter);
    });
  });
}

void combine_rows(const at::Tensor& y, const at::Tensor& positions, const at::Tensor& weights, at::Tensor& out) {
  TORCH_CHECK(y.dim() == 2 && positions.dim() == 2 && weights.sizes() == positions.sizes() && out.dim() == 2,
              "y [P, H], positions [T, k], weights [T, k], out [T, H]");
  TORCH_CHECK(y.device().is_cpu() && positions.device().is_cpu() && weights.device().is_cpu() && out.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(y.scalar_type() == out.scalar_type() && positions.scalar_type() == at::kLong &&
                  weights.scalar_type() == at::kFloat,
              "y and out share a dtype, positions are int64, weights fp32");
  TORCH_CHECK(out.size(0) == positions.size(0) && out.size(1) == y.size(1), "out must be [T, H]");
  TORCH_CHECK(y.stride(1) == 1 && out.is_contiguous() && positions.is_contiguous() && weights.is_contiguous(),
              "rows must be contiguous");
  const int64_t tokens = out.size(0), k = positions.size(1), columns = y.size(1), pairs = y.size(0), ldy = y.stride(0);
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens * k; ++i) {
    TORCH_CHECK(position[i] >= 0 && position[i] < pairs, "position ", position[i], " is not a row of y");
  }
  MOEFUSE_DISPATCH_FLOAT(y.scalar_type(), "combine_rows", [&] {
    const scalar_t* ys = y.data_ptr<scalar_t>();
    const float* w = weights.data_ptr<float>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * columns));  // tokens per task
    at::parallel_for(0, tokens, grain, [&](int64_t t0, int64_t t1) {
      std::vector<const scalar_t*> rows(k);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = 0; j < k; ++j) rows[j] = ys + position[t * k + j] * ldy;
        weighted_row_sum(rows.data(), w + t * k, k, columns, o + t * columns);
      }
    });
  });
}

}  // namespace moefuse
