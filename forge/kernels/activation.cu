// silu_mul: out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]      (gate then up, one fused GEMM)
//
// Layout: grid = (T, ceil(I / (VEC * 256))), block = 256 threads. Row t is blockIdx.x (grid.x
// allows 2^31 rows), each thread handles VEC consecutive elements of the gate half and the
// matching VEC of the up half with one 16-byte load each (VEC = 8 for bf16/fp16, 4 for fp32),
// and writes VEC outputs with one 16-byte store. When I is not a multiple of VEC (or the rows
// are not 16-byte aligned) the launcher compiles VEC = 1.
//
// Bytes moved: read 2*T*I + write T*I elements = 3*T*I*sizeof(scalar_t); no reuse, so the
// kernel is purely bandwidth-bound (ceiling: ~2.94 TB/s on H100 SXM).
// Arithmetic is in float32; the activation is rounded once to scalar_t like torch (F.silu(gate)
// rounds to scalar_t, then * up rounds again: we reproduce both roundings).
#include "common.cuh"
#include "activation.cuh"

#ifndef VEC
#define VEC ((int)(16 / sizeof(scalar_t)))
#endif

// One thread: VEC elements of row blockIdx.x's gate half and the matching VEC of its up half.
template <typename Act>
__device__ __forceinline__ void gated_mul(scalar_t* __restrict__ out, const scalar_t* __restrict__ gate_up,
                                          long long inter) {
    const long long row = blockIdx.x;
    const long long i = ((long long)blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    forge_wait_prior_grid();  // PDL: gate_up is the previous kernel's output (every thread waits: common.cuh)
    forge_allow_dependents();
    if (i >= inter) return;
    const scalar_t* g_ptr = gate_up + row * 2 * inter + i;
    const scalar_t* u_ptr = g_ptr + inter;
    Vec<scalar_t, VEC> g = load_vec<scalar_t, VEC>(g_ptr);
    Vec<scalar_t, VEC> u = load_vec<scalar_t, VEC>(u_ptr);
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const scalar_t a = from_float<scalar_t>(Act::apply(to_float(g.v[e])));
        o.v[e] = from_float<scalar_t>(to_float(a) * to_float(u.v[e]));
    }
    store_vec<scalar_t, VEC>(out + row * inter + i, o);
}

extern "C" __global__ void __launch_bounds__(256) silu_mul_kernel(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ gate_up, long long inter) {
    gated_mul<Silu>(out, gate_up, inter);
}

// gelu_tanh_mul: out[t, i] = gelu_tanh(gate_up[t, i]) * gate_up[t, I + i]   (GeGLU: Gemma's MLP)
// The same layout, bytes and roundings as silu_mul (the comment at the top).
extern "C" __global__ void __launch_bounds__(256) gelu_tanh_mul_kernel(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ gate_up, long long inter) {
    gated_mul<GeluTanh>(out, gate_up, inter);
}
