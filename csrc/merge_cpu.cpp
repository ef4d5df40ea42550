// CPU kernels of the merge engine: selection histograms, tie counts, L1 norms, the fused GTA
// pass, weighted sums and Gram matrices. Semantics: moefuse/ops/merge_reference.py and the
// docstrings of moefuse/ops/gta_pipeline.py and moefuse/ops/select.py.
//
// Work is split into tiles of TILE entries handed to at::parallel_for; per-thread scratch is a
// few tiles (and histograms), never a tensor-sized buffer. Each tile is handled by a function
// compiled for AVX2 and for the baseline ISA (simd.h) whose loops GCC vectorizes: 16-bit values
// are converted with bit operations rather than through c10's scalar conversions.
// `offset` arguments give the flat index of a slice's first entry in the whole tensor, so that a
// tensor can be merged slice by slice with the same rank cuts and random draws.

#include "merge_cpu.h"
#include "elem.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace moefuse {
namespace {

constexpr int64_t TILE = 1024;
constexpr int64_t LEVEL1_BINS = 1 << 15;
constexpr int64_t LEVEL2_BINS = 1 << 16;
constexpr int64_t ALWAYS = int64_t(1) << 32;

// Philox-4x32-10 with key (seed lo, seed hi) and counter (q lo, q hi, stream, 0): its four words.
struct Philox {
  uint32_t w[4];
  inline Philox(uint64_t seed, uint64_t q, uint32_t stream) {
    uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = stream, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t pb = uint64_t(0xCD9E8D57u) * c2;
      const uint64_t pa = uint64_t(0xD2511F53u) * c0;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    w[0] = c0;
    w[1] = c1;
    w[2] = c2;
    w[3] = c3;
  }
};

// bits[k] = the draw of entry j = start + k for k < len (len <= TILE): word j % 4 of the Philox
// block with counter q = j / 4 (moefuse/ops/philox.py), so one evaluation serves four entries.
// A function of its own so that each clone vectorizes the 10 rounds (inlined into a caller, GCC
// leaves them scalar).
MOEFUSE_SIMD_CLONES __attribute__((noinline)) void draw_tile(uint64_t seed, int64_t start, int64_t len,
                                                             uint32_t stream, uint32_t* bits) {
  constexpr int64_t BLOCKS = TILE / 4 + 1;  // one more where start is not a multiple of 4
  uint32_t words[4 * BLOCKS];
  const int64_t first = start >> 2, skip = start & 3, blocks = (skip + len + 3) >> 2;
  for (int64_t g = 0; g < blocks; ++g) {
    const Philox block(seed, uint64_t(first + g), stream);
    for (int w = 0; w < 4; ++w) words[4 * g + w] = block.w[w];
  }
  std::memcpy(bits, words + skip, len * sizeof(uint32_t));
}

struct Rule {
  int64_t t_hi, cut_hi, t_lo, cut_lo, random_threshold;

  bool keeps_all() const { return t_hi < 0 && t_lo >= ALWAYS && random_threshold >= ALWAYS; }
};

// The rank test of one tile in 32-bit arithmetic (keys are at most 0x7FFFFFFF): `threshold`
// clamped to [-1, INT32_MAX] keeps its meaning, and `cut` becomes an offset inside the tile.
// Where the cut does not fall inside the tile (`uncut`: every entry is on the same side of it),
// the test is the single comparison key > whole: key > threshold before the cut's tile, key >=
// threshold after it.
struct TileBound {
  int32_t threshold, cut, whole;
  bool uncut;
  TileBound(int64_t t, int64_t c, int64_t start, int64_t len)
      : threshold(static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(t, -1), INT32_MAX))),
        cut(static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(c - start, 0), len))),
        whole(cut == 0 ? threshold : threshold - 1),
        uncut(cut == 0 || cut == len) {}
  // Bitwise, not short-circuit, operators: branch-free, so that the loops calling it vectorize.
  template <bool kUncut>
  inline bool above(int32_t key, int32_t k) const {
    return kUncut ? key > whole : (key > threshold) | ((key == threshold) & (k < cut));
  }
};

// Fills d[0, len) with the deltas of x against b (rounded to the input dtype) and keys with
// their magnitude keys.
template <typename T>
inline void load_deltas(const T* x, const T* b, int64_t len, float* d, int32_t* keys) {
  for (int64_t k = 0; k < len; ++k) d[k] = Elem<T>::delta(x[k], b[k], &keys[k]);
}

template <typename T>
inline void load_keys(const T* x, const T* b, int64_t len, int32_t* keys) {
  for (int64_t k = 0; k < len; ++k) Elem<T>::delta(x[k], b[k], &keys[k]);
}

// Number of NaN/Inf entries among x[0, len).
template <typename T>
inline int64_t count_bad(const T* x, int64_t len) {
  int32_t bad = 0;  // len <= TILE
  for (int64_t k = 0; k < len; ++k) bad += !std::isfinite(Elem<T>::value(x[k]));
  return bad;
}

// The uint8 buffers of random keep bits, one per input (or none): each holds at least n / 8 bytes.
std::vector<uint8_t*> keep_bit_buffers(const std::vector<at::Tensor>& buffers, int64_t inputs, int64_t n) {
  std::vector<uint8_t*> out;
  if (buffers.empty()) return out;
  TORCH_CHECK(int64_t(buffers.size()) == inputs, "one random-keep buffer per input");
  for (const auto& buffer : buffers) {
    TORCH_CHECK(buffer.device().is_cpu() && buffer.scalar_type() == at::kByte && buffer.is_contiguous() &&
                    buffer.numel() >= (n + 7) / 8,
                "random-keep buffers must be contiguous uint8 CPU tensors of ceil(n / 8) bytes");
    out.push_back(buffer.data_ptr<uint8_t>());
  }
  return out;
}

