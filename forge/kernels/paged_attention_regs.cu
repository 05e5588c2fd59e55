// Paged decode attention, register-prefetch variant (kept for comparison; the default is the
// cp.async pipelined kernel in paged_attention.cu). Same interface and split-K scheme.
//
//   q:            [B, H, D] scalar_t            H = Hkv * GROUP
//   k/v_cache:    [num_blocks, BLOCK_SIZE, Hkv, D] cache_t
//   block_tables: [B, >= max_blocks] int32 (row stride bt_stride), context_lens: [B] int32
//   out:          [B, H, D] scalar_t; rows with context_len == 0 get zeros.
//
// Layout: grid = (num_splits, Hkv, B), block = NUM_WARPS * 32 threads. A block takes one
// (sequence, kv head) and one contiguous chunk of that sequence's context
// (chunk = ceil(ctx / num_splits) rounded up to TILE tokens; computed on the device from
// context_lens, so any num_splits is correct and the launch shape depends on shapes only —
// graph-capturable). All GROUP query heads of the kv head are processed together, so every
// K/V vector is loaded once per kv head (GQA sharing). The chunk is walked in tiles of TILE
// tokens; per tile:
//   1. each thread issues the 16-byte V loads it will need for this tile (prefetch, overlaps
//      with the K loads and the softmax);
//   2. QK^T: TPT threads share one token (each holds D/TPT dims of the GROUP queries in
//      registers, pre-scaled by scale*log2(e)); partial dots are reduced with shuffles and the
//      GROUP logits of the tile go to shared memory;
//   3. online softmax in float32 (warp per head): tile max, p = exp2(s - m), running (m, l),
//      rescale factor alpha for the accumulators;
//   4. PV: thread (lane, c) owns 16-byte column chunk c of D and every NL-th token of the
//      tile; acc[h] = acc[h] * alpha[h] + sum p[h][t] * V[t, c].
// Logits and alphas are double-buffered, so a tile costs two __syncthreads.
// Epilogue: the NL token lanes are summed through shared memory. With num_splits == 1 the
// block writes out = acc / l directly; otherwise it writes the normalized partial output and
// (m, l) to float32 scratch [B, H, S, D] / [B, H, S, 2] and paged_decode_combine merges them.
//
// Bytes moved: K and V of every context token once per kv head: 2 * sum(ctx) * Hkv * D * size
// (+ q, out, block table and split scratch, all small). At batch 64 x 4096 tokens, Hkv = 8,
// D = 128, bf16 that is 1.07 GB: 365 us at 2.94 TB/s.
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
#define TILE 64
#endif

constexpr int THREADS = NUM_WARPS * 32;
constexpr int VEC = 16 / sizeof(cache_t);        // elements per 16-byte vector
constexpr int NVEC = HEAD_DIM / VEC;              // vectors per K/V row of one head
constexpr int VPT = NVEC / TPT;                   // vectors per thread per token (QK)
constexpr int NT = THREADS / TPT;                 // tokens per QK pass
constexpr int KPT = TILE / NT;                    // tokens per thread per tile (QK)
constexpr int NL = THREADS / NVEC;                // token lanes (PV)
constexpr int PV_THREADS = NL * NVEC;
constexpr int VPL = (TILE + NL - 1) / NL;         // tokens per lane per tile (PV)

static_assert(HEAD_DIM % VEC == 0, "head_dim must be a multiple of the 16-byte vector");
static_assert(NVEC % TPT == 0 && TPT <= 32 && (TPT & (TPT - 1)) == 0, "bad TPT");
static_assert(TILE % NT == 0 && TILE % 32 == 0, "bad TILE");
static_assert(NL >= 1, "head_dim too large for the block");
static_assert((BLOCK_SIZE & (BLOCK_SIZE - 1)) == 0, "block_size must be a power of two");

typedef Vec<cache_t, VEC> kv_vec;

