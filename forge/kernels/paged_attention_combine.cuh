// Split-K combine for the paged decode kernels (included by paged_attention*.cu, which define
// scalar_t and HEAD_DIM).
#pragma once

// Merge the split partials: out = sum_s w_s o_s / sum_s w_s, w_s = l_s * 2^(m_s - max m).
// grid = (H, B), block = HEAD_DIM threads (one per output element); reads 4*(D + 2) bytes
// per split per head.
extern "C" __global__ void paged_decode_combine_kernel(scalar_t* __restrict__ out, const float* __restrict__ part_o,
                                                       const float* __restrict__ part_ml, int num_heads, int num_splits) {
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    const long long row = (long long)seq * num_heads + head;
    const float* ml = part_ml + row * num_splits * 2;
    float m = -INFINITY;
    for (int s = 0; s < num_splits; ++s)
        if (ml[2 * s + 1] > 0.f) m = fmaxf(m, ml[2 * s]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < num_splits; ++s) {
        const float l = ml[2 * s + 1];
        if (l > 0.f) {
            const float w = l * exp2f(ml[2 * s] - m);
            num = fmaf(w, part_o[(row * num_splits + s) * HEAD_DIM + d], num);
            den += w;
        }
    }
    out[row * HEAD_DIM + d] = from_float<scalar_t>(den > 0.f ? num / den : 0.f);
}
