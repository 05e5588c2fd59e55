// Paged decode attention (one query token per sequence) with split-K ("flash-decoding"),
// K/V streamed into shared memory by a cp.async double-buffered pipeline.
//
//   q:            [B, H, D] scalar_t            H = Hkv * GROUP
//   k/v_cache:    [num_blocks, BLOCK_SIZE, Hkv, D] cache_t
//   block_tables: [B, >= max_blocks] int32 (row stride bt_stride), context_lens: [B] int32
//   out:          [B, H, D] scalar_t; rows with context_len == 0 get zeros.
//   window:       > 0: the query (position ctx - 1) sees only the last `window` keys, ctx - window .. ctx - 1
//                 (a sliding-window layer); 0: the whole context.
//   soft_cap:     > 0: scores become soft_cap * tanh(scores / soft_cap) before the softmax (Gemma 2);
//                 q_scale then multiplies q by the attention scale only, else by scale * log2(e).
//   float8 cache: (FORGE_CACHE_DTYPE 3, e4m3) holds k / k_scale and v / v_scale. The launcher folds
//                 k_scale into q_scale (a score is q_scale * q.k, k as stored) and the kernel
//                 multiplies the output by v_scale (with 1/l): no per-element scaling. v_scale is 1
//                 for the other caches.
//
// Layout: grid = (num_splits, Hkv, B), block = NUM_WARPS * 32 threads. A block takes one
// (sequence, kv head) and one contiguous chunk of that sequence's context
// (chunk = ceil(ctx / num_splits) rounded up to 64 tokens; computed on the device from
// context_lens, so any num_splits is correct and the launch shape depends on shapes only —
// graph-capturable). All GROUP query heads of the kv head are processed together, so every
// K/V vector is read from HBM once per kv head (GQA sharing).
//
// The chunk is walked in tiles of TILE tokens. STAGES shared-memory buffers hold the K and V
// rows of consecutive tiles; tile i+STAGES-1 is requested with 16-byte cp.async copies (L2
// only, zero-filled past the end) while tile i is computed, so HBM traffic overlaps the math
// and no registers are spent on loads in flight. Per tile:
//   1. QK^T: TPT threads share one token (each holds D/TPT dims of the GROUP queries in
//      registers, pre-scaled by scale*log2(e)); partial dots are reduced with shuffles and the
//      GROUP logits of the tile go to shared memory;
//   2. online softmax in float32 (warp per head): tile max, p = exp2(s - m), running (m, l),
//      rescale factor alpha for the accumulators;
//   3. PV: thread (lane, c) owns column vector c (VEC elements) of D and every NL-th token of the
//      tile; acc[h] = acc[h] * alpha[h] + sum_t p[h][t] * V[t, c].
// Epilogue: the NL token lanes are summed through shared memory (reusing the K buffers). With
// num_splits == 1 the block writes out = acc / l directly; otherwise it writes the normalized
// partial output and (m, l) to float32 scratch [B, H, S, D] / [B, H, S, 2] and
// paged_decode_combine_kernel merges them.
//
// Bytes moved: K and V of every visible context token once per kv head: 2 * sum(min(ctx, window)) * Hkv * D * size
// (+ q, out, block table and split scratch, all small). At batch 64 x 4096 tokens, Hkv = 8,
// D = 128, bf16 that is 1.07 GB: 365 us at 2.94 TB/s; a float8 cache moves half.
//
// float8: a 16-byte cp.async copy brings 16 elements, but the math keeps bf16's thread layout
// (vectors of VEC = 8 elements, here 8 bytes): the same registers for q slices and accumulators,
// twice the tile (TILE 64 instead of 32) in the same shared memory. Elements become floats two at a
// time (cvt e4m3x2 -> f16x2, exact).
#include "common.cuh"