std::vector<Rule> read_rules(const at::Tensor& rules) {
  TORCH_CHECK(rules.dtype() == at::kLong && rules.dim() == 2 && rules.size(1) == 5,
              "rules must be an int64 [N, 5] tensor");
  auto r = rules.contiguous();
  const int64_t* p = r.data_ptr<int64_t>();
  std::vector<Rule> out(r.size(0));
  for (int64_t i = 0; i < r.size(0); ++i) {
    out[i] = Rule{p[5 * i], p[5 * i + 1], p[5 * i + 2], p[5 * i + 3], p[5 * i + 4]};
  }
  return out;
}

void check_same(const at::Tensor& base, const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(base.device().is_cpu() && base.is_contiguous(), "base must be a contiguous CPU tensor");
  for (const auto& x : inputs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "inputs must be contiguous CPU tensors");
    TORCH_CHECK(x.numel() == base.numel() && x.scalar_type() == base.scalar_type(),
                "inputs must match the base's size and dtype");
  }
}

// The output of a pass over tensors like `like`: `given` (checked) or a new tensor.
at::Tensor output_for(const at::Tensor& like, at::ScalarType dtype, const c10::optional<at::Tensor>& given) {
  if (!given.has_value()) return at::empty(like.sizes(), like.options().dtype(dtype));
  const at::Tensor& out = *given;
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == dtype && out.numel() == like.numel(),
              "out must be a contiguous CPU tensor of the output dtype with one entry per input entry");
  return out.view(like.sizes());
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& inputs) {
  std::vector<const T*> out;
  for (const auto& x : inputs) out.push_back(x.data_ptr<T>());
  return out;
}

// Runs body(thread, tile_start, tile_stop) over the tiles of [0, n) on torch's thread pool.
template <typename Body>
void for_tiles(int64_t n, Body body) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    const int64_t thread = at::get_thread_num();
    for (int64_t t = t0; t < t1; ++t) body(thread, t * TILE, std::min(n, (t + 1) * TILE));
  });
}

// Adds the threads' partial results into total (a thread that did no work may have left its
// vector empty).
template <typename T>
void add_per_thread(const std::vector<std::vector<T>>& local, T* total, size_t size) {
  for (const auto& part : local) {
    TORCH_INTERNAL_ASSERT(part.size() <= size);
    for (size_t i = 0; i < part.size(); ++i) total[i] += part[i];
  }
}

template <typename T>
std::vector<T> sum_per_thread(const std::vector<std::vector<T>>& local) {
  size_t size = 0;
  for (const auto& part : local) size = std::max(size, part.size());
  std::vector<T> total(size, T(0));
  add_per_thread(local, total.data(), size);
  return total;
}

// The same sum as a tensor of the given sizes, written in place (no intermediate vector).
template <typename T>
at::Tensor sum_per_thread(const std::vector<std::vector<T>>& local, at::IntArrayRef sizes) {
  at::Tensor total = at::zeros(sizes, at::CppTypeToScalarType<T>::value);
  add_per_thread(local, total.data_ptr<T>(), size_t(total.numel()));
  return total;
}

// ---- One tile (at most TILE entries) of each kernel: the vectorized inner loops. ----

template <typename T>
MOEFUSE_SIMD_CLONES int64_t nonfinite_tile(const T* x, int64_t len) {
  return count_bad(x, len);
}

template <typename T>
MOEFUSE_SIMD_CLONES void keys_tile(const T* x, const T* b, int64_t len, int32_t* keys) {
  load_keys(x, b, len, keys);
}

// A run of level-1 bins [lo, hi] that a histogram counts one by one.
struct Band {
  int32_t lo = 0, hi = LEVEL1_BINS - 1;

  bool everything() const { return lo == 0 && hi == LEVEL1_BINS - 1; }
};

// The bands of one input, ascending, with at least one bin between two: the keys outside them
// are counted in lumps, those below the first band in bin lo - 1, those between two bands in the
// bin just above the lower one, those above the last band in bin hi + 1. Empty: every bin.
using Bands = std::vector<Band>;

