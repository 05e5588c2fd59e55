// qkv_rope_cache: split the fused QKV GEMM output, apply neox-style RoPE to q and k, write the
// rotated k and v into the paged KV cache, and return q.  One launch for the whole step.
//
//   qkv:          [T, (H + 2*Hkv) * D]   scalar_t, rows contiguous (row stride passed)
//   positions:    [T] int64
//   cos_sin:      [max_pos, D] float32: cos in columns [0, D/2), sin in [D/2, D)
//   k/v_cache:    [num_blocks, block_size, Hkv, D]  cache_t, contiguous
//   slot_mapping: [T] int64 flat slot = block * block_size + offset; slot < 0: no cache write
//   q_out:        [T, H, D]  scalar_t
//   k/v_scale:    float8 cache (FORGE_CACHE_DTYPE 3): it stores k / k_scale and v / v_scale, rounded
//                 to nearest even and saturated to +-448, from k (rotated, rounded to scalar_t) and v;
//                 other caches store k and v and ignore the scales.
//
// neox / HF rotate_half: for i < D/2, x1 = x[i], x2 = x[i + D/2]:
//   out[i] = x1*cos_i - x2*sin_i,  out[i + D/2] = x2*cos_i + x1*sin_i   (float32, one rounding)
//
// Layout: grid = (T), block = min(1024, round_up((H + 2*Hkv) * D/2 / VEC, 32)) threads looping
// over the work items of the token. A work item is (head, VEC consecutive pairs): it loads VEC
// elements of the first half and VEC of the second half (16-byte loads when VEC * size = 16),
// and the matching VEC cos and VEC sin floats. Heads [0, H) are q, [H, H+Hkv) k, the rest v
// (v is copied, not rotated).
//
// Bytes moved per token: read (H + 2*Hkv)*D elements + D floats of cos/sin (L2-resident),
// write H*D (q) + 2*Hkv*D (cache) elements (cache elements: 1 byte each in float8).
#include "common.cuh"

#ifndef FORGE_CACHE_DTYPE
#define FORGE_CACHE_DTYPE FORGE_DTYPE
#endif
typedef DtypeOf<FORGE_CACHE_DTYPE>::type cache_t;

// A value as the cache stores it.
__device__ __forceinline__ cache_t to_cache(float x, float scale) {
#if FORGE_FP8
    return from_float<cache_t>(x / scale);  // (IEEE division: equals torch's x / scale)
#else
    return from_float<cache_t>(x);
#endif
}

#ifndef VEC
#define VEC 1
#endif

extern "C" __global__ void qkv_rope_cache_kernel(
    scalar_t* __restrict__ q_out, cache_t* __restrict__ k_cache, cache_t* __restrict__ v_cache,
    const scalar_t* __restrict__ qkv, const long long* __restrict__ positions,
    const float* __restrict__ cos_sin, const long long* __restrict__ slot_mapping,
    long long qkv_row_stride, int num_heads, int num_kv_heads, int head_dim, float k_scale, float v_scale) {
    const long long t = blockIdx.x;
    const int half = head_dim >> 1;
    const int items_per_head = half / VEC;
    const int total_heads = num_heads + 2 * num_kv_heads;
    const int n_items = total_heads * items_per_head;
    forge_wait_prior_grid();  // PDL: qkv is the previous kernel's output; the cache may still be read (common.cuh)
    forge_allow_dependents();
    const long long pos = positions[t];
    const long long slot = slot_mapping[t];
    const scalar_t* row = qkv + t * qkv_row_stride;
    const float* cs = cos_sin + pos * head_dim;

    for (int item = threadIdx.x; item < n_items; item += blockDim.x) {
        const int head = item / items_per_head;
        const int i = (item - head * items_per_head) * VEC;  // index in the first half
        const scalar_t* src = row + (long long)head * head_dim + i;
        Vec<scalar_t, VEC> x1 = load_vec<scalar_t, VEC>(src);
        Vec<scalar_t, VEC> x2 = load_vec<scalar_t, VEC>(src + half);
        if (head < num_heads + num_kv_heads) {
            Vec<float, VEC> c = load_vec<float, VEC>(cs + i);
            Vec<float, VEC> s = load_vec<float, VEC>(cs + half + i);
            Vec<scalar_t, VEC> o1, o2;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float a = to_float(x1.v[e]), b = to_float(x2.v[e]);
                o1.v[e] = from_float<scalar_t>(a * c.v[e] - b * s.v[e]);
                o2.v[e] = from_float<scalar_t>(b * c.v[e] + a * s.v[e]);
            }
            if (head < num_heads) {
                scalar_t* dst = q_out + (t * num_heads + head) * head_dim + i;
                store_vec<scalar_t, VEC>(dst, o1);
                store_vec<scalar_t, VEC>(dst + half, o2);
            } else if (slot >= 0) {
                const int kh = head - num_heads;
                cache_t* dst = k_cache + (slot * num_kv_heads + kh) * head_dim + i;
                Vec<cache_t, VEC> c1, c2;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    c1.v[e] = to_cache(to_float(o1.v[e]), k_scale);
                    c2.v[e] = to_cache(to_float(o2.v[e]), k_scale);
                }
                store_vec<cache_t, VEC>(dst, c1);
                store_vec<cache_t, VEC>(dst + half, c2);
            }
        } else if (slot >= 0) {
            const int vh = head - num_heads - num_kv_heads;
            cache_t* dst = v_cache + (slot * num_kv_heads + vh) * head_dim + i;
            Vec<cache_t, VEC> c1, c2;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                c1.v[e] = to_cache(to_float(x1.v[e]), v_scale);
                c2.v[e] = to_cache(to_float(x2.v[e]), v_scale);
            }
            store_vec<cache_t, VEC>(dst, c1);
            store_vec<cache_t, VEC>(dst + half, c2);
        }
    }
}