#ifndef FORGE_CACHE_DTYPE
#define FORGE_CACHE_DTYPE FORGE_DTYPE
#endif
typedef DtypeOf<FORGE_CACHE_DTYPE>::type cache_t;

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP
#define GROUP 4
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef NUM_WARPS
#define NUM_WARPS 4
#endif
#ifndef TPT
#define TPT 8
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1
#endif
#ifndef TILE
#define TILE 32
#endif
#ifndef STAGES
#define STAGES 2
#endif

constexpr int THREADS = NUM_WARPS * 32;
constexpr float LOG2E_F = 1.4426950408889634f;
constexpr int VEC = FORGE_FP8 ? 8 : 16 / sizeof(cache_t);  // elements per vector of the math (16 bytes; fp8: 8)
constexpr int NVEC = HEAD_DIM / VEC;              // vectors per K/V row of one head
constexpr int CHUNK = 16 / sizeof(cache_t);       // elements per 16-byte cp.async copy (VEC, or 2 VEC in fp8)
constexpr int NCHUNK = HEAD_DIM / CHUNK;          // copies per K/V row of one head
constexpr int VPT = NVEC / TPT;                   // vectors per thread per token (QK)
constexpr int NT = THREADS / TPT;                 // tokens per QK pass
constexpr int KPT = TILE / NT;                    // tokens per thread per tile (QK)
constexpr int NL = THREADS / NVEC;                // token lanes (PV)
constexpr int PV_THREADS = NL * NVEC;
constexpr int VPL = (TILE + NL - 1) / NL;         // tokens per lane per tile (PV)
constexpr int TILE_CHUNKS = TILE * NCHUNK;        // 16-byte copies per tile (K or V)
constexpr int CPT = (TILE_CHUNKS + THREADS - 1) / THREADS;
constexpr int SPL = (TILE + 31) / 32;             // softmax values per lane
constexpr int GP = (GROUP + 3) / 4 * 4;           // s_p row: the GROUP probabilities of a token, 16-byte aligned

static_assert(HEAD_DIM % CHUNK == 0 && CHUNK % VEC == 0, "head_dim must be a multiple of the 16-byte vector");
static_assert(NVEC % TPT == 0 && TPT <= 32 && (TPT & (TPT - 1)) == 0, "bad TPT");
static_assert(KPT >= 1 && TILE % NT == 0, "bad TILE");
static_assert(NL >= 1, "head_dim too large for the block");
static_assert((BLOCK_SIZE & (BLOCK_SIZE - 1)) == 0, "block_size must be a power of two");
static_assert(STAGES >= 2, "need at least double buffering");
// The epilogue's s_red (NL x HEAD_DIM floats) reuses s_k; a stage of s_k is padded where it would not fit
// (float8 at small head_dim), else it is exactly one tile.
constexpr int RED_BYTES = NL * HEAD_DIM * (int)sizeof(float);
constexpr int STAGE_ELEMS = STAGES * TILE * HEAD_DIM * (int)sizeof(cache_t) >= RED_BYTES
                                ? TILE * HEAD_DIM
                                : (RED_BYTES / STAGES + 15) / 16 * 16 / (int)sizeof(cache_t);
static_assert(STAGES * STAGE_ELEMS * sizeof(cache_t) >= RED_BYTES, "s_red reuses s_k");

