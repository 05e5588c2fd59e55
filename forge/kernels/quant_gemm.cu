// quant_gemm: out[M, N] = x[M, K] @ W[N, K]^T for quantized W, dequantized in registers and multiplied
// on the tensor cores (mma.sync m16n8k16, float32 accumulate). For decode-sized M (1 .. a few hundred).
//
// Weight codes (WCODE):
//   0  int4: w = s * q + o, q in [0, 16), one float16 (s, o) pair per GROUP (32 or 128) inputs of a row.
//      Stored row-major, K padded to a multiple of 128, one row = K/128 chunks of 64 bytes; in each chunk
//      lane c (0..3) of a row's four lanes owns bytes [16c, 16c + 16): the 32 inputs 16j + 4c + i
//      (j = 0..7, i = 0..3) of the chunk, as 4 words, word m holding k-tiles j = 2m, 2m + 1 with the
//      value pair p (values 2p, 2p + 1 of the word's 8) in bits [4p, 4p+4) and [16+4p, 20+4p), so one
//      mask-and-or turns a pair into two bf16/fp16 numbers (forge/quant/cuda.py packs this).
//   1  fp8 (e4m3): w = s * q, one float32 s per output row (GROUP 0) or per 128 inputs of a row (a
//      checkpoint's 128 x 128 blocks, GROUP 128). Stored plainly row-major [N, K], K a multiple of 64;
//      in each 64-input chunk lane c owns bytes [16c, 16c + 16) (inputs 16c + 4j + i, k-tile j).
//   2  float (the model's own bf16 / fp16 weight, x's dtype): row-major [N, K], K a multiple of 32, rows not
//      padded (a lane past row N reads row N - 1, never stored); in each 32-input chunk lane c owns bytes
//      [16c, 16c + 16) (inputs 8c + 4j + i, k-tile j), and its x fragment of the chunk is one 16-byte load.
//
// An mma k-tile sums over 16 "slots"; lane c feeds slots 2c, 2c+1, 2c+8, 2c+9 of both operands, so any
// assignment of 4 inputs per lane to those slots is correct as long as W and x agree: here k-tile j of a
// chunk takes inputs (int4) 16j + 4c + i or (fp8) 16c + 4j + i, i = 0..3, which makes a lane's x
// fragment 4 consecutive inputs (one 8-byte load) and its W fragment the next 4 codes of its bytes.
// With int4, a k-tile's 16 inputs lie in one group, so the MMAs run on the raw codes and the group's
// scale and offset are applied afterwards: acc += s * sum(q x) + o * sum(x) (sum(x): one more MMA with
// an all-ones A). Exact dequantization, no per-weight float math: 2 integer ops per pair of codes.
//
// Layout: grid = (ceil(M / (8 NT)), N_pad / (16 RT)), block = WARPS warps. A warp computes RT row tiles
// (16 rows) x NT token tiles (8 tokens) over a contiguous range of K's chunks (K split over the block's
// warps, whole groups each); the warps' partial sums are added through shared memory at the end.
// Weights are read once per token tile (grid.x is the fastest dimension, so a row tile's token tiles run
// side by side and share its weights through L2), with streaming loads (no L1 allocation) UNROLL chunks
// ahead; x comes through L1 (every row tile reads it).
//
// Bytes moved: N * K * (0.5 + 4/GROUP) (int4), N * K (fp8) or N * K * 2 (float) of weights, + M * K * 2 of x
// per row tile (L1/L2), + M * N * 2 written.
//
// NORM_PROLOGUE = 1 (a decoder layer's residual add + RMSNorm folded into the GEMM that reads its output):
// x is not an input but rms_norm(hidden + residual) * norm_weight (rms_norm(hidden) * norm_weight when
// residual is null: the first layer), computed by every block for its tokens into shared memory, bit for bit
// as norm.cu's add_rms_norm / rms_norm (the same roundings, and the sum of squares in the same order:
// norm_threads = the block size norm.py picks for this hidden size, each (token, norm thread) pair summing
// the same elements as that thread, reduced by the same warp and block shuffles). The blocks of row tile 0
// write the sum to residual_out (a third buffer: the other blocks still read residual). Before the norm
// each lane prefetches its first UNROLL weight chunks into L2 (the weights do not depend on the previous
// kernel). Extra bytes per block: M * K * 2 (hidden) + M * K * 2 (residual) + K * 2 (norm weight) from L2;
// shared memory: M rows of K + XS_PAD inputs (the padding spreads the x loads over the banks).
// ACT = 1 (silu) / 2 (gelu_tanh), float weights, RT = 2: out[t, j] = act(x @ W[j]) * (x @ W[N + j]) for a
// gate_up weight of 2N rows (gate rows first): a block's row tile 0 holds gate rows j.., tile 1 the matching
// up rows N + j..; both sums are rounded to x's dtype, then the activation and the product, as
// activation.cu's silu_mul / gelu_tanh_mul do on the GEMM's output.
// ROPE_HEAD_DIM = D (a multiple of 32; with NORM_PROLOGUE, RT = 2): the qkv GEMM + rope_cache.cu's
// qkv_rope_cache in one launch (ops.rms_norm_qkv_rope_cache). W is the fused qkv weight, (H + 2 Hkv) heads of D
// rows; grid.y = N / 32: block y takes head y / (D/32) and its rows i = 16 (y % (D/32)) + 0..15 as row tile 0,
// the rows i + D/2 they rotate with as row tile 1. Each sum is rounded to x's dtype (the GEMM's output), then
// q / k rows are rotated (neox) from the float32 cos / sin table at the token's position, as rope_cache.cu
// does; q goes to out [M, H, D], k and v to the paged cache at the token's slot (slot < 0: not written;
// FORGE_CACHE_DTYPE 3: k / k_scale, v / v_scale in e4m3). Bytes against the two launches it replaces: the qkv
// activations [M, N] neither written nor read back; M (H + Hkv) D floats of cos / sin read (L1 / L2) as before.
#include "common.cuh"
#include <cuda_fp8.h>
#include "quant_common.cuh"