// The keys of keys[0, len) whose bin (key >> shift) lies in the band, in order, as
// key - (band.lo << shift), into `inside` (room for len + 16); also adds the numbers of keys
// above and below the band. Returns how many are inside.
inline int64_t band_select_scalar(const int32_t* keys, int64_t len, int shift, Band band, int32_t* inside,
                                  int64_t* above, int64_t* below) {
  const uint32_t width = uint32_t(band.hi - band.lo);
  const int32_t origin = band.lo << shift;
  int64_t m = 0;
  for (int64_t k = 0; k < len; ++k) {
    const int32_t bin = keys[k] >> shift;
    *above += bin > band.hi;
    *below += bin < band.lo;
    inside[m] = keys[k] - origin;
    m += uint32_t(bin - band.lo) <= width;
  }
  return m;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOEFUSE_AVX512_BAND 1
// The same with AVX-512: 16 keys per step, the inside ones packed by vpcompressd (register form;
// its memory form is slow on AMD Zen 4).
__attribute__((target("avx512f,popcnt"))) int64_t band_select_avx512(const int32_t* keys, int64_t len, int shift,
                                                                      Band band, int32_t* inside, int64_t* above,
                                                                      int64_t* below) {
  const __m512i lo = _mm512_set1_epi32(band.lo), hi = _mm512_set1_epi32(band.hi);
  const __m512i origin = _mm512_set1_epi32(band.lo << shift);
  const __m128i count = _mm_cvtsi32_si128(shift);
  int64_t m = 0, k = 0;
  for (; k + 16 <= len; k += 16) {
    const __m512i key = _mm512_loadu_si512(keys + k), bin = _mm512_sra_epi32(key, count);
    const __mmask16 over = _mm512_cmpgt_epi32_mask(bin, hi), under = _mm512_cmplt_epi32_mask(bin, lo);
    const __mmask16 in = __mmask16(~(over | under));
    *above += _mm_popcnt_u32(over);
    *below += _mm_popcnt_u32(under);
    _mm512_storeu_si512(inside + m, _mm512_maskz_compress_epi32(in, _mm512_sub_epi32(key, origin)));
    m += _mm_popcnt_u32(in);
  }
  return m + band_select_scalar(keys + k, len - k, shift, band, inside + m, above, below);
}
#endif

int64_t band_select(const int32_t* keys, int64_t len, int shift, Band band, int32_t* inside, int64_t* above,
                    int64_t* below) {
#ifdef MOEFUSE_AVX512_BAND
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return band_select_avx512(keys, len, shift, band, inside, above, below);
#endif
  return band_select_scalar(keys, len, shift, band, inside, above, below);
}

// Adds the keys of keys[0, len) whose bin lies in the band to counts[(key - (band.lo << shift))
// >> index_shift] one by one (a serial chain of loads and stores, about 0.9 ns per key on a
// 2-core AMD EPYC, which is why only the keys inside narrow bands take it); also adds the
// numbers of keys above and below the band. Returns how many keys are inside.
template <typename C>
inline int64_t count_band(const int32_t* keys, int64_t len, int shift, Band band, int index_shift, C* counts,
                          int64_t* above, int64_t* below) {
  int32_t inside[TILE + 16];
  const int64_t m = band_select(keys, len, shift, band, inside, above, below);
  for (int64_t k = 0; k < m; ++k) ++counts[inside[k] >> index_shift];
  return m;
}

// Adds the entries of x - b over [0, len) to h, binned by key >> shift: in every bin, or in the
// bands' bins and the lumps around them (Bands).
template <typename T>
MOEFUSE_SIMD_CLONES void histogram_tile(const T* x, const T* b, int64_t len, int shift, const Bands& bands,
                                        int32_t* h) {
  int32_t keys[TILE];
  load_keys(x, b, len, keys);
  if (bands.empty()) {
    for (int64_t k = 0; k < len; ++k) ++h[keys[k] >> shift];
    return;
  }
  int64_t counted_below = 0, above = 0;  // keys below the current band already counted
  for (size_t t = 0; t < bands.size(); ++t) {
    int64_t below = 0;
    above = 0;
    const int64_t inside = count_band(keys, len, shift, bands[t], shift, h + bands[t].lo, &above, &below);
    const int32_t lump = t == 0 ? bands[0].lo - 1 : bands[t - 1].hi + 1;
    if (below > counted_below) h[lump] += int32_t(below - counted_below);
    counted_below = below + inside;
  }
  if (above) h[bands.back().hi + 1] += int32_t(above);
}

template <typename T>
MOEFUSE_SIMD_CLONES int64_t key_count_tile(const T* x, const T* b, int64_t len, int32_t key) {
  int32_t keys[TILE];
  load_keys(x, b, len, keys);
  int32_t count = 0;
  for (int64_t k = 0; k < len; ++k) count += keys[k] == key;
  return count;
}

// Where a tile's random keep decisions (bit k of byte k / 8) come from or go: `cached` replays
// the decisions an earlier pass recorded instead of drawing them again; `record` keeps a copy.
struct RandomKeeps {
  const uint8_t* cached = nullptr;
  uint8_t* record = nullptr;
};

// BYTE_BITS[v]: the 8 bits of v as 8 bytes of 0 or 1, bit 0 in the first (lowest) byte.
struct ByteBits {
  uint64_t spread[256];
  constexpr ByteBits() : spread() {
    for (int v = 0; v < 256; ++v)
      for (int bit = 0; bit < 8; ++bit) spread[v] |= uint64_t((v >> bit) & 1) << (8 * bit);
  }
};
constexpr ByteBits BYTE_BITS;

// keep[k] = draw(seed, start + k, stream) < threshold for k < len (or replayed from bits.cached).
// keep has room for len rounded up to a multiple of 8.
__attribute__((always_inline)) inline void random_keeps(uint64_t seed, int64_t start, int64_t len, uint32_t stream,
                                                        uint32_t threshold, const RandomKeeps& bits, uint8_t* keep) {
  if (bits.cached) {
    static_assert(sizeof(BYTE_BITS.spread[0]) == 8 && TILE % 8 == 0, "8 keep bytes per cached byte");
    for (int64_t byte = 0; byte < (len + 7) / 8; ++byte) {
      std::memcpy(keep + 8 * byte, &BYTE_BITS.spread[bits.cached[byte]], 8);
    }
    return;
  }
  uint32_t draws[TILE];
  draw_tile(seed, start, len, stream, draws);
  for (int64_t k = 0; k < len; ++k) keep[k] = draws[k] < threshold;
  if (bits.record) {
    const int64_t bytes = (len + 7) / 8;
    std::fill(keep + len, keep + 8 * bytes, uint8_t(0));
    for (int64_t byte = 0; byte < bytes; ++byte) {
      uint64_t eight;  // keep[8 byte + i] in byte i; the product gathers bit 0 of each byte into the top byte
      std::memcpy(&eight, keep + 8 * byte, 8);
      bits.record[byte] = uint8_t((eight * 0x0102040810204080ull) >> 56);
    }
  }
}

// One model's part of a fused tile: d[k] = c * delta_k where the rule keeps entry k (else 0),
// total[k] += d[k]; returns the number of NaN/Inf entries of x. One loop, no intermediate buffers.
// kUncut: neither rank cut falls inside the tile (TileBound::uncut).
template <typename T, bool kRanks, bool kUncut, bool kRandom>
__attribute__((always_inline)) inline int32_t kept_contributions(const T* x, const T* b, int64_t start, int64_t len,
                                                                 const TileBound& hi, const TileBound& lo,
                                                                 const Rule& rule, uint64_t seed, uint32_t stream,
                                                                 const RandomKeeps& bits, float c,
                                                                 float* __restrict__ d, float* __restrict__ total) {
  uint8_t random_keep[kRandom ? TILE : 1];
  if (kRandom) {
    random_keeps(seed, start, len, stream, static_cast<uint32_t>(rule.random_threshold), bits, random_keep);
  }
  int32_t bad = 0;
  for (int32_t k = 0; k < len; ++k) {
    int32_t key;
    bad += !std::isfinite(Elem<T>::value(x[k]));
    const float delta = Elem<T>::delta(x[k], b[k], &key);
    bool keep = !kRanks || (hi.above<kUncut>(key, k) & !lo.above<kUncut>(key, k));
    if (kRandom) keep &= random_keep[k] != 0;
    d[k] = keep ? delta * c : 0.f;
    total[k] += d[k];
  }
  return bad;
}

// kept_contributions for `rule` over one tile, instantiated for its kind (called directly, so that
// each call is inlined into the caller's AVX-512/AVX2 clone).
template <typename T, bool kRandom>
__attribute__((always_inline)) inline int32_t add_ranked(const T* x, const T* b, int64_t start, int64_t len,
                                                         const Rule& rule, uint64_t seed, uint32_t stream,
                                                         const RandomKeeps& bits, float c, float* __restrict__ d,
                                                         float* __restrict__ total) {
  const TileBound hi(rule.t_hi, rule.cut_hi, start, len), lo(rule.t_lo, rule.cut_lo, start, len);
  if (hi.uncut && lo.uncut) {
    return kept_contributions<T, true, true, kRandom>(x, b, start, len, hi, lo, rule, seed, stream, bits, c, d, total);
  }
  return kept_contributions<T, true, false, kRandom>(x, b, start, len, hi, lo, rule, seed, stream, bits, c, d, total);
}

template <typename T>
__attribute__((always_inline)) inline int32_t add_kept(const T* x, const T* b, int64_t start, int64_t len,
                                                       const Rule& rule, uint64_t seed, uint32_t stream,
                                                       const RandomKeeps& bits, float c, float* __restrict__ d,
                                                       float* __restrict__ total) {
  if (rule.keeps_all()) {
    const TileBound none(-1, 0, start, len);
    return kept_contributions<T, false, true, false>(x, b, start, len, none, none, rule, seed, stream, bits, c, d,
                                                     total);
  }
  if (rule.random_threshold < ALWAYS) {
    return add_ranked<T, true>(x, b, start, len, rule, seed, stream, bits, c, d, total);
  }
  return add_ranked<T, false>(x, b, start, len, rule, seed, stream, bits, c, d, total);
}

// sum_{k < len} term(k) in LANES partial sums (one running sum would be a serial chain of adds,
// which GCC does not vectorize without reassociating floats).
template <typename Term>
__attribute__((always_inline)) inline double lane_sum(int64_t len, Term term) {
  constexpr int64_t LANES = 16;
  float part[LANES] = {};
  int64_t k0 = 0;
  for (; k0 + LANES <= len; k0 += LANES) {
    for (int64_t l = 0; l < LANES; ++l) part[l] += term(k0 + l);
  }
  for (int64_t l = 0; k0 + l < len; ++l) part[l] += term(k0 + l);
  double sum = 0.0;
  for (int64_t l = 0; l < LANES; ++l) sum += part[l];
  return sum;
}

// Adds sum |d| and sum |kept d| over the tile of model `stream` (flat indices start..) to sums.
template <typename T>
MOEFUSE_SIMD_CLONES void l1_tile(const T* x, const T* b, int64_t start, int64_t len, const Rule& rule,
                                 uint64_t seed, uint32_t stream, const RandomKeeps& bits, double* sums) {
  float d[TILE], kept[TILE];
  std::fill(kept, kept + len, 0.f);
  add_kept(x, b, start, len, rule, seed, stream, bits, 1.f, d, kept);
  sums[0] += lane_sum(len, [&](int64_t k) {
    int32_t key;
    return std::fabs(Elem<T>::delta(x[k], b[k], &key));
  });
  sums[1] += lane_sum(len, [&](int64_t k) { return std::fabs(kept[k]); });
}

struct FusedSpec {
  std::vector<Rule> rules;
  std::vector<float> coefficients, weights;
  uint64_t seed;
  bool consensus, normalize;
  float weight_sum, lam;
};

// One tile of the fused GTA pass (flat indices start..): reads the base and every input once,
// writes o once and adds the NaN/Inf counts (base, then inputs) to bad. scratch: (m + 3) TILE floats.
template <typename in_t, typename out_t>
MOEFUSE_SIMD_CLONES void fused_tile(const FusedSpec& spec, const in_t* b, const in_t* const* xs,
                                    const RandomKeeps* bits, out_t* o, int64_t start, int64_t len, float* scratch,
                                    int64_t* bad) {
  const int64_t m = spec.rules.size();
  float* __restrict__ contrib = scratch;            // [m][TILE]: D_i = c_i * kept delta_i
  float* __restrict__ total = contrib + m * TILE;   // S = sum_i D_i, then the merged delta
  float* __restrict__ merged = total + TILE;        // M over agreeing entries
  float* __restrict__ agreed_weight = merged + TILE;  // W over agreeing entries
  std::fill(total, total + len, 0.f);
  bad[0] += count_bad(b, len);
  for (int64_t i = 0; i < m; ++i) {
    bad[i + 1] += add_kept(xs[i], b, start, len, spec.rules[i], spec.seed, uint32_t(i), bits[i],
                           spec.coefficients[i], contrib + i * TILE, total);
  }
  if (spec.consensus) {
    std::fill(merged, merged + len, 0.f);
    std::fill(agreed_weight, agreed_weight + len, 0.f);
    for (int64_t k = 0; k < len; ++k) total[k] = total[k] >= 0.f ? 1.f : -1.f;  // majority sign
    for (int64_t i = 0; i < m; ++i) {
      const float* __restrict__ d = contrib + i * TILE;
      const float weight = spec.weights[i];
      for (int64_t k = 0; k < len; ++k) {
        const float agree = static_cast<float>(d[k] * total[k] > 0.f);
        merged[k] += d[k] * agree;
        agreed_weight[k] += weight * agree;
      }
    }
    for (int64_t k = 0; k < len; ++k) {
      const float divisor = agreed_weight[k] == 0.f ? 1.f : agreed_weight[k];
      total[k] = spec.normalize ? merged[k] / divisor : merged[k];
    }
  } else if (spec.normalize) {
    for (int64_t k = 0; k < len; ++k) total[k] = total[k] / spec.weight_sum;
  }
  for (int64_t k = 0; k < len; ++k) o[k] = Elem<out_t>::cast(Elem<in_t>::value(b[k]) + total[k] * spec.lam);
}

template <typename in_t, typename out_t>
MOEFUSE_SIMD_CLONES void weighted_tile(const in_t* const* xs, const float* coefficients, int64_t m, int64_t len,
                                       out_t* o, int64_t* bad) {
  float acc[TILE];
  std::fill(acc, acc + len, 0.f);
  for (int64_t i = 0; i < m; ++i) {
    bad[i] += count_bad(xs[i], len);
    for (int64_t k = 0; k < len; ++k) acc[k] += Elem<in_t>::value(xs[i][k]) * coefficients[i];
  }
  for (int64_t k = 0; k < len; ++k) o[k] = Elem<out_t>::cast(acc[k]);
}

// Adds the tile's dot products <T_i - b, T_j - b> (i <= j; without b when b is null) to acc [m, m].
template <typename T>
MOEFUSE_SIMD_CLONES void gram_tile(const T* const* xs, const T* b, int64_t m, int64_t len, float* tile,
                                   double* acc) {
  for (int64_t i = 0; i < m; ++i) {
    float* __restrict__ row = tile + i * TILE;
    int32_t keys[TILE];
    if (b) {
      load_deltas(xs[i], b, len, row, keys);
    } else {
      for (int64_t k = 0; k < len; ++k) row[k] = Elem<T>::value(xs[i][k]);
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = i; j < m; ++j) {
      const float* __restrict__ ti = tile + i * TILE;
      const float* __restrict__ tj = tile + j * TILE;
      acc[i * m + j] += lane_sum(len, [&](int64_t k) { return ti[k] * tj[k]; });
    }
  }
}

// Model Stock's interpolation factor from the upper triangle of a Gram matrix g [m, m] of task
// vectors (moefuse.ops.merge_reference.model_stock_t): cos is the mean over pairs a < b of
// clamp(g_ab / max(|d_a| |d_b|, 1e-6), -1, 1), t = m cos / (1 + (m - 1) cos), 0 where the
// denominator is below 1e-6 in magnitude. NaN propagates (the comparisons below keep it).
double model_stock_factor(const double* g, int64_t m) {
  double sum = 0.0;
  for (int64_t a = 0; a < m; ++a) {
    for (int64_t b = a + 1; b < m; ++b) {
      double norms = std::sqrt(g[a * m + a]) * std::sqrt(g[b * m + b]);
      norms = norms < 1e-6 ? 1e-6 : norms;
      const double cos = g[a * m + b] / norms;
      sum += cos < -1.0 ? -1.0 : (cos > 1.0 ? 1.0 : cos);
    }
  }
  const double cos = sum / double(m * (m - 1) / 2);
  const double denominator = 1.0 + double(m - 1) * cos;
  return std::fabs(denominator) < 1e-6 ? 0.0 : double(m) * cos / denominator;
}

// ranks[c] = the ascending rank of (keys[c], c) among keys[0, len): an LSD radix sort of the words
// (key << INDEX_BITS) | c by the key's 8-bit digits only (the column order they start in breaks
// ties), with every digit counted in one pass and digits that are the same everywhere skipped.
// Keys must fit in the word's upper bits and columns in INDEX_BITS; `words` and `spare` hold len.
template <typename Word, int INDEX_BITS>
void sorted_ranks(const int32_t* keys, int64_t len, Word* words, Word* spare, uint32_t* ranks) {
  constexpr int DIGITS = (8 * int(sizeof(Word)) - INDEX_BITS) / 8;
  int64_t counts[DIGITS][257] = {};
  for (int64_t c = 0; c < len; ++c) {
    const Word word = (Word(uint32_t(keys[c])) << INDEX_BITS) | Word(c);
    words[c] = word;
    for (int d = 0; d < DIGITS; ++d) ++counts[d][((word >> (INDEX_BITS + 8 * d)) & 0xFF) + 1];
  }
  for (int d = 0; d < DIGITS; ++d) {
    int64_t* count = counts[d];
    if (*std::max_element(count + 1, count + 257) == len) continue;
    for (int v = 0; v < 256; ++v) count[v + 1] += count[v];
    const int shift = INDEX_BITS + 8 * d;
    for (int64_t c = 0; c < len; ++c) spare[count[(words[c] >> shift) & 0xFF]++] = words[c];
    std::swap(words, spare);
  }
  constexpr Word INDEX_MASK = (Word(1) << INDEX_BITS) - 1;
  for (int64_t r = 0; r < len; ++r) ranks[words[r] & INDEX_MASK] = uint32_t(r);
}

}  // namespace

