// Mixture-of-experts for decode-sized steps: routing, sorting by expert, and the experts computed expert
// by expert, so each picked expert's weights are read once whatever the number of its tokens
// (forge.ops.moe has the math and the CPU reference; large bfloat16 steps use grouped GEMMs instead).
//
// moe_route_kernel:  logits [T, E] -> weights [T, k] float32, ids [T, k] int64
//   softmax over the E experts in float32, the k largest (ties: the lower expert id), optionally
//   renormalized to sum to 1. grid = ceil(T / 4), block = 4 warps, one warp per token; each lane
//   holds experts lane, lane + 32, ... (PER_LANE = ceil(E / 32) registers). Bytes: T E logits.
// moe_align_kernel:  ids [P = T k] -> order [P] (pair indices sorted by expert, stably), ends [E] int32
//   (end of each expert's pairs in that order), sorted_expert [P] int32. One block of 1024 threads:
//   a histogram in shared memory, a prefix sum, then each pair's place = its expert's start + the
//   number of earlier pairs of the same expert (O(P^2 / 1024): for P <= MAX_ALIGN_PAIRS).
// moe_gate_up_kernel:  act[p, i] = silu(gate_e[i] . x[t]) * (up_e[i] . x[t])     act [P, I]
//   grid = (ceil(I / WARPS), P), block = WARPS warps. Block (b, j) works only if j is the first sorted
//   pair of its expert e (other blocks exit at once; the grid is fixed, so a CUDA graph replays it):
//   warp w owns row i = b WARPS + w of e's gate and up matrices and walks e's pairs MAX_PAIRS at a
//   time; per step of 32 VEC columns each lane streams 16 bytes of the gate row and of the up row
//   (no L1 allocation: read once) and multiplies them with the same columns of each pair's x row
//   (L1-resident: shared by the block's warps).
// moe_down_kernel:  y[p, h] = weights[p] * round(down_e[h] . act[p])               y [P, H] float32
//   grid = (ceil(H / (WARPS ROWS)), P): the same walk, ROWS rows of down per warp (I is short: more
//   independent 16-byte loads in flight per warp).
// moe_sum_kernel:  out[t, h] = sum over slots of y[t k + slot, h]                  out [T, H]
//   grid = (T, ceil(H / 256)), 256 threads; the k slots summed in order (no atomics: a token's
//   result does not depend on its batch).
//
// Bytes moved (decode, P pairs over D distinct experts): 3 H I D weight elements, each read once per
// MAX_PAIRS pairs of its expert (once at decode), + T H x + 2 P I act + P H y (float32) + T H out. At
// Qwen3-30B-A3B's layer (H 2048, I 768, k 8), T = 1: 8 experts = 75.5 MB of bf16 weights against
// ~0.1 MB of activations: a GEMV at HBM bandwidth.
// Arithmetic in float32; the GEMM outputs are rounded to scalar_t where the reference (F.linear then
// silu_mul) rounds them: gate, up, silu(gate), silu(gate) * up, and the down projection.
#include "common.cuh"

#ifndef VEC
#define VEC ((int)(16 / sizeof(scalar_t)))
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef ROWS
#define ROWS 4
#endif
#ifndef MAX_PAIRS
#define MAX_PAIRS 8
#endif
#ifndef PER_LANE
#define PER_LANE 4
#endif

__device__ __forceinline__ float round_to_scalar(float v) { return to_float(from_float<scalar_t>(v)); }

// A weight vector read once: 16-byte streaming loads that leave L1 to the activations.
__device__ __forceinline__ Vec<scalar_t, VEC> load_weights(const scalar_t* __restrict__ p) {
#if VEC * (FORGE_DTYPE == 0 ? 4 : 2) == 16
    return load_vec_stream<scalar_t, VEC>(p);
#else
    return load_vec<scalar_t, VEC>(p);
#endif
}