#ifndef WCODE
#define WCODE 0
#endif
#ifndef GROUP
#define GROUP 128
#endif
#ifndef RT
#define RT 1
#endif
#ifndef NT
#define NT 1
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef NORM_PROLOGUE
#define NORM_PROLOGUE 0
#endif
#ifndef ACT
#define ACT 0
#endif
#ifndef ROPE_HEAD_DIM
#define ROPE_HEAD_DIM 0
#endif

static_assert(FORGE_DTYPE == 1 || FORGE_DTYPE == 2, "quant_gemm computes in bfloat16 or float16");
static_assert(WCODE == 0   ? (GROUP == 32 || GROUP == 64 || GROUP == 128)
              : WCODE == 1 ? (GROUP == 0 || GROUP == 128)
                           : (WCODE == 2 && GROUP == 0),
              "int4 groups of 32/64/128 inputs; fp8 per row (0) or per 128 inputs; float weights unscaled");
static_assert(ACT == 0 || (WCODE == 2 && RT == 2), "the gated epilogue: float weights, a gate and an up row tile");
static_assert(ROPE_HEAD_DIM == 0 || (ROPE_HEAD_DIM % 32 == 0 && RT == 2 && ACT == 0 && NORM_PROLOGUE),
              "the RoPE epilogue: whole 16-row tiles in each half of a head, the two halves' tiles in one block");
// Row tile r of a block starts TILE_ROWS r rows after its first (RoPE: the second half of the head). (A macro:
// a namespace-scope constexpr is a symbol of the cubin.)
#define TILE_ROWS (ROPE_HEAD_DIM ? ROPE_HEAD_DIM / 2 : 16)

constexpr int CHUNK_K = WCODE == 0 ? 128 : WCODE == 1 ? 64 : 32;  // inputs of a row in one 64-byte chunk
constexpr int KT_PER_CHUNK = CHUNK_K / 16;     // mma k-tiles per chunk
#define FOLD (WCODE == 0 || GROUP > 0)  // scales applied per group, after the group's MMAs
constexpr int FOLD_KT = GROUP / 16;            // k-tiles per group
// A warp's chunk range holds whole groups: fp8 blocks of 128 span two chunks.
constexpr int ALIGN_CHUNKS = (WCODE == 1 && GROUP > CHUNK_K) ? GROUP / CHUNK_K : 1;

