// Quantized matmuls for the C++ decode step on CPUs with AVX-512 VNNI: the activations are
// rounded to int8 in groups of 32 (one float scale each, llama.cpp's Q8_0 idea) and multiplied
// with int4 or int8 weights in vpdpbusd (64 byte products per instruction), instead of
// widening every weight to float as torch's weight-only kernels do. Plain pointers only: the
// .cpp is compiled for AVX-512 VNNI and must not instantiate shared (inline) library code.

#pragma once

#include <cstdint>

namespace herd {

constexpr int64_t kQuantGroup = 32;  // activation values per int8 scale
constexpr int64_t kRows = 16;        // weight rows interleaved per block (int4 and int8)

// Whether this CPU runs the kernels below (AVX-512 F/BW/VL and VNNI).
bool vnni_supported();

// x (B, K) float -> q (B, K) int8 and, per group of 32 (B, K / 32), its scale, the sum of the
// original values and the sum of q; K % 32 == 0.
void quantize_rows(const float* x, int64_t B, int64_t K, int8_t* q, float* scale, float* sum, int32_t* qsum);

// int8_matmul's offset per activation row, from quantize_rows' scale and qsum.
void int8_offsets(const float* scale, const int32_t* qsum, int64_t B, int64_t K, float* offset);

// y (B, N) = x @ W.T with W = (code - 8) * s + z per row and group of `group` inputs (a multiple
// of 32), computed as s * sum((code - 8) * q) * scale + z * sum (code - 8 keeps the rounding of q
// small against W). w holds the codes as [N / 16][K / 32][4][64] bytes: in byte 4 * r + j of
// chunk c, row r's code for input 8 * c + j in the low nibble and 8 * c + 4 + j in the high one.
// sz holds [K / group][N][2] bfloat16 bits, each row's s then z (Int4Linear.scales_zeros).
void int4_matmul(const int8_t* q, const float* scale, const float* sum, const int32_t* qsum, int64_t B, int64_t K,
                 const uint8_t* w, const uint16_t* sz, int64_t group, int64_t N, float* y, int threads);

// y (B, N) = x @ (W * s[:, None]).T for W int8 held as [N / 16][K / 4][16][4] (row r's inputs
// 4 i .. 4 i + 3 in bytes 4 r .. 4 r + 3 of the i-th 64), s (N,) bfloat16 bits; offset (B,) from
// int8_offsets.
void int8_matmul(const int8_t* q, const float* scale, const float* offset, int64_t B, int64_t K, const int8_t* w,
                 const uint16_t* s, int64_t N, float* y, int threads);

}  // namespace herd
