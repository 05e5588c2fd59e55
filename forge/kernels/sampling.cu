// Seeded categorical sampling by the Gumbel-max trick, fused with temperature and the
// top-k / top-p / min-p threshold, and greedy (temperature <= 0) rows.
//
// For row r: x_i = logits[r, i] / T_r; tokens with x_i < threshold[r] are masked (the launcher
// turns top-k, top-p and min-p into one value threshold per row in the scaled space);
// token = argmax_i x_i + G_i, with Gumbel noise G_i = -log(-log(u_i)) and
// u_i = U(splitmix64 stream of key(seed_r, step_r), element i) in (0, 1). argmax(x + G) is an
// exact draw from softmax(x) restricted to the kept tokens, and u depends only on
// (seed, step, i): a request's draw does not depend on the rest of the batch.
// Greedy rows (T <= 0) take argmax_i logits[r, i] (first index on ties, like torch.argmax).
// sampling.py's gumbel_argmax_torch computes the same float32 scores on the CPU (tests: the
// kernel's winning token and score equal the CPU's, tests/cuda/test_sampling.py).
//
// Layout: grid = (B, chunks), block = 256 threads; block (r, c) scans elements
// [c * chunk_len, (c + 1) * chunk_len) of row r (coalesced 4-byte loads), keeps the best
// (score, index) per thread, reduces over the block with shuffles + shared memory, and merges
// into best[r] with one 64-bit atomicMax of (order-preserving score bits << 32 | ~index)
// (higher score wins, then the lower index). best[] must be zeroed before the launch; the
// launcher decodes the index. Several blocks per row keep all SMs busy: the hash and two logs
// per element make this compute-, not bandwidth-bound. Bytes moved: 4 * B * V read.
#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool better(float s, int i, float best, int best_i) {
    return s > best || (s == best && (unsigned)i < (unsigned)best_i);
}

// (best, best_i) of every lane of the warp := the warp's best pair (butterfly over 5 shuffles).
__device__ __forceinline__ void warp_argmax(float& best, int& best_i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (better(ob, oi, best, best_i)) {
            best = ob;
            best_i = oi;
        }
    }
}

__device__ __forceinline__ unsigned long long pack(float s, int i) {
    const unsigned bits = __float_as_uint(s);
    const unsigned key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // monotone in s
    return ((unsigned long long)key << 32) | (unsigned long long)(0xFFFFFFFFu - (unsigned)i);
}

extern "C" __global__ void __launch_bounds__(256) gumbel_sample_kernel(
    unsigned long long* __restrict__ best_out, const float* __restrict__ logits, long long row_stride, int vocab,
    int chunk_len, const float* __restrict__ temperature, const float* __restrict__ threshold,
    const long long* __restrict__ seeds, const long long* __restrict__ steps) {
    __shared__ float s_best[32];
    __shared__ int s_idx[32];
    const int row = blockIdx.x;
    const int lo = blockIdx.y * chunk_len;
    const int hi = min(vocab, lo + chunk_len);
    const float* x = logits + (long long)row * row_stride;
    forge_wait_prior_grid();  // PDL: logits and best_out's zeros come from earlier kernels (common.cuh)
    forge_allow_dependents();
    const float t = temperature[row];
    const bool greedy = !(t > 0.f);
    const float thr = threshold[row];
    const unsigned long long key =
        splitmix64((unsigned long long)seeds[row] ^ splitmix64((unsigned long long)steps[row]));

    float best = -INFINITY;
    int best_i = -1;  // (unsigned)-1 loses every tie
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float l = x[i];
        float s;
        if (greedy) {
            s = l;
        } else {
            const float xs = l / t;
            if (!(xs >= thr)) continue;  // masked (also skips NaN)
            const unsigned long long h = splitmix64(key + (unsigned long long)i * 0x9E3779B97F4A7C15ull);
            const float u = ((float)(h >> 41) + 0.5f) * (1.0f / 8388608.0f);  // (0, 1), 23 bits
            s = xs - logf(-logf(u));
        }
        if (better(s, i, best, best_i)) {
            best = s;
            best_i = i;
        }
    }
    // argmax reduction: warp, then across warps
    warp_argmax(best, best_i);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        s_best[warp] = best;
        s_idx[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < nwarps ? s_best[lane] : -INFINITY;
        best_i = lane < nwarps ? s_idx[lane] : -1;
        warp_argmax(best, best_i);
        if (lane == 0 && best_i >= 0) atomicMax(best_out + row, pack(best, best_i));
    }
}
