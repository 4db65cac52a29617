// SwiGLU experts straight from their stored bytes: fp16 weights and HQQ-planar int4 codes multiplied
// by fp32 activations with fp32 accumulation, without expanding the weights first.
//
// Why by hand: PyTorch's CPU path for an fp16 weight is "upcast the matrix to fp32, then GEMV",
// which moves 5x the weight's bytes per decoded token (read fp16, write fp32, read fp32) and made
// fp16 expert compute the largest cost of an offloaded decode step; its int4 kernel wants bf16
// activations and its own packing. A decode step is a GEMV per matrix, bound by the bytes of the
// weight, so reading each weight once in its stored precision is the whole optimization.
// The math is exactly the reference's (w = fp16 value, or (q - zero) * scale for int4; fp32 sums),
// only the summation order differs.
//
// The same holds for the resident (non-expert) weights of a bf16 checkpoint: bf16 -> fp32 is exact (the
// upper 16 bits), so `edgeopt_linear_bf16` gives the fp32 model's results from half its bytes.
//
// C ABI (loaded with ctypes by edgeopt/moe/kernels.py). Shapes: x (M, H) fp32; gate_up (2I, H),
// down (H, I), gate rows first; y (M, H) fp32; tmp (M, 2I) fp32 scratch. int4 matrices: codes
// (rows, in / group, group / 2) uint8, the first half of a group's codes in the low nibbles and the
// second half in the high nibbles; scale, zero (rows, in / group) fp16.

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__aarch64__)
typedef __fp16 half_t;
#define EDGEOPT_NATIVE_HALF 1
#elif defined(__FLT16_MAX__)
typedef _Float16 half_t;
#define EDGEOPT_NATIVE_HALF 1
#else
typedef uint16_t half_t;
#define EDGEOPT_NATIVE_HALF 0
#endif

namespace {

inline float to_float(half_t h) {
#if EDGEOPT_NATIVE_HALF
  return static_cast<float>(h);
#else  // IEEE binary16 -> binary32 by bits (compilers without a half type)
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man) {  // subnormal: normalize
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    bits = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  } else {
    bits = sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

constexpr int64_t LANES = 64;  // independent partial sums: hides FMA latency, vectorizes to 4 zmm / 16 q-regs

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
inline float hsum256(__m256 a) {  // sum of the 8 lanes
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#endif

// <w_row, x> for an fp16 row of length K. x86 converts with F16C/AVX-512 explicitly: GCC 12 does not
// vectorize _Float16 -> float conversions (the plain loop ran 9x slower than the intrinsics).
inline float dot_f16(const half_t* w, const float* x, int64_t K) {
  int64_t k = 0;
  float s = 0;
#if defined(__AVX512F__)
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k))), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k + 16))), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k + 32))), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k + 48))), _mm512_loadu_ps(x + k + 48), a3);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__F16C__) && defined(__FMA__)
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k))), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k + 8))), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k + 16))), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k + 24))), _mm256_loadu_ps(x + k + 24), a3);
  }
  s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else  // aarch64 (__fp16 converts in NEON) and others: independent partial sums the compiler vectorizes
  float acc[LANES] = {0};
  for (; k + LANES <= K; k += LANES)
    for (int64_t j = 0; j < LANES; ++j) acc[j] += to_float(w[k + j]) * x[k + j];
  for (int64_t j = 0; j < LANES; ++j) s += acc[j];
#endif
  for (; k < K; ++k) s += to_float(w[k]) * x[k];
  return s;
}

// <dequantized int4 row, x>: per group, scale * (sum_i q_i x_i - zero * sum_i x_i)
inline float dot_q4(const uint8_t* codes, const half_t* scale, const half_t* zero, const float* x,
                    const float* xsum, int64_t groups, int64_t group) {
  const int64_t half = group / 2;
  float s = 0;
#if defined(__AVX512F__)
  if (half % 16 == 0) {  // per group, q . x in a vector, folded in with the group's scale (one reduce per row)
    const __m128i nibble = _mm_set1_epi8(15);
    __m512 total = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* c = codes + g * half;
      const float* lo = x + g * group;
      const float* hi = lo + half;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < half; i += 16) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i));
        __m512 ql = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, nibble)));
        __m512 qh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), nibble)));
        acc = _mm512_fmadd_ps(ql, _mm512_loadu_ps(lo + i), acc);
        acc = _mm512_fmadd_ps(qh, _mm512_loadu_ps(hi + i), acc);
      }
      const float sg = to_float(scale[g]);
      total = _mm512_fmadd_ps(_mm512_set1_ps(sg), acc, total);
      s -= sg * to_float(zero[g]) * xsum[g];
    }
    return s + _mm512_reduce_add_ps(total);
  }
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* c = codes + g * half;
    const float* lo = x + g * group;
    const float* hi = lo + half;
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= half; i += 16)
      for (int64_t j = 0; j < 16; ++j)
        acc[j] += static_cast<float>(c[i + j] & 15) * lo[i + j] + static_cast<float>(c[i + j] >> 4) * hi[i + j];
    float q = 0;
    for (; i < half; ++i) q += static_cast<float>(c[i] & 15) * lo[i] + static_cast<float>(c[i] >> 4) * hi[i];
    for (int64_t j = 0; j < 16; ++j) q += acc[j];
    s += to_float(scale[g]) * (q - to_float(zero[g]) * xsum[g]);
  }
  return s;
}

