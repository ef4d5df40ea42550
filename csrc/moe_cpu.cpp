// Grouped expert matmul for the few rows per expert of MoE decoding on CPU.
//
//   out[r, n] = sum_k x[r, k] * weight[e(r), n, k]      (fp32 accumulation, one rounding to T)
//
// where the rows of x are sorted by expert (counts[e] rows for expert e). With a handful of rows
// per expert the product is bound by reading the expert's weights, so the kernel streams each
// weight row once from its stored [N, K] layout and multiplies it with all of the expert's rows
// held in fp32 (a BLAS call would first pack the weights for a GEMM, a second pass over them). One
// call covers every expert, split over (expert, block of weight rows) on torch's thread pool.

#include "moe_cpu.h"
#include "elem.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace moefuse {
namespace {

constexpr int64_t LANES = 16;       // fp32 partial sums per (row, weight row): one AVX-512 vector
constexpr int64_t ROW_GROUP = 4;    // x rows multiplied per pass over a weight row
constexpr int64_t WEIGHT_BLOCK = 64;  // weight rows per work item

typedef float Floats __attribute__((vector_size(4 * LANES)));
typedef uint16_t Halves __attribute__((vector_size(2 * LANES)));
typedef uint32_t Words __attribute__((vector_size(4 * LANES)));

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

// y[r * ldy + n] = sum_k x[r * k_size + k] * w[n * k_size + k] for r < R, n < n_rows: each weight
// row is read once, each of its vectors multiplied with all R rows of x.
template <int R, typename T>
MOEFUSE_SIMD_CLONES void rows_times_weight(const float* x, const T* w, int64_t n_rows, int64_t k_size, T* y,
                                           int64_t ldy) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const T* wn = w + n * k_size;
    Floats acc[R] = {};
    int64_t k = 0;
    for (; k + LANES <= k_size; k += LANES) {
      const Floats wv = load_floats(wn + k);
      for (int r = 0; r < R; ++r) acc[r] += wv * load_floats(x + r * k_size + k);
    }
    for (int r = 0; r < R; ++r) {
      float sum = lane_sum(acc[r]);
      for (int64_t t = k; t < k_size; ++t) sum += Elem<T>::value(wn[t]) * x[r * k_size + t];
      y[r * ldy + n] = Elem<T>::cast(sum);
    }
  }
}

template <typename T>
void rows_times_weight_any(int64_t rows, const float* x, const T* w, int64_t n_rows, int64_t k_size, T* y,
                           int64_t ldy) {
  for (int64_t r = 0; r < rows; r += ROW_GROUP) {
    const float* xr = x + r * k_size;
    T* yr = y + r * ldy;
    switch (std::min(ROW_GROUP, rows - r)) {
      case 1: rows_times_weight<1>(xr, w, n_rows, k_size, yr, ldy); break;
      case 2: rows_times_weight<2>(xr, w, n_rows, k_size, yr, ldy); break;
      case 3: rows_times_weight<3>(xr, w, n_rows, k_size, yr, ldy); break;
      default: rows_times_weight<4>(xr, w, n_rows, k_size, yr, ldy); break;
    }
  }
}

}  // namespace

void expert_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& counts,
                        int64_t max_rows, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && out.dim() == 2, "x [R, K], weight [E, N, K], out [R, N]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && out.scalar_type() == x.scalar_type(),
              "x, weight and out must share a dtype");
  const int64_t k_size = x.size(1), n_size = weight.size(1), experts = weight.size(0);
  TORCH_CHECK(weight.size(2) == k_size && out.size(0) == x.size(0) && out.size(1) == n_size,
              "shapes: x [R, K], weight [E, N, K], out [R, N]");
  TORCH_CHECK(weight.stride(2) == 1 && weight.stride(1) == k_size, "weight rows must be contiguous along K");
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(int64_t(counts.size()) == experts, "one count per expert");
  std::vector<int64_t> first(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) first[e + 1] = first[e] + counts[e];
  TORCH_CHECK(first[experts] == x.size(0), "counts must add up to the rows of x");

  // x rows in fp32, converted once (only the rows of the experts this call covers).
  std::vector<int64_t> items;  // (expert, weight block) pairs, flattened
  const int64_t blocks = (n_size + WEIGHT_BLOCK - 1) / WEIGHT_BLOCK;
  for (int64_t e = 0; e < experts; ++e) {
    if (counts[e] > 0 && counts[e] <= max_rows) {
      for (int64_t b = 0; b < blocks; ++b) items.push_back(e * blocks + b);
    }
  }
  if (items.empty()) return;
  auto x_float = x.contiguous().to(at::kFloat);
  const float* xf = x_float.data_ptr<float>();
  MOEFUSE_DISPATCH_FLOAT(x.scalar_type(), "expert_rows_linear", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t expert_stride = weight.stride(0);
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = items[i] / blocks, n0 = (items[i] % blocks) * WEIGHT_BLOCK;
        const int64_t n_rows = std::min(WEIGHT_BLOCK, n_size - n0);
        rows_times_weight_any(counts[e], xf + first[e] * k_size, w + e * expert_stride + n0 * k_size, n_rows,
                              k_size, y + first[e] * n_size + n0, n_size);
      }
    });
  });
}

}  // namespace moefuse
