// The gated MLPs' activations, in float32 (activation.cu's silu_mul / gelu_tanh_mul and quant_gemm.cu's
// gated epilogue): silu(g) = g / (1 + exp(-g)); gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
// (torch's approximate="tanh").
#pragma once

struct Silu {
    static __device__ __forceinline__ float apply(float g) { return g / (1.f + expf(-g)); }
};
struct GeluTanh {
    static __device__ __forceinline__ float apply(float g) {
        const float k_beta = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * g * (1.f + tanhf(k_beta * (g + 0.044715f * g * g * g)));
    }
};