std::vector<int64_t> count_nonfinite(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> counts;
  for (const auto& tensor : tensors) {
    auto t = tensor.contiguous();
    std::vector<int64_t> local(at::get_num_threads(), 0);
    MOEFUSE_DISPATCH_FLOAT(t.scalar_type(), "count_nonfinite", [&] {
      const scalar_t* p = t.data_ptr<scalar_t>();
      for_tiles(t.numel(), [&](int64_t thread, int64_t s, int64_t e) { local[thread] += nonfinite_tile(p + s, e - s); });
    });
    int64_t total = 0;
    for (auto c : local) total += c;
    counts.push_back(total);
  }
  return counts;
}

// Bands from their flat form (lo0, hi0, lo1, hi1, ... per input), checked; one band of every
// bin becomes the empty list (count every bin directly).
std::vector<Bands> read_bands(const std::vector<std::vector<int64_t>>& flat, size_t inputs) {
  TORCH_CHECK(flat.empty() || flat.size() == inputs, "give the bands of every input, or none");
  std::vector<Bands> out(inputs);
  for (size_t i = 0; i < flat.size(); ++i) {
    TORCH_CHECK(!flat[i].empty() && flat[i].size() % 2 == 0, "give each input's bands as (lo, hi) pairs, at least one");
    for (size_t j = 0; j < flat[i].size(); j += 2) {
      const int64_t lo = flat[i][j], hi = flat[i][j + 1];
      TORCH_CHECK(0 <= lo && lo <= hi && hi < LEVEL1_BINS, "band bins must satisfy 0 <= lo <= hi < 32768");
      TORCH_CHECK(j == 0 || lo > out[i].back().hi + 1, "bands must ascend with at least one bin between two");
      out[i].push_back(Band{int32_t(lo), int32_t(hi)});
    }
    if (out[i].size() == 1 && out[i][0].everything()) out[i].clear();
  }
  return out;
}