#if FORGE_DTYPE == 1
constexpr unsigned MAGIC2 = 0x43004300u;  // bf16 128.0 twice: 128 + q has q in its low mantissa bits
constexpr unsigned ONES2 = 0x3F803F80u;   // bf16 1.0 twice
#else
constexpr unsigned MAGIC2 = 0x64006400u;  // fp16 1024.0 twice
constexpr unsigned ONES2 = 0x3C003C00u;   // fp16 1.0 twice
#endif

// Two int4 codes (pair p of a word) -> two exact bf16/fp16 numbers q0, q1 in one register.
__device__ __forceinline__ unsigned int4_pair(unsigned word, int p) {
    const unsigned biased = ((word >> (4 * p)) & 0x000F000Fu) | MAGIC2;  // (MAGIC + q0, MAGIC + q1)
    unsigned r;
#if FORGE_DTYPE == 1
    asm("sub.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(biased), "r"(MAGIC2));
#else
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(biased), "r"(MAGIC2));
#endif
    return r;
}

__device__ __forceinline__ uint4 load_stream16(const unsigned char* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

#if ACT
#include "activation.cuh"
#if ACT == 1
typedef Silu Act;
#else
typedef GeluTanh Act;
#endif
#endif

#if ROPE_HEAD_DIM
#ifndef FORGE_CACHE_DTYPE
#define FORGE_CACHE_DTYPE FORGE_DTYPE
#endif
typedef DtypeOf<FORGE_CACHE_DTYPE>::type cache_t;

// rope_cache.cu's rotation of a pair x1 = x[i], x2 = x[i + D/2]: (x1 cos - x2 sin, x2 cos + x1 sin) in float32,
// with the roundings ptxas gives its `a * c - b * s` / `b * c + a * s` in the VEC 2 / 4 / 8 builds its launcher
// takes for rms_norm_linear's contiguous qkv (sm_90 SASS: FMUL, then FFMA(x1, cos, -(x2 sin)) and
// FFMA(x2, cos, x1 sin)) written out, so that the two agree bit for bit; its VEC 1 builds fuse the second as
// FFMA(x1, sin, x2 cos).
__device__ __forceinline__ float2 rope_rotate(float x1, float x2, float c, float s) {
    return make_float2(__fmaf_rn(x1, c, -__fmul_rn(x2, s)), __fmaf_rn(x2, c, __fmul_rn(x1, s)));
}

// A value as rope_cache.cu's to_cache stores it (fp8: x / scale, an IEEE division, rounded and saturated).
__device__ __forceinline__ cache_t to_cache(float x, float scale) {
#if FORGE_FP8
    return from_float<cache_t>(x / scale);
#else
    return from_float<cache_t>(x);
#endif
}
#endif

#if NORM_PROLOGUE
#ifndef FORGE_WDTYPE
#define FORGE_WDTYPE FORGE_DTYPE
#endif
typedef DtypeOf<FORGE_WDTYPE>::type wscalar_t;

// xs[m] = rms_norm(hidden[tok0 + m] (+ residual[tok0 + m])) * weight for the block's `rows` tokens, bit for bit
// as norm.cu: (1) the rounded sums into xs (and residual_out when write_res), 8 inputs per thread per step;
// (2) the sums of squares in norm.cu's order: item (m, lt) adds what norm.cu's thread lt adds for row m
// (inputs 8 (lt + p nthr) .. + 8, in order), 32 consecutive items are one warp (nthr is a multiple of 32),
// and a warp per row adds the warps' sums like block_sum; (3) x = w * (s * inv_rms), in place.
__device__ __forceinline__ void norm_prologue(scalar_t* xs, int xs_stride, const scalar_t* __restrict__ hidden,
                                              long long ldx, const scalar_t* __restrict__ residual,
                                              scalar_t* __restrict__ residual_out, const wscalar_t* __restrict__ weight,
                                              int H, float eps, int nthr, int tok0, int rows, bool write_res) {
    __shared__ float part[NT * 8][32];
    __shared__ float inv[NT * 8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int vecs = H / 8;
#pragma unroll 4
    for (int v = threadIdx.x; v < rows * vecs; v += WARPS * 32) {
        const int m = v / vecs, i = (v - m * vecs) * 8;
        Vec<scalar_t, 8> s = load_vec<scalar_t, 8>(hidden + (long long)(tok0 + m) * ldx + i);
        if (residual != nullptr) {
            const long long at = (long long)(tok0 + m) * H + i;
            const Vec<scalar_t, 8> b = load_vec<scalar_t, 8>(residual + at);
#pragma unroll
            for (int e = 0; e < 8; ++e) s.v[e] = from_float<scalar_t>(to_float(s.v[e]) + to_float(b.v[e]));
            if (write_res) store_vec<scalar_t, 8>(residual_out + at, s);
        }
        store_vec<scalar_t, 8>(xs + m * xs_stride + i, s);
    }
    __syncthreads();
    for (int q = threadIdx.x; q < rows * nthr; q += WARPS * 32) {
        const int m = q / nthr, lt = q - m * nthr;
        float ss = 0.f;
        for (int i = lt * 8; i < H; i += nthr * 8) {
            const Vec<scalar_t, 8> s = *reinterpret_cast<const Vec<scalar_t, 8>*>(xs + m * xs_stride + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float f = to_float(s.v[e]);
                ss += f * f;
            }
        }
        ss = warp_sum(ss);
        if (lane == 0) part[m][lt >> 5] = ss;
    }
    __syncthreads();
    for (int m = warp; m < rows; m += WARPS) {
        const float ss = warp_sum(lane < nthr / 32 ? part[m][lane] : 0.f);
        if (lane == 0) inv[m] = rsqrtf(ss / (float)H + eps);
    }
    __syncthreads();
#pragma unroll 4
    for (int v = threadIdx.x; v < rows * vecs; v += WARPS * 32) {
        const int m = v / vecs, i = (v - m * vecs) * 8;
        const Vec<wscalar_t, 8> w = load_vec<wscalar_t, 8>(weight + i);
        Vec<scalar_t, 8> s = *reinterpret_cast<const Vec<scalar_t, 8>*>(xs + m * xs_stride + i);
#pragma unroll
        for (int e = 0; e < 8; ++e) s.v[e] = from_float<scalar_t>(to_float(w.v[e]) * (to_float(s.v[e]) * inv[m]));
        store_vec<scalar_t, 8>(xs + m * xs_stride + i, s);
    }
    __syncthreads();
}
#endif

#if ROPE_HEAD_DIM || ACT
// A paired epilogue's accumulator slot v of lane l (row tile 0: gate / x[i], row tile 1: up / x[i + D/2]), each
// summed over the block's warps, and the output row (in row tile 0) and token it holds.
struct PairedSlot {
    float first, second;
    int row, tok;
};
template <typename Sums>  // red: [WARPS][RT * NT * 4][32] floats in shared memory
__device__ __forceinline__ PairedSlot paired_slot(Sums red, int v, int l, int row0, int tok0) {
    PairedSlot s{0.f, 0.f, 0, 0};
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) {
        s.first += red[wi][v][l];
        s.second += red[wi][NT * 4 + v][l];
    }
    const int t = v >> 2, i = v & 3;
    s.row = row0 + (l >> 2) + 8 * (i >> 1);
    s.tok = tok0 + 8 * t + 2 * (l & 3) + (i & 1);
    return s;
}
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32) quant_gemm_kernel(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const unsigned char* __restrict__ w,
    const void* __restrict__ scales, int M, int N, int K, int Kx, long long w_row_bytes, int groups_per_row,
    long long ldx, long long ldo
#if NORM_PROLOGUE
    ,  // x = hidden; residual / residual_out [M, Kx] contiguous, residual may be null
    const scalar_t* __restrict__ residual, scalar_t* __restrict__ residual_out,
    const wscalar_t* __restrict__ norm_weight, float eps, int norm_threads
#endif
#if ROPE_HEAD_DIM
    ,  // out = q [M, H, D]; positions / slot_mapping [M]; cos_sin [max_pos, D]; caches [blocks, block size, Hkv, D]
    const long long* __restrict__ positions, const float* __restrict__ cos_sin,
    const long long* __restrict__ slot_mapping, cache_t* __restrict__ k_cache, cache_t* __restrict__ v_cache,
    int num_heads, int num_kv_heads, float k_scale, float v_scale
#endif
) {
#if NORM_PROLOGUE
    extern __shared__ __align__(16) unsigned char smem[];  // x of the block's tokens, then the warps' sums
#else
    __shared__ float red[WARPS][RT * NT * 4][32];
#endif
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int tok0 = blockIdx.x * (NT * 8);
#if ROPE_HEAD_DIM  // blocks of a head: D / 32
    const int row0 = blockIdx.y / (ROPE_HEAD_DIM / 32) * ROPE_HEAD_DIM + 16 * (blockIdx.y % (ROPE_HEAD_DIM / 32));
#else
    const int row0 = blockIdx.y * ((ACT ? 1 : RT) * 16);
#endif

    const int nchunks = K / CHUNK_K;
    int per = (nchunks + WARPS - 1) / WARPS;
    per = (per + ALIGN_CHUNKS - 1) / ALIGN_CHUNKS * ALIGN_CHUNKS;
    const int ch_begin = min(warp * per, nchunks);
    const int ch_end = min(ch_begin + per, nchunks);

    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.f;
#if FOLD
    float part[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) part[r][t][i] = 0.f;
#endif
#if WCODE == 0
    float xsum[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) xsum[t][i] = 0.f;
    const unsigned ones[4] = {ONES2, ONES2, ONES2, ONES2};
#endif

    // This lane's two rows of each row tile (g and g + 8), at its 16 bytes of every chunk.
    const unsigned char* wrow[RT][2];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#if WCODE == 2  // rows are not padded: past the last, read the last (never stored)
            const int wr = ACT ? r * N + min(row0 + g + 8 * h, N - 1) : min(row0 + TILE_ROWS * r + g + 8 * h, N - 1);
            wrow[r][h] = w + (long long)wr * w_row_bytes + 16 * c;
#else
            wrow[r][h] = w + (long long)(row0 + TILE_ROWS * r + g + 8 * h) * w_row_bytes + 16 * c;
#endif
        }
