// The instruction-set level this translation unit is compiled for. models/ops builds the kernels once per
// level, each with its own flags (never -march=native), and loads the best one the running CPU supports:
//   TOKENLOOM_AVX512  x86-64-v4 + AVX512_VNNI + AVX512_BF16 + AVX512_VBMI (Zen 4, Sapphire Rapids and later)
//   TOKENLOOM_AVX2    x86-64-v3: AVX2 + FMA + F16C (+ BMI2)
//   TOKENLOOM_NEON    aarch64 NEON with the dot-product extension (armv8.2-a+dotprod)
//   none of them      portable C++ (the compiler's baseline for the target)
// Exactly one of the three is defined, or none. Kernels test these macros, not the compiler's own ones,
// so a level is all or nothing.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define TOKENLOOM_AVX512 1
#define TOKENLOOM_ISA_NAME "avx512"
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TOKENLOOM_AVX2 1
#define TOKENLOOM_ISA_NAME "avx2"
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define TOKENLOOM_NEON 1
#define TOKENLOOM_ISA_NAME "neon"
#include <arm_neon.h>
#else
#define TOKENLOOM_ISA_NAME "portable"
#endif
