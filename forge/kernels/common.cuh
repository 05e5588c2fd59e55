// Shared helpers for forge's NVRTC-compiled kernels.
//
// The element type is chosen at compile time by the launcher (forge/kernels/compiler.py) with
// `-DFORGE_DTYPE=<n>` (0 = float32, 1 = bfloat16, 2 = float16); every kernel is written against
// `scalar_t` and converts to float32 for arithmetic with `to_float` / `from_float`.
// A second type, `cache_t` (FORGE_CACHE_DTYPE) or `wscalar_t` (FORGE_WDTYPE), is used where a
// kernel reads a tensor that may have another dtype (KV cache, norm weight).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef INFINITY  // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef FORGE_DTYPE
#define FORGE_DTYPE 1
#endif

template <int CODE> struct DtypeOf;
template <> struct DtypeOf<0> { typedef float type; };
template <> struct DtypeOf<1> { typedef __nv_bfloat16 type; };
template <> struct DtypeOf<2> { typedef __half type; };

typedef DtypeOf<FORGE_DTYPE>::type scalar_t;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// A register array of N elements, aligned so that loading it is one (or two) wide load(s).
template <typename T, int N> struct alignas(sizeof(T) * N <= 16 ? sizeof(T) * N : 16) Vec {
    T v[N];
};

// 16-byte vector of T: 8 x bf16/fp16 or 4 x fp32.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T, int N> __device__ __forceinline__ Vec<T, N> load_vec(const T* __restrict__ p) {
    return *reinterpret_cast<const Vec<T, N>*>(p);
}

// Read-only, streaming load (bypasses L1 allocation): for data read exactly once, like KV cache.
template <typename T, int N> __device__ __forceinline__ Vec<T, N> load_vec_stream(const T* __restrict__ p) {
    static_assert(sizeof(T) * N == 16, "load_vec_stream loads 16 bytes");
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return *reinterpret_cast<Vec<T, N>*>(&r);
}

template <typename T, int N> __device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, N>& v) {
    *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Sum over the whole block; `scratch` holds 32 floats. All threads get the result.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    x = warp_sum(x);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(x);
}