#if NORM_PROLOGUE || (FORGE_PDL_ACTIVE && NT == 1)
    // The first UNROLL chunks of this lane's weights (read-only) move to L2 during the norm prologue and, with
    // PDL, while the previous kernel finishes (decode tiles only: at NT > 1 the addresses cost up to 6 registers).
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                if (ch_begin + u < ch_end) forge_prefetch_l2(wrow[r][h] + (long long)(ch_begin + u) * 64);
#endif
    forge_wait_prior_grid();  // PDL: x (hidden / residual) is the previous kernel's output (common.cuh)
    forge_allow_dependents();
#if NORM_PROLOGUE
    // x's row stride in shared memory: Kx rounded up to 64, + XS_PAD, so that the lanes of one load phase hit
    // distinct banks: float (16-byte loads, phases of 8 lanes = rows g, g + 1 x 16 words) rows 16 words apart;
    // int4 (8-byte loads, 16 lanes = rows g .. g + 3 x 8 words) 8 apart. fp8 (words 8c + 2j, 8c + 2j + 1 of
    // rows g .. g + 3) would need rows 2 words apart, but the prologue's 16-byte stores need 16-byte aligned
    // rows: 4 words apart, two ways per bank.
    constexpr int XS_PAD = WCODE == 2 ? 32 : WCODE == 0 ? 16 : 8;
    const int xs_stride = (Kx + 63) / 64 * 64 + XS_PAD;
    scalar_t* xs = reinterpret_cast<scalar_t*>(smem);
    norm_prologue(xs, xs_stride, x, ldx, residual, residual_out, norm_weight, Kx, eps, norm_threads, tok0,
                  min(M - tok0, NT * 8), blockIdx.y == 0);
