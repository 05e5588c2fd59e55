// y = x @ W.T on the CPU for weights held as 4- or 8-bit codes with one float16 (scale, offset) per
// 32 inputs (GGUF Q4_0/Q4_1/Q8_0/K-quant blocks, repacked without loss): w = scale * q + offset.
//
// The activations are quantized per 32 inputs to two int8 planes, x ~ dx * (hi + lo / 254) with
// dx = max|x| / 127, so a group's dot product is integer work for AVX-512 VNNI (vpdpbusd: 64 u8 x s8
// products per instruction), finished in float32:
//     sum_i w_i x_i  ~  scale * dx * (sum_i q_i hi_i + sum_i q_i lo_i / 254)  +  offset * sum_i x_i
// (the offset term uses the float sum of x). One plane alone (llama.cpp's Q8_1) errs by up to
// dx / 2 per input: this model family's outlier channels (a few inputs 30x the rest) then cost a
// mean KL of 1.5e-2 nats to the exact path on the default model; the second plane cuts the error
// to dx / 508 (KL 4e-4, as bfloat16 activations) for twice the integer work, which batch-1 decode
// hides under the weight reads.
//
// Layout (forge/quant/layouts.py: pack_q32): rows in tiles of 16, one int32 lane per row.
// A tile is its groups of 32 inputs in order, each a "group block" of
//     codes:   8 steps x 64 bytes (8-bit), step j = codes 4j .. 4j+3 of row 0, of row 1, ... row 15;
//              4-bit codes: 4 x 64 bytes, byte = step j code (low nibble) | step j+4 code (high);
//     scales:  16 float16 (one per row), then offsets: 16 float16.
// = 320 bytes (4-bit) or 576 bytes (8-bit) per 16 rows x 32 inputs, all 64-byte aligned. A
// step's 4 activation codes are broadcast to every lane, so after 8 steps lane r holds row r's
// group dot product; one float multiply-add per group applies 16 rows' scales at once, and the
// tile's 16 outputs are stored without any horizontal sum. The weights are read as one
// sequential stream (what the hardware prefetcher follows best): per output row and call,
// K/2 (4-bit) or K (8-bit) code bytes + K/8 scale bytes; activations come from L1/L2.
//
// Threads: tiles are split over OpenMP threads (torch's own libgomp; see forge/native/__init__.py).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int GROUP = 32;  // inputs per (scale, offset)
constexpr int TILE = 16;   // rows per tile: one int32 lane each
// Each group block is prefetched this far ahead of its use: the hardware prefetcher alone kept one
// core at ~25 GB/s on the default model's 98 MB of weights; 8 KB ahead measured ~32 GB/s at batch 1
// (1-4 KB: 24-28; 16 KB: 26), and batch-16 token matmuls went from 20 to 13 ms.
constexpr int64_t PF_BYTES = 8192;
typedef int32_t word32 __attribute__((may_alias));  // 4 int8 codes read as one int32

// acc += u8 codes x (4 s8 activation codes at p, broadcast to every lane): vpdpbusd with an
// embedded-broadcast memory operand, one instruction (compilers emit a separate vpbroadcastd).
inline void dpbusd_bcast(__m512i& acc, __m512i codes, const word32* p) {
    asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*p));
}

template <int BITS>
constexpr int64_t group_block_bytes() { return TILE * GROUP * BITS / 8 + 2 * TILE * 2; }

struct Weights {
    const uint8_t* data;  // [N / 16 tiles][K / 32 groups][group block]
    int64_t n, k;         // n: a multiple of 16
};

struct Acts {
    const int8_t* q;     // [M, K] high plane, then [M, K] low plane
    const float* scale;  // [M, K/32]
    const float* sum;    // [M, K/32]: float sum of each group's inputs
    int64_t plane;       // M * K: offset of the low plane
};

