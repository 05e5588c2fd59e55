// RMSNorm and fused residual-add + RMSNorm, one block per row.
//
//   rms_norm:      out[r] = (x[r] * rsqrt(mean(x[r]^2) + eps)) * w            (float32 math)
//   add_rms_norm:  s[r] = x[r] + res[r] (rounded to scalar_t, written to res_out);
//                  out[r] = rms_norm(s[r])
//
// Layout: grid = (rows), block = NT threads (a multiple of 32, <= 1024, chosen by the launcher
// so that a row is covered in few passes). Each thread handles VEC consecutive elements per
// pass with 16-byte loads (VEC = 8 for bf16/fp16, 4 for fp32; the launcher compiles VEC = 1
// when hidden % VEC != 0). Pass 1 accumulates the sum of squares in float32 (block reduction
// through warp shuffles + 32 floats of shared memory); pass 2 re-reads the row (an L1/L2 hit:
// a row is at most a few tens of KB) and writes the normalized output. In add_rms_norm pass 2
// re-reads the rounded sum this same thread wrote, so no extra synchronization is needed.
//
// Bytes moved per row of H elements: rms_norm 2*H (+ weight, cached); add_rms_norm 4*H
// (read x, res; write sum, out).
//
// PDL (FORGE_PDL=1, common.cuh): a thread prefetches its weight lines into L2, then waits for the previous
// kernel (which wrote x / res) and lets the next one launch.
#include "common.cuh"

#ifndef VEC
#define VEC ((int)(16 / sizeof(scalar_t)))
#endif
#ifndef FORGE_WDTYPE
#define FORGE_WDTYPE FORGE_DTYPE
#endif
typedef DtypeOf<FORGE_WDTYPE>::type wscalar_t;

// PDL prologue: the weight is read-only, so its 128-byte lines may move to L2 while the previous kernel
// finishes.
__device__ __forceinline__ void weight_prefetch_then_wait(const wscalar_t* __restrict__ weight, int hidden) {
#if FORGE_PDL_ACTIVE
    const char* w = reinterpret_cast<const char*>(weight);
    for (int b = threadIdx.x * 128; b < hidden * (int)sizeof(wscalar_t); b += blockDim.x * 128) forge_prefetch_l2(w + b);
#endif
    forge_wait_prior_grid();
    forge_allow_dependents();
}

extern "C" __global__ void rms_norm_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                           const wscalar_t* __restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[32];
    weight_prefetch_then_wait(weight, hidden);
    const long long row = blockIdx.x;
    const scalar_t* xr = x + row * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(xr + i);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const float f = to_float(v.v[e]);
            ss += f * f;
        }
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    scalar_t* orow = out + row * hidden;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(xr + i);
        Vec<wscalar_t, VEC> w = load_vec<wscalar_t, VEC>(weight + i);
        Vec<scalar_t, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = from_float<scalar_t>(to_float(w.v[e]) * (to_float(v.v[e]) * inv));
        store_vec<scalar_t, VEC>(orow + i, o);
    }
}

extern "C" __global__ void add_rms_norm_kernel(scalar_t* __restrict__ out, scalar_t* __restrict__ res_out,
                                               const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                                               const wscalar_t* __restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[32];
    weight_prefetch_then_wait(weight, hidden);
    const long long row = blockIdx.x;
    const scalar_t* xr = x + row * hidden;
    const scalar_t* rr = res + row * hidden;
    scalar_t* sr = res_out + row * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        Vec<scalar_t, VEC> a = load_vec<scalar_t, VEC>(xr + i);
        Vec<scalar_t, VEC> b = load_vec<scalar_t, VEC>(rr + i);
        Vec<scalar_t, VEC> s;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            s.v[e] = from_float<scalar_t>(to_float(a.v[e]) + to_float(b.v[e]));
            const float f = to_float(s.v[e]);
            ss += f * f;
        }
        store_vec<scalar_t, VEC>(sr + i, s);
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    scalar_t* orow = out + row * hidden;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        // Same thread, same addresses as its own stores above: program order makes them visible.
        Vec<scalar_t, VEC> s = *reinterpret_cast<const Vec<scalar_t, VEC>*>(sr + i);
        Vec<wscalar_t, VEC> w = load_vec<wscalar_t, VEC>(weight + i);
        Vec<scalar_t, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = from_float<scalar_t>(to_float(w.v[e]) * (to_float(s.v[e]) * inv));
        store_vec<scalar_t, VEC>(orow + i, o);
    }
}
