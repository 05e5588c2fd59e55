// Split-K combine for the paged decode kernels (included by paged_attention*.cu, which define
// scalar_t and HEAD_DIM).
//
// out = sum_s w_s o_s / sum_s w_s, w_s = l_s * 2^(m_s - max m) over the splits with l_s > 0
// (empty splits carry l = 0; a row with no context gets zeros).
// grid = (H, B), block = HEAD_DIM threads (one per output element). The (m, l) pairs of all
// splits are loaded in parallel into shared memory and turned into weights once; the partial
// outputs are then read with the split loop unrolled so that many loads are in flight (a
// serial loop here costs one memory latency per split). Reads 4 * (D + 2) bytes per split
// per head.
#pragma once

#define COMBINE_MAX_SPLITS 256

extern "C" __global__ void paged_decode_combine_kernel(scalar_t* __restrict__ out, const float* __restrict__ part_o,
                                                       const float* __restrict__ part_ml, int num_heads, int num_splits) {
    __shared__ float s_w[COMBINE_MAX_SPLITS];
    __shared__ float s_red[32];
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    const long long row = (long long)seq * num_heads + head;
    forge_wait_prior_grid();  // PDL: the partial results are the decode kernel's (common.cuh)
    forge_allow_dependents();
    const float* ml = part_ml + row * num_splits * 2;
    // 1. max of m over the non-empty splits
    float m = -INFINITY;
    for (int s = d; s < num_splits; s += blockDim.x) {
        const float l = ml[2 * s + 1];
        const float ms = ml[2 * s];
        s_w[s] = l;  // stash l
        if (l > 0.f) m = fmaxf(m, ms);
    }
    m = warp_max(m);
    if ((d & 31) == 0) s_red[d >> 5] = m;
    __syncthreads();
    m = -INFINITY;
    for (int w = 0; w < (int)((blockDim.x + 31) >> 5); ++w) m = fmaxf(m, s_red[w]);
    // 2. weights
    for (int s = d; s < num_splits; s += blockDim.x) {
        const float l = s_w[s];
        s_w[s] = l > 0.f ? l * exp2f(ml[2 * s] - m) : 0.f;
    }
    __syncthreads();
    // 3. weighted sum of the partial outputs
    const float* po = part_o + row * num_splits * HEAD_DIM + d;
    float num = 0.f, den = 0.f;
#pragma unroll 8
    for (int s = 0; s < num_splits; ++s) {
        const float w = s_w[s];
        den += w;
        if (w > 0.f) num = fmaf(w, po[(long long)s * HEAD_DIM], num);
    }
    out[row * HEAD_DIM + d] = from_float<scalar_t>(den > 0.f ? num / den : 0.f);
}