typedef Vec<cache_t, VEC> kv_vec;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int n = pred ? 16 : 0;  // 0: no global read, the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) paged_decode_kernel(
    scalar_t* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
    const scalar_t* __restrict__ q, const cache_t* __restrict__ k_cache, const cache_t* __restrict__ v_cache,
    const int* __restrict__ block_tables, int bt_stride, const int* __restrict__ context_lens,
    int num_kv_heads, int num_splits, float q_scale, int window, float soft_cap, float v_scale) {
    __shared__ __align__(16) cache_t s_k[STAGES][STAGE_ELEMS];
    __shared__ __align__(16) cache_t s_v[STAGES][TILE * HEAD_DIM];
    __shared__ __align__(16) float s_p[TILE][GP];  // logits, then probabilities, of the tile
    __shared__ float s_alpha[GROUP];
    __shared__ float s_m[GROUP], s_l[GROUP];

    const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int num_heads = num_kv_heads * GROUP;
    const int head0 = kvh * GROUP;
    forge_wait_prior_grid();  // PDL: q (and the cache) come from the previous kernel (common.cuh)
    forge_allow_dependents();

    const int ctx = context_lens[seq];
    const int first = window > 0 ? max(0, ctx - window) : 0;  // the first key the query sees
    int chunk = (ctx - first + num_splits - 1) / num_splits;
    chunk = (chunk + 63) / 64 * 64;
    const int start = first + split * chunk;
    const int end = min(start + chunk, ctx);

    if (num_splits > 1 && start >= end) {  // empty split: weight 0 in the combine
        if (tid < GROUP) {
            const long long idx = ((long long)seq * num_heads + head0 + tid) * num_splits + split;
            part_ml[idx * 2] = -INFINITY;
            part_ml[idx * 2 + 1] = 0.f;
        }
        return;
    }

    const int* bt_row = block_tables + (long long)seq * bt_stride;
    const int n_tiles = (end - start + TILE - 1) / TILE;  // 0 when ctx == 0

    // Request the K and V rows of tile `it` into stage it % STAGES.
    auto issue = [&](int it) {
        const int tile0 = start + it * TILE;
        const int stage = it % STAGES;
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
            const int c = tid + i * THREADS;
            if (TILE_CHUNKS % THREADS == 0 || c < TILE_CHUNKS) {
                const int tt = c / NCHUNK, part = c % NCHUNK;
                const int tok = tile0 + tt;
                const bool ok = tok < end;
                long long off = 0;
                if (ok) {
                    const int block = __ldg(bt_row + tok / BLOCK_SIZE);
                    off = (((long long)block * BLOCK_SIZE + (tok & (BLOCK_SIZE - 1))) * num_kv_heads + kvh) * HEAD_DIM +
                          part * CHUNK;
                }
                cp_async16(&s_k[stage][tt * HEAD_DIM + part * CHUNK], k_cache + off, ok);
                cp_async16(&s_v[stage][tt * HEAD_DIM + part * CHUNK], v_cache + off, ok);
            }
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles) issue(s);
        cp_async_commit();
    }

    // QK role: token group g (TPT threads), lane-in-group lig. PV role: token lane, column chunk.
    const int g = tid / TPT, lig = tid % TPT;
    const int pv_lane = tid / NVEC, pv_c = tid % NVEC;
    const bool pv_active = tid < PV_THREADS;

    float qf[GROUP][VPT][VEC];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        const scalar_t* qh = q + ((long long)seq * num_heads + head0 + h) * HEAD_DIM;
#pragma unroll
        for (int j = 0; j < VPT; ++j)
#pragma unroll
            for (int e = 0; e < VEC; ++e) qf[h][j][e] = to_float(qh[(j * TPT + lig) * VEC + e]) * q_scale;
    }

    float acc[GROUP][VEC];
#pragma unroll
    for (int h = 0; h < GROUP; ++h)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[h][e] = 0.f;

    if (tid < GROUP) {
        s_m[tid] = -INFINITY;
        s_l[tid] = 0.f;
    }

    for (int it = 0; it < n_tiles; ++it) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of tile `it` have landed
        __syncthreads();              // ... everyone's; and everyone is done with tile it-1
        if (it + STAGES - 1 < n_tiles) issue(it + STAGES - 1);  // into the stage of tile it-1
        cp_async_commit();

        const int tile0 = start + it * TILE;
        const cache_t* sk = s_k[it % STAGES];
        const cache_t* sv = s_v[it % STAGES];
        // 1. QK^T