// Tile t's 16 outputs for activation rows m0 .. m0 + MB - 1.
template <int BITS, int MB>
void tile(const Weights& w, const Acts& a, int64_t t, int64_t m0, float* y, int64_t ldy) {
    constexpr int64_t GB = group_block_bytes<BITS>();
    constexpr int64_t CODE_BYTES = TILE * GROUP * BITS / 8;
    const int64_t groups = w.k / GROUP;
    const uint8_t* block = w.data + t * groups * GB;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const __m512i low_nibble = _mm512_set1_epi8(15);
    for (int64_t g = 0; g < groups; ++g, block += GB) {
        for (int64_t off = 0; off < GB; off += 64) _mm_prefetch((const char*)block + PF_BYTES + off, _MM_HINT_T0);
        // (past the weight's end this prefetches unrelated memory, which is harmless: prefetches never fault)
        __m512i q[8];
        if (BITS == 4) {
            for (int j = 0; j < 4; ++j) {
                const __m512i v = _mm512_load_si512(block + 64 * j);
                q[j] = _mm512_and_si512(v, low_nibble);
                q[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibble);
            }
        } else {
            for (int j = 0; j < 8; ++j) q[j] = _mm512_load_si512(block + 64 * j);
        }
        const __m512 ws = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(block + CODE_BYTES)));
        const __m512 wo = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(block + CODE_BYTES + 32)));
        for (int m = 0; m < MB; ++m) {
            // 4 activation codes per step, broadcast to every lane (vpdpbusd's {1to16} memory operand)
            const word32* hi4 = (const word32*)(a.q + (m0 + m) * w.k + g * GROUP);
            const word32* lo4 = (const word32*)(a.q + a.plane + (m0 + m) * w.k + g * GROUP);
            __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();  // 4 chains: latency
            __m512i hi2 = _mm512_setzero_si512(), lo2 = _mm512_setzero_si512();
            for (int j = 0; j < 8; j += 2) {
                dpbusd_bcast(hi, q[j], hi4 + j);
                dpbusd_bcast(lo, q[j], lo4 + j);
                dpbusd_bcast(hi2, q[j + 1], hi4 + j + 1);
                dpbusd_bcast(lo2, q[j + 1], lo4 + j + 1);
            }
            hi = _mm512_add_epi32(hi, hi2);
            lo = _mm512_add_epi32(lo, lo2);
            const float xs = a.scale[(m0 + m) * groups + g], xsum = a.sum[(m0 + m) * groups + g];
            const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(1.0f / 254.0f), _mm512_cvtepi32_ps(hi));
            acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws, _mm512_set1_ps(xs)), acc[m]);
            acc[m] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xsum), acc[m]);
        }
    }
    for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + (m0 + m) * ldy + t * TILE, acc[m]);
}

template <int BITS>
void tile_all_m(const Weights& w, const Acts& a, int64_t m, int64_t t, float* y) {
    constexpr int MB = 8;
    int64_t m0 = 0;
    for (; m0 + MB <= m; m0 += MB) tile<BITS, MB>(w, a, t, m0, y, w.n);
    switch (m - m0) {
        case 7: tile<BITS, 7>(w, a, t, m0, y, w.n); break;
        case 6: tile<BITS, 6>(w, a, t, m0, y, w.n); break;
        case 5: tile<BITS, 5>(w, a, t, m0, y, w.n); break;
        case 4: tile<BITS, 4>(w, a, t, m0, y, w.n); break;
        case 3: tile<BITS, 3>(w, a, t, m0, y, w.n); break;
        case 2: tile<BITS, 2>(w, a, t, m0, y, w.n); break;
        case 1: tile<BITS, 1>(w, a, t, m0, y, w.n); break;
        default: break;
    }
}

template <int BITS>
void gemm(const Weights& w, const Acts& a, int64_t m, float* y, int threads) {
    const int64_t tiles = w.n / TILE;
    const bool parallel = threads > 1 && w.n * w.k * m >= (1 << 18);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t t = 0; t < tiles; ++t) tile_all_m<BITS>(w, a, m, t, y);
}