at::Tensor histogram_level1(const at::Tensor& base, const std::vector<at::Tensor>& inputs, int64_t shift,
                            int64_t size, const std::vector<std::vector<int64_t>>& flat_bands) {
  check_same(base, inputs);
  TORCH_CHECK(size > 0, "range size must be positive");
  const std::vector<Bands> bands = read_bands(flat_bands, inputs.size());
  const int64_t rows = inputs.size(), n = base.numel(), ranges = std::max<int64_t>(1, (n + size - 1) / size);
  const int64_t tiles_per_range = (size + TILE - 1) / TILE;  // tiles never straddle two ranges
  // Each thread counts into its own histograms (zeroed on first use), summed at the end; a
  // contiguous block of tiles touches few ranges, so a thread's working set stays small.
  std::vector<std::vector<int32_t>> local(at::get_num_threads());
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "histogram_level1", [&] {
    const scalar_t* b = base.data_ptr<scalar_t>();
    auto xs = pointers<scalar_t>(inputs);
    at::parallel_for(0, ranges * tiles_per_range, 64, [&](int64_t t0, int64_t t1) {
      auto& h = local[at::get_thread_num()];
      if (h.empty()) h.assign(rows * ranges * LEVEL1_BINS, 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / tiles_per_range, s = r * size + (t % tiles_per_range) * TILE;
        const int64_t len = std::min({TILE, n - s, (r + 1) * size - s});
        if (len <= 0) continue;
        for (int64_t i = 0; i < rows; ++i) {
          histogram_tile(xs[i] + s, b + s, len, int(shift), bands[i], h.data() + (i * ranges + r) * LEVEL1_BINS);
        }
      }
    });
  });
  return sum_per_thread(local, {rows, ranges, LEVEL1_BINS});
}

