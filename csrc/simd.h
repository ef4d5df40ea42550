// Function multiversioning for the dense loops: a function marked MOEFUSE_SIMD_CLONES is compiled
// for AVX-512 (x86-64-v4), AVX2 and the baseline ISA, and the best version the CPU runs is picked
// when the library loads (GCC).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOEFUSE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MOEFUSE_SIMD_CLONES
#endif
