// Grouped expert matmul for the few rows per expert of MoE decoding on CPU.
//
//   out[r, n] = sum_k x[r, k] * weight[e(r), n, k]      (fp32 accumulation, one rounding to T)
//
// where the rows of x are sorted by expert (counts[e] rows for expert e). With a handful of rows
// per expert the product is bound by reading the expert's weights, so the kernel streams each
// weight row once from its stored [N, K] layout and multiplies it with up to ROW_GROUP of the
// expert's rows at a time (a BLAS call would first pack the weights for a GEMM, a second pass over
// them): in fp32 (16-bit weights converted with bit operations), or for bf16 on CPUs with
// AVX512-BF16 with bf16 dot products. One call covers every expert, split over (expert, block of
// weight rows) on torch's thread pool.

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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOEFUSE_BF16_DOT 1

// rows_times_weight for bf16 on CPUs with AVX512-BF16: vdpbf16ps multiplies pairs of bf16 values
// exactly and adds them into fp32 lanes, so x and the weights are used as stored, 32 per step.
// (Like oneDNN's bf16 kernels, it reads bf16 subnormals as zero.)
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_times_weight_bf16_dot(
    const c10::BFloat16* x, const c10::BFloat16* w, int64_t n_rows, int64_t k_size, c10::BFloat16* y,
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
        acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * k_size + k));
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = Elem<c10::BFloat16>::cast(_mm512_reduce_add_ps(acc[r]));
  }
}

#endif

// Calls kernel(std::integral_constant<int, R>(), r) for consecutive groups [r, r + R) of `rows`
// rows, R <= ROW_GROUP.
template <typename Kernel>
void for_row_groups(int64_t rows, Kernel kernel) {
  for (int64_t r = 0; r < rows; r += ROW_GROUP) {
    switch (std::min(ROW_GROUP, rows - r)) {
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

void expert_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& counts,
                        int64_t max_rows, at::Tensor& out, bool bf16_dot) {
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
  TORCH_CHECK(!bf16_dot || (x.scalar_type() == at::kBFloat16 && has_bf16_dot()),
              "bf16_dot needs bf16 tensors and a CPU with AVX512-BF16");

  std::vector<int64_t> items;  // (expert, block of weight rows), flattened as e * blocks + block
  const int64_t blocks = (n_size + WEIGHT_BLOCK - 1) / WEIGHT_BLOCK;
  for (int64_t e = 0; e < experts; ++e) {
    if (counts[e] > 0 && counts[e] <= max_rows) {
      for (int64_t b = 0; b < blocks; ++b) items.push_back(e * blocks + b);
    }
  }
  if (items.empty()) return;
  const auto x_rows = x.contiguous();
  const auto x_float = bf16_dot ? at::Tensor() : x_rows.to(at::kFloat);  // converted once
  MOEFUSE_DISPATCH_FLOAT(x.scalar_type(), "expert_rows_linear", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* xs = x_rows.data_ptr<scalar_t>();
    const float* xf = bf16_dot ? nullptr : x_float.data_ptr<float>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = items[i] / blocks, n0 = (items[i] % blocks) * WEIGHT_BLOCK;
        const int64_t n_rows = std::min(WEIGHT_BLOCK, n_size - n0);
        const scalar_t* wb = w + e * weight.stride(0) + n0 * k_size;
        for_row_groups(counts[e], [&](auto group, int64_t r) {
          constexpr int R = decltype(group)::value;
          const int64_t row = first[e] + r;
          scalar_t* yb = y + row * n_size + n0;
#ifdef MOEFUSE_BF16_DOT
          if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
            if (bf16_dot) {
              return rows_times_weight_bf16_dot<R>(xs + row * k_size, wb, n_rows, k_size, yb, n_size);
            }
          }
#endif
          rows_times_weight<R>(xf + row * k_size, wb, n_rows, k_size, yb, n_size);
        });
      }
    });
  });
}

}  // namespace moefuse