extern "C" __global__ void __launch_bounds__(128) moe_route_kernel(
    float* __restrict__ weights, long long* __restrict__ ids, const scalar_t* __restrict__ logits, int num_tokens,
    int num_experts, int top_k, int normalize) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * 4 + (threadIdx.x >> 5);
    forge_wait_prior_grid();  // PDL: the router logits are the previous kernel's (every thread waits: common.cuh)
    forge_allow_dependents();
    if (t >= num_tokens) return;
    float v[PER_LANE];
    float max_logit = -INFINITY;
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        const int e = r * 32 + lane;
        v[r] = e < num_experts ? to_float(logits[(long long)t * num_experts + e]) : -INFINITY;
        max_logit = fmaxf(max_logit, v[r]);
    }
    max_logit = warp_max(max_logit);
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        v[r] = r * 32 + lane < num_experts ? expf(v[r] - max_logit) : -1.f;  // (-1: not an expert, or taken)
        sum += fmaxf(v[r], 0.f);
    }
    sum = warp_sum(sum);
    float picked_sum = 0.f, mine = 0.f;  // lane s keeps pick s's probability
    int mine_id = 0;
    for (int s = 0; s < top_k; ++s) {
        float best = -0.5f;  // (below every probability, above -1)
        int best_e = 0x7fffffff;
#pragma unroll
        for (int r = 0; r < PER_LANE; ++r) {
            if (v[r] > best) { best = v[r]; best_e = r * 32 + lane; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {  // warp argmax, the lower expert id on ties
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
            if (ob > best || (ob == best && oe < best_e)) { best = ob; best_e = oe; }
        }
#pragma unroll
        for (int r = 0; r < PER_LANE; ++r) {
            if (r * 32 + lane == best_e) v[r] = -1.f;
        }
        const float prob = best / sum;
        picked_sum += prob;
        if (lane == s) { mine = prob; mine_id = best_e; }
    }
    if (lane < top_k) {
        weights[(long long)t * top_k + lane] = normalize ? mine / picked_sum : mine;
        ids[(long long)t * top_k + lane] = mine_id;
    }
}

extern "C" __global__ void __launch_bounds__(1024) moe_align_kernel(
    long long* __restrict__ order, int* __restrict__ ends, int* __restrict__ sorted_expert,
    const long long* __restrict__ ids, int num_pairs, int num_experts) {
    extern __shared__ int start[];  // [num_experts]
    forge_wait_prior_grid();  // PDL: ids are the route kernel's (every thread waits: common.cuh)
    forge_allow_dependents();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) start[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) atomicAdd(&start[ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {  // counts -> starts; ends = the next expert's start
        int total = 0;
        for (int e = 0; e < num_experts; ++e) {
            const int count = start[e];
            start[e] = total;
            total += count;
            ends[e] = total;
        }
    }
    __syncthreads();
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
        const long long e = ids[p];
        int rank = 0;
        for (int q = 0; q < p; ++q) rank += ids[q] == e;
        order[start[e] + rank] = p;
        sorted_expert[start[e] + rank] = (int)e;
    }
}

// The expert of sorted pair j and the range of its pairs, or -1 when j is not the first of its expert.
__device__ __forceinline__ int expert_of_block(const int* __restrict__ sorted_expert, const int* __restrict__ ends,
                                               int j, int* end) {
    const int e = sorted_expert[j];
    if (j > 0 && sorted_expert[j - 1] == e) return -1;
    *end = ends[e];
    return e;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) moe_gate_up_kernel(
    scalar_t* __restrict__ act, const scalar_t* __restrict__ x, const long long* __restrict__ order,
    const int* __restrict__ ends, const int* __restrict__ sorted_expert, const scalar_t* __restrict__ gate_up,
    int hidden, int inter, int top_k) {
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.x * WARPS + (threadIdx.x >> 5);
    forge_wait_prior_grid();  // PDL: the sorted pairs are the align kernel's (every thread waits: common.cuh)
    forge_allow_dependents();
    int end;
    const int e = expert_of_block(sorted_expert, ends, blockIdx.y, &end);
    if (e < 0 || i >= inter) return;  // (whole warps return together)
    const scalar_t* g_row = gate_up + ((long long)e * 2 * inter + i) * hidden;
    const scalar_t* u_row = g_row + (long long)inter * hidden;
    for (int base = blockIdx.y; base < end; base += MAX_PAIRS) {
        const int n = min(MAX_PAIRS, end - base);
        long long pair[MAX_PAIRS];
        const scalar_t* x_row[MAX_PAIRS];
        float acc_g[MAX_PAIRS], acc_u[MAX_PAIRS];
#pragma unroll
        for (int m = 0; m < MAX_PAIRS; ++m) {
            pair[m] = m < n ? order[base + m] : 0;
            x_row[m] = x + (pair[m] / top_k) * hidden;
            acc_g[m] = acc_u[m] = 0.f;
        }
#pragma unroll 4
        for (int c = lane * VEC; c < hidden; c += 32 * VEC) {
            const Vec<scalar_t, VEC> g = load_weights(g_row + c);
            const Vec<scalar_t, VEC> u = load_weights(u_row + c);
#pragma unroll
            for (int m = 0; m < MAX_PAIRS; ++m) {
                if (m < n) {
                    const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x_row[m] + c);
#pragma unroll
                    for (int v = 0; v < VEC; ++v) {
                        const float xf = to_float(xv.v[v]);
                        acc_g[m] += to_float(g.v[v]) * xf;
                        acc_u[m] += to_float(u.v[v]) * xf;
                    }
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MAX_PAIRS; ++m) {
            if (m < n) {
                const float gate = round_to_scalar(warp_sum(acc_g[m]));
                const float up = round_to_scalar(warp_sum(acc_u[m]));
                if (lane == 0) {
                    const float silu = round_to_scalar(gate / (1.f + expf(-gate)));
                    act[pair[m] * inter + i] = from_float<scalar_t>(silu * up);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) moe_down_kernel(
    float* __restrict__ y, const scalar_t* __restrict__ act, const long long* __restrict__ order,
    const int* __restrict__ ends, const int* __restrict__ sorted_expert, const scalar_t* __restrict__ down,
    const float* __restrict__ weights, int hidden, int inter) {
    const int lane = threadIdx.x & 31;
    const int h0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
    forge_wait_prior_grid();  // PDL: act is the gate_up kernel's (every thread waits: common.cuh)
    forge_allow_dependents();
    int end;
    const int e = expert_of_block(sorted_expert, ends, blockIdx.y, &end);
    if (e < 0 || h0 >= hidden) return;
    const scalar_t* d_rows = down + ((long long)e * hidden + h0) * inter;
    const int rows = min(ROWS, hidden - h0);
    for (int base = blockIdx.y; base < end; base += MAX_PAIRS) {
        const int n = min(MAX_PAIRS, end - base);
        long long pair[MAX_PAIRS];
        float acc[ROWS][MAX_PAIRS];
#pragma unroll
        for (int m = 0; m < MAX_PAIRS; ++m) {
            pair[m] = m < n ? order[base + m] : 0;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r][m] = 0.f;
        }
#pragma unroll 2
        for (int c = lane * VEC; c < inter; c += 32 * VEC) {
            Vec<scalar_t, VEC> d[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (r < rows) d[r] = load_weights(d_rows + (long long)r * inter + c);
            }
#pragma unroll
            for (int m = 0; m < MAX_PAIRS; ++m) {
                if (m < n) {
                    const Vec<scalar_t, VEC> a = load_vec<scalar_t, VEC>(act + pair[m] * inter + c);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        if (r < rows) {
#pragma unroll
                            for (int v = 0; v < VEC; ++v) acc[r][m] += to_float(d[r].v[v]) * to_float(a.v[v]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MAX_PAIRS; ++m) {
            if (m < n) {
                const float w = weights[pair[m]];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    if (r < rows) {
                        const float sum = round_to_scalar(warp_sum(acc[r][m]));
                        if (lane == 0) y[pair[m] * hidden + h0 + r] = sum * w;
                    }
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) moe_sum_kernel(
    scalar_t* __restrict__ out, const float* __restrict__ y, int hidden, int top_k) {
    const long long t = blockIdx.x;
    const int h = blockIdx.y * blockDim.x + threadIdx.x;
    forge_wait_prior_grid();  // PDL: y is the down kernel's (every thread waits: common.cuh)
    forge_allow_dependents();
    if (h >= hidden) return;
    float sum = 0.f;
    for (int slot = 0; slot < top_k; ++slot) sum += y[(t * top_k + slot) * hidden + h];
    out[t * hidden + h] = from_float<scalar_t>(sum);
}