// <w_row, x> for a bf16 row: a bf16 value is the upper half of its fp32 bit pattern
inline float dot_bf16(const uint16_t* w, const float* x, int64_t K) {
  int64_t k = 0;
  float s = 0;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (; k + 32 <= K; k += 32) {
    __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))), 16));
    __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16))), 16));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; k + 16 <= K; k += 16) {
    __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))), 16));
    __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8))), 16));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
  }
  s = hsum256(_mm256_add_ps(a0, a1));
#endif
  for (; k < K; ++k) {
    uint32_t bits = static_cast<uint32_t>(w[k]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    s += f * x[k];
  }
  return s;
}

struct F16Matrix {
  const half_t* w;
  int64_t rows, cols;
  void apply(const float* x, float* y, int64_t M, int64_t y_stride, int64_t x_stride) const {
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t m = 0; m < M; ++m) y[m * y_stride + n] = dot_f16(w + n * cols, x + m * x_stride, cols);
  }
};

struct Q4Matrix {
  const uint8_t* codes;
  const half_t* scale;
  const half_t* zero;
  int64_t rows, cols, group;
  void apply(const float* x, float* y, int64_t M, int64_t y_stride, int64_t x_stride) const {
    const int64_t groups = cols / group;
    float xsum_stack[512];
    float* xsum = M * groups <= 512 ? xsum_stack : new float[M * groups];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0;
        for (int64_t i = 0; i < group; ++i) s += x[m * x_stride + g * group + i];
        xsum[m * groups + g] = s;
      }
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t m = 0; m < M; ++m)
        y[m * y_stride + n] = dot_q4(codes + n * (cols / 2), scale + n * groups, zero + n * groups,
                                     x + m * x_stride, xsum + m * groups, groups, group);
    if (xsum != xsum_stack) delete[] xsum;
  }
};

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// y = down(silu(gate(x)) * up(x)); tmp holds gate|up, then the activation in its first half
template <class Matrix>
void swiglu(const Matrix& gate_up, const Matrix& down, const float* x, float* y, float* tmp, int64_t M,
            int64_t H, int64_t I) {
  gate_up.apply(x, tmp, M, 2 * I, H);
  for (int64_t m = 0; m < M; ++m) {
    float* t = tmp + m * 2 * I;
    for (int64_t i = 0; i < I; ++i) t[i] = silu(t[i]) * t[I + i];
  }
  down.apply(tmp, y, M, H, 2 * I);
}

}  // namespace

extern "C" {

int edgeopt_moe_abi() { return 2; }

void edgeopt_swiglu_f16(const void* gate_up, const void* down, const float* x, float* y, float* tmp,
                        int64_t M, int64_t H, int64_t I) {
  swiglu(F16Matrix{static_cast<const half_t*>(gate_up), 2 * I, H}, F16Matrix{static_cast<const half_t*>(down), H, I},
         x, y, tmp, M, H, I);
}

// y (M, N) = x (M, K) W^T (+ bias): W (N, K) bf16, bias (N,) fp32 or null
void edgeopt_linear_bf16(const uint16_t* w, const float* bias, const float* x, float* y, int64_t M, int64_t N,
                         int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_bf16(w + n * K, x + m * K, K) + b;
  }
}

void edgeopt_swiglu_q4(const uint8_t* gu_codes, const void* gu_scale, const void* gu_zero, int64_t gu_group,
                       const uint8_t* d_codes, const void* d_scale, const void* d_zero, int64_t d_group,
                       const float* x, float* y, float* tmp, int64_t M, int64_t H, int64_t I) {
  Q4Matrix gu{gu_codes, static_cast<const half_t*>(gu_scale), static_cast<const half_t*>(gu_zero), 2 * I, H, gu_group};
  Q4Matrix d{d_codes, static_cast<const half_t*>(d_scale), static_cast<const half_t*>(d_zero), H, I, d_group};
  swiglu(gu, d, x, y, tmp, M, H, I);
}

}  // extern "C"
