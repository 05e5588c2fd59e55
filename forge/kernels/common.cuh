// Shared helpers for forge's NVRTC-compiled kernels.
//
// The element type is chosen at compile time by the launcher (forge/kernels/compiler.py) with
// `-DFORGE_DTYPE=<n>` (0 = float32, 1 = bfloat16, 2 = float16); every kernel is written against
// `scalar_t` and converts to float32 for arithmetic with `to_float` / `from_float`.
// A second type, `cache_t` (FORGE_CACHE_DTYPE) or `wscalar_t` (FORGE_WDTYPE), is used where a
// kernel reads a tensor that may have another dtype (KV cache, norm weight).
// Code 3 = float8 e4m3 (`__nv_fp8_e4m3`, torch.float8_e4m3fn) is a storage type of the KV cache
// only: cuda_fp8.h is included, and FORGE_FP8 set, where a kernel is compiled with
// -DFORGE_CACHE_DTYPE=3. An fp8 cache holds x / scale (a float scale per layer and tensor).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(FORGE_CACHE_DTYPE) && FORGE_CACHE_DTYPE == 3
#define FORGE_FP8 1
#include <cuda_fp8.h>
#else
#define FORGE_FP8 0
#endif

// Programmatic dependent launch (FORGE_PDL=1, sm_90+; see forge_wait_prior_grid below). A PDL build has no
// __restrict__: a const __restrict__ pointer lets the compiler read through the non-coherent path
// (ld.global.nc), which the PTX memory model leaves out (griddepcontrol.wait does not make the previous
// kernel's writes visible to it), and treat the loads as invariant, free to move above the wait (llama.cpp
// hit both: ggml-org/llama.cpp#24030). Explicit ld.global.nc loads stay: weights, and
// paged_attention's block tables (written by copies before the step, never by a kernel that overlaps).
#ifndef FORGE_PDL
#define FORGE_PDL 0
#endif
#if FORGE_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FORGE_PDL_ACTIVE 1
#define __restrict__
#else
#define FORGE_PDL_ACTIVE 0
#endif

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
#if FORGE_FP8
template <> struct DtypeOf<3> { typedef __nv_fp8_e4m3 type; };
#endif

typedef DtypeOf<FORGE_DTYPE>::type scalar_t;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
#if FORGE_FP8
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) { return __half2float(__half(__nv_cvt_fp8_to_halfraw(x.__x, __NV_E4M3))); }
// Round to nearest even, saturated to +-448 (the largest finite e4m3; NaN stays NaN): one cvt on sm_89+.
template <> __device__ __forceinline__ __nv_fp8_e4m3 from_float<__nv_fp8_e4m3>(float x) {
    __nv_fp8_e4m3 r;
    r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    return r;
}
#endif

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

// Elements e and e + 1 of a vector as floats.
template <typename T, int N> __device__ __forceinline__ void pair_to_float(const Vec<T, N>& x, int e, float& a, float& b) {
    a = to_float(x.v[e]);
    b = to_float(x.v[e + 1]);
}
#if FORGE_FP8
// float8: e4m3x2 -> f16x2 (one cvt on sm_89+; exact) -> 2 floats.
template <int N> __device__ __forceinline__ void pair_to_float(const Vec<__nv_fp8_e4m3, N>& x, int e, float& a, float& b) {
    const __nv_fp8x2_storage_t pair = *reinterpret_cast<const __nv_fp8x2_storage_t*>(&x.v[e]);
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
    a = f.x;
    b = f.y;
}
#endif

// The N elements of a vector as floats (float8: in pairs).
template <typename T, int N> __device__ __forceinline__ void vec_to_float(const Vec<T, N>& x, float (&out)[N]) {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = to_float(x.v[e]);
}
#if FORGE_FP8
template <int N> __device__ __forceinline__ void vec_to_float(const Vec<__nv_fp8_e4m3, N>& x, float (&out)[N]) {
    static_assert(N % 2 == 0, "fp8 vectors convert in pairs");
#pragma unroll
    for (int e = 0; e < N; e += 2) pair_to_float(x, e, out[e], out[e + 1]);
}
#endif

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

// Programmatic dependent launch (PDL, issue 18). compiler.py launches the kernels it compiled with
// -DFORGE_PDL=1 with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: such a kernel may start while
// the previous kernel of the stream still runs, so every path through it calls forge_wait_prior_grid()
// before its first read of anything an earlier kernel wrote and before its first global write (the
// previous kernel may still read what it overwrites); before the wait it only computes indices and
// prefetches read-only data (weights). The wait returns once the previous kernel has completed and its
// writes are visible, so a kernel that calls it also completes after every earlier kernel.
// forge_allow_dependents() lets the next kernel launch (its blocks run their prologue, then wait for this
// kernel's completion). Without FORGE_PDL, or below sm_90, both are empty and the cubins are those of before.
__device__ __forceinline__ void forge_wait_prior_grid() {
#if FORGE_PDL_ACTIVE
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void forge_allow_dependents() {
#if FORGE_PDL_ACTIVE
    asm volatile("griddepcontrol.launch_dependents;\n");
#endif
}

// Starts moving the line holding `p` into L2 (read-only data, e.g. weights, before the wait).
__device__ __forceinline__ void forge_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