#endif
    // This lane's token of each token tile (its column of the B fragment).
    const scalar_t* xrow[NT];
    bool xok[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const int tok = tok0 + 8 * t + g;
        xok[t] = tok < M;
#if NORM_PROLOGUE
        xrow[t] = xs + (xok[t] ? tok - tok0 : 0) * xs_stride;
#else
        xrow[t] = x + (long long)(xok[t] ? tok : 0) * ldx;
#endif
    }

    for (int ch = ch_begin; ch < ch_end; ch += UNROLL) {
        uint4 wv[UNROLL][RT][2];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    wv[u][r][h] = ch + u < ch_end ? load_stream16(wrow[r][h] + (long long)(ch + u) * 64)
                                                  : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int chunk = ch + u;
            if (chunk >= ch_end) break;
#if WCODE == 2
            uint4 xv[NT];  // this lane's 8 inputs of the chunk (both k-tiles), per token tile
#pragma unroll
            for (int t = 0; t < NT; ++t)
                xv[t] = xok[t] ? *reinterpret_cast<const uint4*>(xrow[t] + chunk * CHUNK_K + 8 * c) : make_uint4(0, 0, 0, 0);
#endif
#pragma unroll
            for (int j = 0; j < KT_PER_CHUNK; ++j) {
                unsigned b[NT][2];
#if WCODE == 2
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    b[t][0] = word_of(xv[t], 2 * j);
                    b[t][1] = word_of(xv[t], 2 * j + 1);
                }
#else
                const int k = chunk * CHUNK_K + (WCODE == 0 ? 16 * j + 4 * c : 16 * c + 4 * j);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    uint2 v = make_uint2(0, 0);
                    if (xok[t] && k < Kx) v = *reinterpret_cast<const uint2*>(xrow[t] + k);
                    b[t][0] = v.x;
                    b[t][1] = v.y;
                }