// x [M, K] float32 -> two int8 planes (q: high, q + M K: low), per-group scale dx = max|x| / 127
// and the group's float sum. t = x / dx in [-127, 127]: hi = round(t), lo = round((t - hi) * 254).
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* scale, float* sum) {
    const int64_t groups = k / GROUP, plane = m * k;
    for (int64_t i = 0; i < m * groups; ++i) {
        const float* xg = x + i * GROUP;
        const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f), fine = _mm512_set1_ps(254.0f);
        scale[i] = amax / 127.0f;
        sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        for (int half = 0; half < 2; ++half) {
            const __m512 t = _mm512_mul_ps(half ? b : a, inv);
            const __m512 hi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t, hi), fine));
            _mm_storeu_si128((__m128i*)(q + i * GROUP + 16 * half), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(hi)));
            _mm_storeu_si128((__m128i*)(q + plane + i * GROUP + 16 * half), _mm512_cvtsepi32_epi8(lo));
        }
    }
}

// Thread-local scratch for the quantized activations.
thread_local std::vector<int8_t> scratch_q;
thread_local std::vector<float> scratch_f;

template <int BITS>
void dequantize_rows(const Weights& w, const int64_t* ids, int64_t t, float* out) {
    constexpr int64_t GB = group_block_bytes<BITS>(), CODE_BYTES = TILE * GROUP * BITS / 8;
    const int64_t groups = w.k / GROUP;
    for (int64_t i = 0; i < t; ++i) {
        const int64_t row = ids[i], r = row % TILE;
        if (row < 0 || row >= w.n) continue;  // the caller checks ids; never read outside the weight
        const uint8_t* block = w.data + (row / TILE) * groups * GB;
        float* o = out + i * w.k;
        for (int64_t g = 0; g < groups; ++g, block += GB) {
            uint16_t s16, z16;
            memcpy(&s16, block + CODE_BYTES + 2 * r, 2);
            memcpy(&z16, block + CODE_BYTES + 32 + 2 * r, 2);
            const float s = _cvtsh_ss(s16), z = _cvtsh_ss(z16);
            for (int c = 0; c < GROUP; ++c) {
                const int j = c / 4, b = c % 4;
                const int code = BITS == 4 ? (block[64 * (j % 4) + 4 * r + b] >> (j < 4 ? 0 : 4)) & 15
                                           : block[64 * j + 4 * r + b];
                const volatile float prod = s * (float)code;  // rounded on its own, as gguf's d * q
                o[g * GROUP + c] = prod + z;
            }
        }
    }
}

}  // namespace

extern "C" {

// y [M, N] = x [M, K] @ W.T, float32 in and out. N a multiple of 16, K of 32.
void fq_linear(const float* x, int64_t m, int64_t k, const uint8_t* data, int bits, int64_t n, float* y,
               int threads) {
    const int64_t groups = k / GROUP;
    if ((int64_t)scratch_q.size() < 2 * m * k) scratch_q.resize(2 * m * k);
    if ((int64_t)scratch_f.size() < 2 * m * groups) scratch_f.resize(2 * m * groups);
    float* xs = scratch_f.data();
    float* xsum = xs + m * groups;
    quantize_rows(x, m, k, scratch_q.data(), xs, xsum);
    const Weights w{data, n, k};
    const Acts a{scratch_q.data(), xs, xsum, m * k};
    if (bits == 4) gemm<4>(w, a, m, y, threads);
    else gemm<8>(w, a, m, y, threads);
}

// out [T, K] float32 = rows ids [T] of W dequantized: scale * q + offset (two roundings, no fused
// multiply-add: the same value as the gguf package's dequantization).
void fq_dequantize_rows(const uint8_t* data, int bits, int64_t n, int64_t k, const int64_t* ids, int64_t t,
                        float* out) {
    const Weights w{data, n, k};
    if (bits == 4) dequantize_rows<4>(w, ids, t, out);
    else dequantize_rows<8>(w, ids, t, out);
}

}  // extern "C"
