// apply_token_bitmask: logits[rows[j], t] = -inf wherever bit t of bitmask[j] is 0
//                      (structured outputs: the tokens a grammar forbids at this step)
//
// bitmask is int32 [num_masked, words] in xgrammar's layout: bit (t % 32) of word t / 32 is 1 when
// token t is allowed. Tokens past the mask (t >= 32 * words, a padded logits row) are forbidden.
// Only the constrained rows are listed in `rows`; every other row of logits is left untouched.
//
// Layout: grid = (ceil(vocab / 256), num_masked), block = 256 threads, one thread per token.
// The 32 threads of a warp share one mask word (a broadcast load), and each reads its logit only
// to decide nothing: it writes -inf for a forbidden token and nothing otherwise.
//
// Bytes moved: the masks (num_masked * vocab / 8) plus a float32 store per forbidden token; at
// most one pass over the constrained rows. It is a few microseconds next to a decode step.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) apply_token_bitmask_kernel(
    float* __restrict__ logits, const int* __restrict__ bitmask, const int* __restrict__ rows,
    int vocab, int words, long long logits_stride) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    forge_wait_prior_grid();  // PDL: the logits are the previous kernel's (every thread waits: common.cuh)
    forge_allow_dependents();
    if (t >= vocab) return;
    const int j = blockIdx.y;
    const int w = t >> 5;
    const bool allowed = w < words && ((bitmask[(long long)j * words + w] >> (t & 31)) & 1);
    if (!allowed) logits[(long long)rows[j] * logits_stride + t] = -INFINITY;
}