#endif
#pragma unroll
                for (int r = 0; r < RT; ++r) {
                    unsigned a[4];
#if WCODE == 0
                    const unsigned lo = word_of(wv[u][r][0], j >> 1), hi = word_of(wv[u][r][1], j >> 1);
                    const int p = (j & 1) * 2;
                    a[0] = int4_pair(lo, p);      // row g,     slots 2c, 2c+1
                    a[1] = int4_pair(hi, p);      // row g + 8, slots 2c, 2c+1
                    a[2] = int4_pair(lo, p + 1);  // row g,     slots 2c+8, 2c+9
                    a[3] = int4_pair(hi, p + 1);  // row g + 8, slots 2c+8, 2c+9
#elif WCODE == 1
                    const unsigned lo = word_of(wv[u][r][0], j), hi = word_of(wv[u][r][1], j);
                    a[0] = fp8_pair(lo & 0xFFFFu);
                    a[1] = fp8_pair(hi & 0xFFFFu);
                    a[2] = fp8_pair(lo >> 16);
                    a[3] = fp8_pair(hi >> 16);
#else  // the weights are the numbers: inputs 8c + 4j, +1 (slots 2c, 2c+1) and +2, +3 (slots 2c+8, 2c+9)
                    a[0] = word_of(wv[u][r][0], 2 * j);
                    a[1] = word_of(wv[u][r][1], 2 * j);
                    a[2] = word_of(wv[u][r][0], 2 * j + 1);
                    a[3] = word_of(wv[u][r][1], 2 * j + 1);
#endif
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
#if FOLD
                        mma16816(part[r][t], a, b[t][0], b[t][1]);
#else
                        mma16816(acc[r][t], a, b[t][0], b[t][1]);
#endif
                    }
                }
#if WCODE == 0
#pragma unroll
                for (int t = 0; t < NT; ++t) mma16816(xsum[t], ones, b[t][0], b[t][1]);
#endif
#if FOLD
                const int kt = chunk * KT_PER_CHUNK + j;  // k-tiles from the row's start
                if ((kt + 1) % FOLD_KT == 0) {
                    const int grp = WCODE == 0 ? kt * 16 / GROUP : chunk * CHUNK_K / GROUP;
#pragma unroll
                    for (int r = 0; r < RT; ++r) {
                        const long long r_lo = (long long)(row0 + TILE_ROWS * r + g), r_hi = r_lo + 8;
#if WCODE == 0
                        const __half2* sz = reinterpret_cast<const __half2*>(scales);
                        const float2 lo = __half22float2(sz[r_lo * groups_per_row + grp]);  // (s, o)
                        const float2 hi = __half22float2(sz[r_hi * groups_per_row + grp]);
#pragma unroll
                        for (int t = 0; t < NT; ++t) {
                            acc[r][t][0] += lo.x * part[r][t][0] + lo.y * xsum[t][0];
                            acc[r][t][1] += lo.x * part[r][t][1] + lo.y * xsum[t][1];
                            acc[r][t][2] += hi.x * part[r][t][2] + hi.y * xsum[t][2];
                            acc[r][t][3] += hi.x * part[r][t][3] + hi.y * xsum[t][3];
                        }
#else
                        const float* s = reinterpret_cast<const float*>(scales);
                        const float lo = s[r_lo * groups_per_row + grp], hi = s[r_hi * groups_per_row + grp];
#pragma unroll
                        for (int t = 0; t < NT; ++t) {
                            acc[r][t][0] += lo * part[r][t][0];
                            acc[r][t][1] += lo * part[r][t][1];
                            acc[r][t][2] += hi * part[r][t][2];
                            acc[r][t][3] += hi * part[r][t][3];
                        }
#endif
#pragma unroll
                        for (int t = 0; t < NT; ++t)
#pragma unroll
                            for (int i = 0; i < 4; ++i) part[r][t][i] = 0.f;
                    }
#if WCODE == 0
#pragma unroll
                    for (int t = 0; t < NT; ++t)
#pragma unroll
                        for (int i = 0; i < 4; ++i) xsum[t][i] = 0.f;
#endif
                }