at::Tensor histogram_level2(const at::Tensor& base, const std::vector<at::Tensor>& inputs,
                            const std::vector<int64_t>& prefixes) {
  check_same(base, inputs);
  TORCH_CHECK(base.scalar_type() == at::kFloat, "histogram_level2 is for float32 tensors");
  TORCH_CHECK(prefixes.size() == inputs.size(), "give one prefix per input");
  for (auto prefix : prefixes) TORCH_CHECK(0 <= prefix && prefix < LEVEL1_BINS, "prefixes are level-1 bins, 0 <= prefix < 32768");
  const int64_t rows = inputs.size(), n = base.numel();
  std::vector<std::vector<int64_t>> local(at::get_num_threads(), std::vector<int64_t>(rows * LEVEL2_BINS, 0));
  const float* b = base.data_ptr<float>();
  auto xs = pointers<float>(inputs);
  for_tiles(n, [&](int64_t thread, int64_t s, int64_t e) {
    int32_t keys[TILE];
    int64_t outside = 0;
    for (int64_t r = 0; r < rows; ++r) {
      keys_tile(xs[r] + s, b + s, e - s, keys);
      const Band prefix{int32_t(prefixes[r]), int32_t(prefixes[r])};  // keys of that prefix: their low 16 bits
      count_band(keys, e - s, 16, prefix, 0, local[thread].data() + r * LEVEL2_BINS, &outside, &outside);
    }
  });
  return sum_per_thread(local, {rows, LEVEL2_BINS});
}

at::Tensor chunk_counts(const at::Tensor& base, const std::vector<at::Tensor>& inputs,
                        const std::vector<int64_t>& keys, int64_t chunk) {
  check_same(base, inputs);
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t q = inputs.size(), n = base.numel(), chunks = (n + chunk - 1) / chunk;
  auto out = at::zeros({q, chunks}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "chunk_counts", [&] {
    const scalar_t* b = base.data_ptr<scalar_t>();
    auto xs = pointers<scalar_t>(inputs);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t s = c * chunk, e = std::min(n, s + chunk);
        for (int64_t r = 0; r < q; ++r) {
          int64_t count = 0;
          for (int64_t t = s; t < e; t += TILE) {
            count += key_count_tile(xs[r] + t, b + t, std::min(TILE, e - t), int32_t(keys[r]));
          }
          o[r * chunks + c] = count;
        }
      }
    });
  });
  return out;
}

std::tuple<int64_t, int64_t> nth_key_index(const at::Tensor& base, const at::Tensor& x, int64_t key, int64_t left) {
  check_same(base, {x});
  TORCH_CHECK(0 <= key && key <= INT32_MAX && left >= 0, "key must be a magnitude key and left non-negative");
  const int64_t n = base.numel();
  int64_t index = -1, found = 0;
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "nth_key_index", [&] {
    const scalar_t* b = base.data_ptr<scalar_t>();
    const scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t s = 0; s < n && index < 0; s += TILE) {
      const int64_t len = std::min(TILE, n - s);
      const int64_t count = key_count_tile(p + s, b + s, len, int32_t(key));
      if (found + count <= left) {
        found += count;
        continue;
      }
      int32_t keys[TILE];
      keys_tile(p + s, b + s, len, keys);
      for (int64_t k = 0; k < len && index < 0; ++k) {
        if (keys[k] == key && found++ == left) index = s + k;
      }
    }
  });
  return {index, found};
}

