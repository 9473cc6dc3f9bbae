// AVX-512 VNNI kernels of vnni_matmul.h. Everything below the target pragma is compiled for
// AVX-512 VNNI and reached only after vnni_supported() said yes; it uses no library templates
// (an inline function instantiated here could be the copy the linker keeps for everyone).

#include "vnni_matmul.h"

bool herd::vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

void herd::int8_offsets(const float* scale, const int32_t* qsum, int64_t B, int64_t K, float* offset) {
  const int64_t G = K / kQuantGroup;
  for (int64_t b = 0; b < B; ++b) {
    float o = 0.f;
    for (int64_t g = 0; g < G; ++g) o += scale[b * G + g] * static_cast<float>(qsum[b * G + g]);
    offset[b] = 128.f * o;
  }
}

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")

namespace herd {
namespace {

inline __m512 bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// 16 (bf16 s, bf16 z) pairs -> s and z as floats: each 32-bit lane holds s low, z high.
inline void scale_zero_x16(const uint16_t* p, __m512& s, __m512& z) {
  const __m512i v = _mm512_loadu_si512(p);
  s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// 16 rows (block rb) of y for NB consecutive activation rows from b0.
template <int NB>
void int4_block(const int8_t* q, const float* scale, const float* sum, const int32_t* qsum, int64_t b0, int64_t K,
                const uint8_t* w, const uint16_t* sz, int64_t group, int64_t rb, int64_t N, float* y) {
  const int64_t G = K / kQuantGroup;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[NB];
  for (int t = 0; t < NB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + (rb * G + g) * 256;
    __m512i dot[NB];
    for (int t = 0; t < NB; ++t) dot[t] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(wg + 64 * c);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int t = 0; t < NB; ++t) {
        const int8_t* xt = q + (b0 + t) * K + g * kQuantGroup + 8 * c;
        dot[t] = _mm512_dpbusd_epi32(dot[t], lo, _mm512_set1_epi32(four_bytes(xt)));
        dot[t] = _mm512_dpbusd_epi32(dot[t], hi, _mm512_set1_epi32(four_bytes(xt + 4)));
      }
    }
    __m512 s, z;
    scale_zero_x16(sz + ((g * kQuantGroup / group) * N + rb * kRows) * 2, s, z);
    for (int t = 0; t < NB; ++t) {
      const int64_t i = (b0 + t) * G + g;
      const __m512i centred = _mm512_sub_epi32(dot[t], _mm512_set1_epi32(8 * qsum[i]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(s, _mm512_set1_ps(scale[i])), acc[t]);
      acc[t] = _mm512_fmadd_ps(z, _mm512_set1_ps(sum[i]), acc[t]);
    }
  }
  for (int t = 0; t < NB; ++t) _mm512_storeu_ps(y + (b0 + t) * N + rb * kRows, acc[t]);
}

// 16 rows (block rb) of y for NB activation rows from b0. vpdpbusd wants unsigned weights:
// w ^ 0x80 = w + 128, whose extra 128 * sum(x) the caller's offset takes back out.
template <int NB>
void int8_block(const int8_t* q, const float* scale, const float* offset, int64_t b0, int64_t K, const int8_t* w,
                const uint16_t* s, int64_t rb, int64_t N, float* y) {
  const int64_t G = K / kQuantGroup;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[NB];
  for (int t = 0; t < NB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* wg = w + (rb * G + g) * kRows * kQuantGroup;
    __m512i wv[8];
    for (int c = 0; c < 8; ++c) wv[c] = _mm512_xor_si512(_mm512_loadu_si512(wg + 64 * c), flip);
    for (int t = 0; t < NB; ++t) {
      const int8_t* xt = q + (b0 + t) * K + g * kQuantGroup;
      __m512i dot = _mm512_setzero_si512();
      for (int c = 0; c < 8; ++c) dot = _mm512_dpbusd_epi32(dot, wv[c], _mm512_set1_epi32(four_bytes(xt + 4 * c)));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale[(b0 + t) * G + g]), acc[t]);
    }
  }
  const __m512 sr = bf16x16(s + rb * kRows);
  for (int t = 0; t < NB; ++t)
    _mm512_storeu_ps(y + (b0 + t) * N + rb * kRows,
                     _mm512_mul_ps(_mm512_sub_ps(acc[t], _mm512_set1_ps(offset[b0 + t])), sr));
}

}  // namespace

void quantize_rows(const float* x, int64_t B, int64_t K, int8_t* q, float* scale, float* sum, int32_t* qsum) {
  const int64_t G = K / kQuantGroup;
  for (int64_t i = 0; i < B * G; ++i) {
    const float* xg = x + i * kQuantGroup;
    const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    scale[i] = amax / 127.f;
    sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    qsum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    _mm_storeu_si128((__m128i*)(q + i * kQuantGroup), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i*)(q + i * kQuantGroup + 16), _mm512_cvtsepi32_epi8(qb));
  }
}

void int4_matmul(const int8_t* q, const float* scale, const float* sum, const int32_t* qsum, int64_t B, int64_t K,
                 const uint8_t* w, const uint16_t* sz, int64_t group, int64_t N, float* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t rb = 0; rb < N / kRows; ++rb) {
    int64_t b0 = 0;
    for (; b0 + 4 <= B; b0 += 4) int4_block<4>(q, scale, sum, qsum, b0, K, w, sz, group, rb, N, y);
    switch (B - b0) {
      case 3: int4_block<3>(q, scale, sum, qsum, b0, K, w, sz, group, rb, N, y); break;
      case 2: int4_block<2>(q, scale, sum, qsum, b0, K, w, sz, group, rb, N, y); break;
      case 1: int4_block<1>(q, scale, sum, qsum, b0, K, w, sz, group, rb, N, y); break;
      default: break;
    }
  }
}

void int8_matmul(const int8_t* q, const float* scale, const float* offset, int64_t B, int64_t K, const int8_t* w,
                 const uint16_t* s, int64_t N, float* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t rb = 0; rb < N / kRows; ++rb) {
    int64_t b0 = 0;
    for (; b0 + 4 <= B; b0 += 4) int8_block<4>(q, scale, offset, b0, K, w, s, rb, N, y);
    switch (B - b0) {
      case 3: int8_block<3>(q, scale, offset, b0, K, w, s, rb, N, y); break;
      case 2: int8_block<2>(q, scale, offset, b0, K, w, s, rb, N, y); break;
      case 1: int8_block<1>(q, scale, offset, b0, K, w, s, rb, N, y); break;
      default: break;
    }
  }
}

}  // namespace herd

#pragma GCC pop_options