#endif
            }
        }
    }

    // The warps' partial sums -> shared memory -> one output each, summed by the block's threads.
#if NORM_PROLOGUE
    __syncthreads();  // every warp is done with x, whose shared memory now takes the sums
    float(*red)[RT * NT * 4][32] = reinterpret_cast<float(*)[RT * NT * 4][32]>(smem);
#endif
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][(r * NT + t) * 4 + i][lane] = acc[r][t][i];
    __syncthreads();
#if ROPE_HEAD_DIM
    constexpr int HALF = ROPE_HEAD_DIM / 2;
    const int head = blockIdx.y / (ROPE_HEAD_DIM / 32);
    for (int idx = threadIdx.x; idx < NT * 4 * 32; idx += WARPS * 32) {  // row tile 0: x[i], 1: x[i + D/2]
        const PairedSlot p = paired_slot(red, idx >> 5, idx & 31, row0, tok0);
        const int row = p.row, tok = p.tok;
        float x1 = p.first, x2 = p.second;
        if (tok >= M) continue;
#if WCODE == 1 && GROUP == 0
        x1 *= reinterpret_cast<const float*>(scales)[row];
        x2 *= reinterpret_cast<const float*>(scales)[row + HALF];
#endif
        const scalar_t a = from_float<scalar_t>(x1), b = from_float<scalar_t>(x2);  // the GEMM's output
        const int i = row - head * ROPE_HEAD_DIM;  // in the first half of the head
        const long long slot = head < num_heads ? 0 : slot_mapping[tok];
        if (head < num_heads + num_kv_heads) {
            const float* cs = cos_sin + positions[tok] * ROPE_HEAD_DIM;
            const float2 o = rope_rotate(to_float(a), to_float(b), cs[i], cs[HALF + i]);
            const scalar_t o1 = from_float<scalar_t>(o.x), o2 = from_float<scalar_t>(o.y);
            if (head < num_heads) {
                scalar_t* dst = out + ((long long)tok * num_heads + head) * ROPE_HEAD_DIM + i;
                dst[0] = o1;
                dst[HALF] = o2;
            } else if (slot >= 0) {
                cache_t* dst = k_cache + (slot * num_kv_heads + head - num_heads) * ROPE_HEAD_DIM + i;
                dst[0] = to_cache(to_float(o1), k_scale);
                dst[HALF] = to_cache(to_float(o2), k_scale);
            }
        } else if (slot >= 0) {
            cache_t* dst = v_cache + (slot * num_kv_heads + head - num_heads - num_kv_heads) * ROPE_HEAD_DIM + i;
            dst[0] = to_cache(to_float(a), v_scale);
            dst[HALF] = to_cache(to_float(b), v_scale);
        }
    }
#elif ACT
    for (int idx = threadIdx.x; idx < NT * 4 * 32; idx += WARPS * 32) {  // row tile 0: gate, 1: up
        const PairedSlot p = paired_slot(red, idx >> 5, idx & 31, row0, tok0);
        if (p.row < N && p.tok < M) {
            const scalar_t a = from_float<scalar_t>(Act::apply(to_float(from_float<scalar_t>(p.first))));
            out[(long long)p.tok * ldo + p.row] = from_float<scalar_t>(to_float(a) * to_float(from_float<scalar_t>(p.second)));
        }
    }
#else
    for (int idx = threadIdx.x; idx < RT * NT * 4 * 32; idx += WARPS * 32) {
        const int v = idx >> 5, l = idx & 31;
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) sum += red[wi][v][l];
        const int r = v / (NT * 4), t = (v >> 2) % NT, i = v & 3;
        const int row = row0 + 16 * r + (l >> 2) + 8 * (i >> 1);
        const int tok = tok0 + 8 * t + 2 * (l & 3) + (i & 1);
        if (row < N && tok < M) {
#if WCODE == 1 && GROUP == 0
            sum *= reinterpret_cast<const float*>(scales)[row];
#endif
            out[(long long)tok * ldo + row] = from_float<scalar_t>(sum);
        }
    }