std::tuple<at::Tensor, at::Tensor> l1_norms(const at::Tensor& base, const std::vector<at::Tensor>& inputs,
                                            const at::Tensor& rules_tensor, int64_t seed, int64_t offset,
                                            const std::vector<at::Tensor>& keeps, bool replay) {
  check_same(base, inputs);
  const auto rules = read_rules(rules_tensor);
  const int64_t m = inputs.size(), n = base.numel();
  const auto buffers = keep_bit_buffers(keeps, m, n);
  std::vector<std::vector<double>> local(at::get_num_threads(), std::vector<double>(2 * m, 0.0));
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "l1_norms", [&] {
    const scalar_t* b = base.data_ptr<scalar_t>();
    auto xs = pointers<scalar_t>(inputs);
    for_tiles(n, [&](int64_t thread, int64_t s, int64_t e) {
      for (int64_t i = 0; i < m; ++i) {
        uint8_t* const tile_bits = buffers.empty() ? nullptr : buffers[i] + s / 8;
        const RandomKeeps bits{replay ? tile_bits : nullptr, replay ? nullptr : tile_bits};
        l1_tile(xs[i] + s, b + s, offset + s, e - s, rules[i], uint64_t(seed), uint32_t(i), bits, &local[thread][2 * i]);
      }
    });
  });
  const auto sums = sum_per_thread(local, {m, 2});
  return {sums.select(1, 0).contiguous(), sums.select(1, 1).contiguous()};
}

std::tuple<at::Tensor, std::vector<int64_t>> fused_gta(
    const at::Tensor& base, const std::vector<at::Tensor>& inputs, const at::Tensor& rules_tensor, int64_t seed,
    const std::vector<double>& coefficients, const std::vector<double>& weights, bool consensus, bool normalize,
    double weight_sum, double lam, at::ScalarType out_dtype, int64_t offset,
    const std::vector<at::Tensor>& cached_keeps, const c10::optional<at::Tensor>& given_out) {
  check_same(base, inputs);
  const int64_t m = inputs.size(), n = base.numel();
  const auto cached = keep_bit_buffers(cached_keeps, m, n);
  TORCH_CHECK(int64_t(coefficients.size()) == m && int64_t(weights.size()) == m, "one coefficient per input");
  const FusedSpec spec{read_rules(rules_tensor),
                       std::vector<float>(coefficients.begin(), coefficients.end()),
                       std::vector<float>(weights.begin(), weights.end()),
                       uint64_t(seed), consensus, normalize,
                       static_cast<float>(weight_sum), static_cast<float>(lam)};
  auto out = output_for(base, out_dtype, given_out);
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> bad(threads, std::vector<int64_t>(m + 1, 0));  // base, then inputs
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "fused_gta", [&] {
    using in_t = scalar_t;
    const in_t* b = base.data_ptr<in_t>();
    auto xs = pointers<in_t>(inputs);
    MOEFUSE_DISPATCH_FLOAT(out_dtype, "fused_gta_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      std::vector<std::vector<float>> scratch(threads, std::vector<float>((m + 3) * TILE));
      std::vector<std::vector<const in_t*>> tile_inputs(threads, std::vector<const in_t*>(m));
      std::vector<std::vector<RandomKeeps>> tile_keeps(threads, std::vector<RandomKeeps>(m));
      for_tiles(n, [&](int64_t thread, int64_t s, int64_t e) {
        for (int64_t i = 0; i < m; ++i) {
          tile_inputs[thread][i] = xs[i] + s;
          if (!cached.empty()) tile_keeps[thread][i].cached = cached[i] + s / 8;
        }
        fused_tile(spec, b + s, tile_inputs[thread].data(), tile_keeps[thread].data(), o + s, offset + s, e - s,
                   scratch[thread].data(), bad[thread].data());
      });
    });
  });
  return {out, sum_per_thread(bad)};
}

std::tuple<at::Tensor, std::vector<int64_t>> weighted_sum(const std::vector<at::Tensor>& tensors,
                                                          const std::vector<double>& coefficients,
                                                          at::ScalarType out_dtype,
                                                          const c10::optional<at::Tensor>& given_out) {
  TORCH_CHECK(!tensors.empty() && tensors.size() == coefficients.size(), "one coefficient per tensor");
  check_same(tensors[0], tensors);
  const int64_t n = tensors[0].numel(), m = tensors.size();
  std::vector<float> coeff(coefficients.begin(), coefficients.end());
  auto out = output_for(tensors[0], out_dtype, given_out);
  std::vector<std::vector<int64_t>> bad(at::get_num_threads(), std::vector<int64_t>(m, 0));
  MOEFUSE_DISPATCH_FLOAT(tensors[0].scalar_type(), "weighted_sum", [&] {
    using in_t = scalar_t;
    auto xs = pointers<in_t>(tensors);
    MOEFUSE_DISPATCH_FLOAT(out_dtype, "weighted_sum_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      std::vector<std::vector<const in_t*>> tile_inputs(at::get_num_threads(), std::vector<const in_t*>(m));
      for_tiles(n, [&](int64_t thread, int64_t s, int64_t e) {
        for (int64_t i = 0; i < m; ++i) tile_inputs[thread][i] = xs[i] + s;
        weighted_tile(tile_inputs[thread].data(), coeff.data(), m, e - s, o + s, bad[thread].data());
      });
    });
  });
  return {out, sum_per_thread(bad)};
}

