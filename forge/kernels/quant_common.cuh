// Device helpers of the quantized GEMMs (quant_gemm.cu, quant_gemm_pipe.cu): the mma.sync m16n8k16 wrapper
// (bf16 / fp16 operands by FORGE_DTYPE, float32 accumulate), an e4m3 code pair -> two exact bf16 / fp16 numbers,
// and word m of a uint4. Included after common.cuh. Functions only: a namespace-scope constexpr is a symbol of
// the cubin, so each file keeps its own constants (MAGIC2, ONES2: where and whether it declares them is its cubin).
#pragma once

#if FORGE_DTYPE == 1
#define MMA_AB "bf16"
#else
#define MMA_AB "f16"
#endif

__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_AB "." MMA_AB ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two e4m3 codes (a 16-bit pair, low byte first) -> two exact bf16/fp16 numbers (e4m3 is a subset of both).
__device__ __forceinline__ unsigned fp8_pair(unsigned two) {
    unsigned h2;
    const unsigned short in = (unsigned short)two;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(in));
#if FORGE_DTYPE == 1
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<const unsigned*>(&b);
#else
    return h2;
#endif
}

__device__ __forceinline__ unsigned word_of(const uint4& v, int m) {
    return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w;
}