#pragma unroll
        for (int k = 0; k < KPT; ++k) {
            const int tt = k * NT + g;
            kv_vec kk[VPT];
#pragma unroll
            for (int j = 0; j < VPT; ++j) kk[j] = *reinterpret_cast<const kv_vec*>(sk + tt * HEAD_DIM + (j * TPT + lig) * VEC);
            float dot[GROUP];
#pragma unroll
            for (int h = 0; h < GROUP; ++h) dot[h] = 0.f;
#pragma unroll
            for (int j = 0; j < VPT; ++j) {
                float kf[VEC];
                if (FORGE_FP8) vec_to_float(kk[j], kf);  // (fp8: in pairs; others: each element as it is used)
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    if (!FORGE_FP8) kf[e] = to_float(kk[j].v[e]);
#pragma unroll
                    for (int h = 0; h < GROUP; ++h) dot[h] = fmaf(qf[h][j][e], kf[e], dot[h]);
                }
            }
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
#pragma unroll
                for (int o = TPT / 2; o > 0; o >>= 1) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], o);
                if (soft_cap > 0.f) dot[h] = soft_cap * LOG2E_F * tanhf(dot[h] / soft_cap);  // (log2 units, as exp2 wants)
                if (lig == h % TPT) s_p[tt][h] = tile0 + tt < end ? dot[h] : -INFINITY;
            }
        }
        __syncthreads();
        // 2. online softmax, one warp per head
        for (int h = warp; h < GROUP; h += NUM_WARPS) {
            float vals[SPL];
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int t = lane + 32 * i;
                vals[i] = t < TILE ? s_p[t][h] : -INFINITY;
                mx = fmaxf(mx, vals[i]);
            }
            mx = warp_max(mx);
            const float m_old = s_m[h];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int t = lane + 32 * i;
                const float p = exp2f(vals[i] - m_new);
                if (t < TILE) s_p[t][h] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                s_alpha[h] = alpha;
                s_m[h] = m_new;
                s_l[h] = s_l[h] * alpha + sum;
            }
        }
        __syncthreads();
        // 3. PV
        if (pv_active) {
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                const float a = s_alpha[h];
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[h][e] *= a;
            }
#pragma unroll
            for (int k = 0; k < VPL; ++k) {
                const int tt = k * NL + pv_lane;
                if (tt < TILE && tile0 + tt < end) {
                    const kv_vec vv = *reinterpret_cast<const kv_vec*>(sv + tt * HEAD_DIM + pv_c * VEC);
                    float vf[VEC];
                    vec_to_float(vv, vf);
                    float pr[GP];  // one 16-byte shared load per 4 heads
#pragma unroll
                    for (int i = 0; i < GP; i += 4) *reinterpret_cast<float4*>(&pr[i]) = *reinterpret_cast<const float4*>(&s_p[tt][i]);
#pragma unroll
                    for (int h = 0; h < GROUP; ++h) {
                        const float p = pr[h];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();  // no copy may land in s_k while it is reused below

    // Epilogue: sum the NL token lanes of each head, normalize, write. s_k is free now.
    float* s_red = reinterpret_cast<float*>(&s_k[0][0]);
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        __syncthreads();
        if (pv_active) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) s_red[pv_lane * HEAD_DIM + pv_c * VEC + e] = acc[h][e];
        }
        __syncthreads();
        const float l = s_l[h];
        const float inv_l = l > 0.f ? (FORGE_FP8 ? v_scale / l : 1.f / l) : 0.f;
        const long long row = (long long)seq * num_heads + head0 + h;
        for (int d = tid; d < HEAD_DIM; d += THREADS) {
            float o = 0.f;
#pragma unroll
            for (int ln = 0; ln < NL; ++ln) o += s_red[ln * HEAD_DIM + d];
            o *= inv_l;
            if (num_splits == 1) {
                out[row * HEAD_DIM + d] = from_float<scalar_t>(o);
            } else {
                part_o[(row * num_splits + split) * HEAD_DIM + d] = o;
            }
        }
        if (num_splits > 1 && tid == 0) {
            const long long idx = row * num_splits + split;
            part_ml[idx * 2] = s_m[h];
            part_ml[idx * 2 + 1] = l;
        }
    }
}

#include "paged_attention_combine.cuh"