at::Tensor della_keep(const at::Tensor& base, const at::Tensor& x, const at::Tensor& probability, int64_t seed,
                      int64_t stream, int64_t offset) {
  check_same(base, {x});
  TORCH_CHECK(probability.dtype() == at::kDouble && probability.dim() == 1 && probability.numel() > 0,
              "probability must be a float64 vector with one entry per rank");
  const int64_t len = probability.numel(), n = base.numel();
  TORCH_CHECK(n % len == 0, "the tensor must hold whole rows of ", len, " entries");
  const auto table = probability.contiguous();
  const double* p = table.data_ptr<double>();
  auto keep = at::zeros({(n + 7) / 8}, base.options().dtype(at::kByte));
  uint8_t* out = keep.data_ptr<uint8_t>();
  // Threads take groups of rows that start on a byte of `out`, so no byte is shared by two threads.
  const int64_t rows = n / len, group = 8 / std::gcd(len, int64_t(8));
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "della_keep", [&] {
    const scalar_t* b = base.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, (rows + group - 1) / group, 1, [&](int64_t g0, int64_t g1) {
      std::vector<int32_t> keys(len);
      std::vector<uint32_t> ranks(len), bits(TILE);
      // 16-bit dtypes have 15-bit keys: (key, column) fits 32 bits for rows of up to 2^16.
      const bool narrow = sizeof(scalar_t) == 2 && len <= (int64_t(1) << 16);
      std::vector<uint32_t> narrow_words(narrow ? 2 * len : 0);
      std::vector<uint64_t> wide_words(narrow ? 0 : 2 * len);
      for (int64_t r = g0 * group; r < std::min(rows, g1 * group); ++r) {
        const int64_t row = r * len;
        for (int64_t s = 0; s < len; s += TILE) {
          keys_tile(xp + row + s, b + row + s, std::min(TILE, len - s), keys.data() + s);
        }
        if (narrow) {
          sorted_ranks<uint32_t, 16>(keys.data(), len, narrow_words.data(), narrow_words.data() + len, ranks.data());
        } else {
          sorted_ranks<uint64_t, 32>(keys.data(), len, wide_words.data(), wide_words.data() + len, ranks.data());
        }
        for (int64_t s = 0; s < len; s += TILE) {
          const int64_t t = std::min(TILE, len - s);
          draw_tile(uint64_t(seed), offset + row + s, t, uint32_t(stream), bits.data());
          for (int64_t k = 0, j = row + s; k < t; ++k, ++j) {
            const bool kept = double(bits[k] >> 8) * 0x1p-24 < p[ranks[s + k]];
            out[j >> 3] |= uint8_t(kept) << (j & 7);
          }
        }
      }
    });
  });
  return keep;
}

at::Tensor gram(const std::vector<at::Tensor>& tensors, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK(!tensors.empty(), "gram needs at least one tensor");
  const at::Tensor& first = base.has_value() ? *base : tensors[0];
  check_same(first, tensors);
  const int64_t n = first.numel(), m = tensors.size(), threads = at::get_num_threads();
  std::vector<std::vector<double>> local(threads, std::vector<double>(m * m, 0.0));
  MOEFUSE_DISPATCH_FLOAT(first.scalar_type(), "gram", [&] {
    auto xs = pointers<scalar_t>(tensors);
    const scalar_t* b = base.has_value() ? base->data_ptr<scalar_t>() : nullptr;
    std::vector<std::vector<float>> scratch(threads, std::vector<float>(m * TILE));
    std::vector<std::vector<const scalar_t*>> tile_inputs(threads, std::vector<const scalar_t*>(m));
    for_tiles(n, [&](int64_t thread, int64_t s, int64_t e) {
      for (int64_t i = 0; i < m; ++i) tile_inputs[thread][i] = xs[i] + s;
      gram_tile(tile_inputs[thread].data(), b ? b + s : nullptr, m, e - s, scratch[thread].data(), local[thread].data());
    });
  });
  auto out = sum_per_thread(local, {m, m});  // upper triangle
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < i; ++j) o[i * m + j] = o[j * m + i];
  return out;
}

std::tuple<at::Tensor, std::vector<int64_t>> model_stock_rows(const at::Tensor& base,
                                                              const std::vector<at::Tensor>& inputs,
                                                              int64_t row_length, at::ScalarType out_dtype,
                                                              const c10::optional<at::Tensor>& given_out) {
  check_same(base, inputs);
  const int64_t m = inputs.size(), n = base.numel();
  TORCH_CHECK(m >= 2, "Model Stock needs at least two inputs besides the base");
  TORCH_CHECK(row_length > 0 ? n % row_length == 0 : n == 0, "the tensor must hold whole rows of ", row_length,
              " entries");
  const int64_t rows = row_length > 0 ? n / row_length : 0, threads = at::get_num_threads();
  auto out = output_for(base, out_dtype, given_out);
  std::vector<std::vector<int64_t>> bad(threads, std::vector<int64_t>(m + 1, 0));  // base, then inputs
  MOEFUSE_DISPATCH_FLOAT(base.scalar_type(), "model_stock_rows", [&] {
    using in_t = scalar_t;
    const in_t* b = base.data_ptr<in_t>();
    auto xs = pointers<in_t>(inputs);
    MOEFUSE_DISPATCH_FLOAT(out_dtype, "model_stock_rows_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      // Enough rows per task that a task is worth scheduling (about 16 tiles).
      at::parallel_for(0, rows, std::max<int64_t>(1, 16 * TILE / row_length), [&](int64_t r0, int64_t r1) {
        std::vector<float> scratch(m * TILE);
        std::vector<double> gram(m * m);
        std::vector<float> coefficients32(m + 1);
        std::vector<const in_t*> tile_inputs(m + 1);  // the base, then the inputs
        int64_t* const thread_bad = bad[at::get_thread_num()].data();
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t row = r * row_length;
          std::fill(gram.begin(), gram.end(), 0.0);
          for (int64_t s = row; s < row + row_length; s += TILE) {
            for (int64_t i = 0; i < m; ++i) tile_inputs[i + 1] = xs[i] + s;
            gram_tile(tile_inputs.data() + 1, b + s, m, std::min(TILE, row + row_length - s), scratch.data(),
                      gram.data());
          }
          const float t = static_cast<float>(model_stock_factor(gram.data(), m));
          coefficients32[0] = 1.f - t;
          std::fill(coefficients32.begin() + 1, coefficients32.end(), t / float(m));
          for (int64_t s = row; s < row + row_length; s += TILE) {
            tile_inputs[0] = b + s;
            for (int64_t i = 0; i < m; ++i) tile_inputs[i + 1] = xs[i] + s;
            weighted_tile(tile_inputs.data(), coefficients32.data(), m + 1, std::min(TILE, row + row_length - s),
                          o + s, thread_bad);
          }
        }
      });
    });
  });
  return {out, sum_per_thread(bad)};
}

}  // namespace moefuse