#endif
}

// int4_dequant: W[N, Kout] = s * q + o from the int4 layout above (rows of `tile_rows`, or all rows):
// for prefill-sized M, where a tensor-core GEMM of the dequantized weight beats this kernel.
// Layout: grid = (rows, ceil(words per row / 256)), block = 256: one thread per 32-bit word (8 codes, two
// runs of 4 consecutive inputs). Bytes: N * K / 2 read, N * K * 2 written.
extern "C" __global__ void __launch_bounds__(256) int4_dequant_kernel(
    scalar_t* __restrict__ out, const unsigned* __restrict__ w, const __half2* __restrict__ sz,
    const long long* __restrict__ rows, int K, int Kout, int groups_per_row) {
    const int words_per_row = K / 8;
    const int wi = blockIdx.y * blockDim.x + threadIdx.x;
    forge_wait_prior_grid();  // PDL: rows may be the previous kernel's output (every thread waits: common.cuh)
    forge_allow_dependents();
    if (wi >= words_per_row) return;
    const long long row = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
    const unsigned word = w[row * words_per_row + wi];
    const int chunk = wi / 16, c = (wi % 16) / 4, m = wi % 4;
    scalar_t* dst = out + (long long)blockIdx.x * Kout;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // k-tile j = 2m + half: values 4 half .. 4 half + 3 of the word
        const int k = chunk * 128 + 16 * (2 * m + half) + 4 * c;
        if (k >= Kout) continue;
        const float2 so = __half22float2(sz[row * groups_per_row + k / GROUP]);
        Vec<scalar_t, 4> v;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int p = 2 * half + (i >> 1);  // pair p holds values 2p (bits 4p) and 2p + 1 (bits 16 + 4p)
            const unsigned q = (word >> (4 * p + 16 * (i & 1))) & 0xFu;
            v.v[i] = from_float<scalar_t>(so.x * (float)q + so.y);
        }
        store_vec<scalar_t, 4>(dst + k, v);
    }
}

// fp8_quantize_rows: the activations of an FP8 GEMM (torch._scaled_mm with row-wise scales), one launch:
// scale[m] = max(max_k |x[m, k]|, 448e-12) / 448, xq[m, k] = e4m3(x[m, k] / scale[m]) (saturating).
// Layout: grid = (M), block = 256: a row per block, 8 inputs per thread per step (one 16-byte load), read
// twice (max, then quantize: the second read hits L1/L2). Bytes: M * K * 2 read, M * K + 4 M written.
extern "C" __global__ void __launch_bounds__(256) fp8_quantize_rows_kernel(
    unsigned char* __restrict__ xq, float* __restrict__ scale, const scalar_t* __restrict__ x, int K, long long ldx) {
    __shared__ float scratch[8];
    const scalar_t* row = x + (long long)blockIdx.x * ldx;
    forge_wait_prior_grid();  // PDL: x is the previous kernel's output (common.cuh)
    forge_allow_dependents();
    float amax = 0.f;
    for (int k = threadIdx.x * 8; k < K; k += 256 * 8) {
        const Vec<scalar_t, 8> v = load_vec<scalar_t, 8>(row + k);
#pragma unroll
        for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(to_float(v.v[e])));
    }
    amax = warp_max(amax);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = warp_max((threadIdx.x & 31) < 8 ? scratch[threadIdx.x & 7] : 0.f);  // every warp: the block's max
    const float s = fmaxf(amax / 448.f, 1e-12f);
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    unsigned char* out = xq + (long long)blockIdx.x * K;
    for (int k = threadIdx.x * 8; k < K; k += 256 * 8) {
        const Vec<scalar_t, 8> v = load_vec<scalar_t, 8>(row + k);
        unsigned short q[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = make_float2(to_float(v.v[2 * e]) / s, to_float(v.v[2 * e + 1]) / s);
            q[e] = (unsigned short)__nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
        }
        *reinterpret_cast<uint2*>(out + k) = make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
    }
}