__device__ __forceinline__ long long kv_offset(const int* __restrict__ bt_row, int tok, int num_kv_heads, int kvh) {
    const int block = __ldg(bt_row + tok / BLOCK_SIZE);
    return (((long long)block * BLOCK_SIZE + (tok & (BLOCK_SIZE - 1))) * num_kv_heads + kvh) * HEAD_DIM;
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) paged_decode_kernel(
    scalar_t* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
    const scalar_t* __restrict__ q, const cache_t* __restrict__ k_cache, const cache_t* __restrict__ v_cache,
    const int* __restrict__ block_tables, int bt_stride, const int* __restrict__ context_lens,
    int num_kv_heads, int num_splits, float scale_log2) {
    __shared__ float s_logits[2][GROUP][TILE];
    __shared__ float s_alpha[2][GROUP];
    __shared__ float s_m[GROUP], s_l[GROUP];
    __shared__ __align__(16) float s_red[NL * HEAD_DIM];

    const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int num_heads = num_kv_heads * GROUP;
    const int head0 = kvh * GROUP;

    const int ctx = context_lens[seq];
    int chunk = (ctx + num_splits - 1) / num_splits;
    chunk = (chunk + TILE - 1) / TILE * TILE;
    const int start = split * chunk;
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
            for (int e = 0; e < VEC; ++e) qf[h][j][e] = to_float(qh[(j * TPT + lig) * VEC + e]) * scale_log2;
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
    __syncthreads();

    int buf = 0;
    for (int tile0 = start; tile0 < end; tile0 += TILE, buf ^= 1) {
        // 1. prefetch V for this tile
        kv_vec vv[VPL];
        if (pv_active) {
#pragma unroll
            for (int k = 0; k < VPL; ++k) {
                const int tt = k * NL + pv_lane;
                const int tok = tile0 + tt;
                if (tt < TILE && tok < end)
                    vv[k] = load_vec_stream<cache_t, VEC>(v_cache + kv_offset(bt_row, tok, num_kv_heads, kvh) + pv_c * VEC);
            }
        }
        // 2. QK^T
        kv_vec kk[KPT][VPT];
#pragma unroll
        for (int k = 0; k < KPT; ++k) {
            const int tok = tile0 + k * NT + g;
            if (tok < end) {
                const cache_t* kp = k_cache + kv_offset(bt_row, tok, num_kv_heads, kvh);
#pragma unroll
                for (int j = 0; j < VPT; ++j) kk[k][j] = load_vec_stream<cache_t, VEC>(kp + (j * TPT + lig) * VEC);
            }
        }
#pragma unroll
        for (int k = 0; k < KPT; ++k) {
            const int tok = tile0 + k * NT + g;
            float dot[GROUP];
#pragma unroll
            for (int h = 0; h < GROUP; ++h) dot[h] = 0.f;
#pragma unroll
            for (int j = 0; j < VPT; ++j)
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float kf = to_float(kk[k][j].v[e]);
#pragma unroll
                    for (int h = 0; h < GROUP; ++h) dot[h] = fmaf(qf[h][j][e], kf, dot[h]);
                }
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
#pragma unroll
                for (int o = TPT / 2; o > 0; o >>= 1) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], o);
                if (lig == h % TPT) s_logits[buf][h][k * NT + g] = tok < end ? dot[h] : -INFINITY;
            }
        }
        __syncthreads();
        // 3. online softmax, one warp per head
        for (int h = warp; h < GROUP; h += NUM_WARPS) {
            float vals[TILE / 32];
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < TILE / 32; ++i) {
                vals[i] = s_logits[buf][h][lane + 32 * i];
                mx = fmaxf(mx, vals[i]);
            }
            mx = warp_max(mx);
            const float m_old = s_m[h];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < TILE / 32; ++i) {
                const float p = exp2f(vals[i] - m_new);
                s_logits[buf][h][lane + 32 * i] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                s_alpha[buf][h] = alpha;
                s_m[h] = m_new;
                s_l[h] = s_l[h] * alpha + sum;
            }
        }
        __syncthreads();
        // 4. PV
        if (pv_active) {
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                const float a = s_alpha[buf][h];
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[h][e] *= a;
            }
#pragma unroll
            for (int k = 0; k < VPL; ++k) {
                const int tt = k * NL + pv_lane;
                if (tt < TILE && tile0 + tt < end) {
                    float vf[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) vf[e] = to_float(vv[k].v[e]);
#pragma unroll
                    for (int h = 0; h < GROUP; ++h) {
                        const float p = s_logits[buf][h][tt];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
                    }
                }
            }
        }
    }

    // Epilogue: sum the NL token lanes of each head, normalize, write.
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        __syncthreads();
        if (pv_active) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) s_red[pv_lane * HEAD_DIM + pv_c * VEC + e] = acc[h][e];
        }
        __syncthreads();
        const float l = s_l[h];
        const float inv_l = l > 0.f ? 1.f / l : 0.f;
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
