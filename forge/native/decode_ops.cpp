// The small per-layer ops of a CPU forward step, float32, one call each instead of torch's 5-15
// dispatched ops (NativeCpuOps, forge/ops/cpu_native.py; CpuOps is the reference they are tested
// against in tests/test_native_cpu.py). Every op is row-independent: a row's result does not depend
// on the other rows of its batch (batch == sequential). The KV cache is float32 or float16
// (`cache_f16`: what NativeCpuOps allocates, half the bytes each decode step reads); values are
// converted on store and load, arithmetic is float32.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

// exp(x) for 16 floats: 2^(x log2 e) = 2^n * 2^f, f in [-0.5, 0.5], 2^f by a degree-6 polynomial
// (relative error < 2e-7, about 2 ulp); x below -87 gives 0, above 88 gives +inf.
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.7f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6180717e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503340e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022652e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// Cache rows: float32, or float16 (uint16_t bits) converted to and from float32.
inline __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load(const uint16_t* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
inline void store(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
inline void store(uint16_t* p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename C>
inline float dot(const float* a, const C* b, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 k = tail_mask(d - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), load(b + i, k), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// The same for d = 16 * CHUNKS known at compile time: unmasked, unrolled, two accumulators.
template <int CHUNKS, typename C>
inline float dot_fixed(const float* a, const C* b) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int j = 0; j < CHUNKS; j += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * j), load(b + 16 * j, (__mmask16)0xFFFF), acc0);
        if (j + 1 < CHUNKS)
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * j + 16), load(b + 16 * j + 16, (__mmask16)0xFFFF), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// out = x * rsqrt(mean(x^2) + eps) * w for one row of h values.
inline void rms_norm_row(const float* x, const float* w, int64_t h, float eps, float* out) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < h; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask(h - i), x + i);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)h + eps));
    for (int64_t i = 0; i < h; i += 16) {
        const __mmask16 k = tail_mask(h - i);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv);
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, w + i)));
    }
}

thread_local std::vector<float> scores;

// v[16] -> one vector whose lane i is the sum of v[i]'s 16 lanes: a transpose-and-add tree (46
// instructions for 16 sums instead of 16 horizontal reductions of ~8 each).
inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], u[4], r[2];
    for (int i = 0; i < 8; ++i)  // quarters [a0+a2, a1+a3, b0+b2, b1+b3]: keys 2i, 2i+1 in 8 lanes each
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; ++i)  // quarter c: key 4i + c, in 4 lanes
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; ++i)  // quarter c: keys 8i + c, 8i + 4 + c, in 2 lanes each
        r[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // lane 4c + j: key 4j + c
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, t);  // lane k: key k
}

// Walks a sequence's key positions in order, yielding each one's cache slot through its block table
// (one division up front instead of one per key).
struct SlotWalker {
    const int32_t* table;
    int64_t block_size, block, offset;
    SlotWalker(const int32_t* t, int64_t bs, int64_t first) : table(t), block_size(bs), block(first / bs), offset(first % bs) {}
    int64_t next() {
        const int64_t slot = (int64_t)table[block] * block_size + offset;
        if (++offset == block_size) offset = 0, ++block;
        return slot;
    }
};

}  // namespace

extern "C" {

void fq_rms_norm(const float* x, const float* w, int64_t t, int64_t h, float eps, float* out) {
    for (int64_t i = 0; i < t; ++i) rms_norm_row(x + i * h, w, h, eps, out + i * h);
}

// residual_out = x + residual; out = rms_norm(residual_out) * w.
void fq_add_rms_norm(const float* x, const float* residual, const float* w, int64_t t, int64_t h, float eps,
                     float* out, float* residual_out) {
    for (int64_t i = 0; i < t; ++i) {
        for (int64_t j = 0; j < h; j += 16) {
            const __mmask16 k = tail_mask(h - j);
            const __m512 s = _mm512_add_ps(_mm512_maskz_loadu_ps(k, x + i * h + j), _mm512_maskz_loadu_ps(k, residual + i * h + j));
            _mm512_mask_storeu_ps(residual_out + i * h + j, k, s);
        }
        rms_norm_row(residual_out + i * h, w, h, eps, out + i * h);
    }
}

// gate_up [T, 2I] (gate, then up) -> out [T, I] = silu(gate) * up = gate / (1 + exp(-gate)) * up.
void fq_silu_mul(const float* gate_up, int64_t t, int64_t inter, float* out) {
    for (int64_t i = 0; i < t; ++i) {
        const float* g = gate_up + i * 2 * inter;
        for (int64_t j = 0; j < inter; j += 16) {
            const __mmask16 k = tail_mask(inter - j);
            const __m512 gv = _mm512_maskz_loadu_ps(k, g + j), uv = _mm512_maskz_loadu_ps(k, g + inter + j);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_mask_storeu_ps(out + i * inter + j, k, _mm512_mul_ps(silu, uv));
        }
    }
}

}  // extern "C"

namespace {

template <typename C>
void qkv_rope_cache(const float* qkv, int64_t t, const int64_t* positions, const float* cos_sin, int64_t heads,
                    int64_t kv_heads, int64_t d, C* k_cache, C* v_cache, const int64_t* slots, int64_t block_size,
                    float* q_out) {
    const int64_t half = d / 2, width = (heads + 2 * kv_heads) * d, slot_elems = kv_heads * d;
    for (int64_t i = 0; i < t; ++i) {
        const float* row = qkv + i * width;
        const float* cs = cos_sin + positions[i] * d;
        const int64_t slot = slots[i];
        if (slot % block_size == 0) {
            memset(k_cache + slot * slot_elems, 0, block_size * slot_elems * sizeof(C));
            memset(v_cache + slot * slot_elems, 0, block_size * slot_elems * sizeof(C));
        }
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            const float* x = row + h * d;
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 k = tail_mask(half - j);
                const __m512 x1 = _mm512_maskz_loadu_ps(k, x + j), x2 = _mm512_maskz_loadu_ps(k, x + half + j);
                const __m512 c = _mm512_maskz_loadu_ps(k, cs + j), s = _mm512_maskz_loadu_ps(k, cs + half + j);
                const __m512 r1 = _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s));
                const __m512 r2 = _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s));
                if (h < heads) {
                    float* o = q_out + (i * heads + h) * d;
                    _mm512_mask_storeu_ps(o + j, k, r1);
                    _mm512_mask_storeu_ps(o + half + j, k, r2);
                } else {
                    C* o = k_cache + slot * slot_elems + (h - heads) * d;
                    store(o + j, k, r1);
                    store(o + half + j, k, r2);
                }
            }
        }
        const float* v = row + (heads + kv_heads) * d;
        for (int64_t j = 0; j < slot_elems; j += 16) {
            const __mmask16 k = tail_mask(slot_elems - j);
            store(v_cache + slot * slot_elems + j, k, _mm512_maskz_loadu_ps(k, v + j));
        }
    }
}

}  // namespace

extern "C" {

// Split qkv [T, (H + 2 Hkv) D]; rotate q and k by neox RoPE (cos_sin [max_pos, D]: D/2 cos, then D/2
// sin); q -> q_out [T, H, D]; k, v -> their cache slots (caches [blocks, block_size, Hkv, D]). A
// block whose first slot is written is zeroed first (see CpuOps._fresh_blocks: padding reads zeros).
void fq_qkv_rope_cache(const float* qkv, int64_t t, const int64_t* positions, const float* cos_sin, int64_t heads,
                       int64_t kv_heads, int64_t d, void* k_cache, void* v_cache, const int64_t* slots,
                       int64_t block_size, float* q_out, int cache_f16) {
    if (cache_f16)
        qkv_rope_cache(qkv, t, positions, cos_sin, heads, kv_heads, d, (uint16_t*)k_cache, (uint16_t*)v_cache, slots,
                       block_size, q_out);
    else
        qkv_rope_cache(qkv, t, positions, cos_sin, heads, kv_heads, d, (float*)k_cache, (float*)v_cache, slots,
                       block_size, q_out);
}

}  // extern "C"

namespace {

// One query per sequence (at position context_len - 1) over its paged context: q [B, H, D] ->
// out [B, H, D]. window > 0: only the last `window` keys (the query's own included); soft_cap > 0:
// scores become soft_cap * tanh(score / soft_cap). Float32 softmax; a sequence with no keys gives 0.
// Work item = (sequence, KV head): its `group` query heads share every K and V row load; with
// D = 16 * CHUNKS the V accumulators stay in registers (CHUNKS = 0: any D, accumulated in memory).
template <int CHUNKS, typename C>
void attend(const float* q, const C* k_cache, const C* v_cache, const int32_t* table, int64_t ctx,
            int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, float scale, int64_t window,
            float soft_cap, int64_t s, int64_t kvh, float* out) {
    constexpr int MAX_GROUP = 64, REGISTER_GROUP = 8;  // query heads per KV head: any / in registers
    const int64_t group = heads / kv_heads, slot_floats = kv_heads * d;
    const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0, n = ctx - first;
    if ((int64_t)scores.size() < group * n) scores.resize(group * n);
    float* const sc_all = scores.data();  // (one thread-local lookup, not one per key)
    float mx[MAX_GROUP];
    for (int64_t g = 0; g < group; ++g) mx[g] = -INFINITY;
    SlotWalker keys(table, block_size, first);
    if (CHUNKS > 0) {  // 16 keys at a time: their 16 partial-sum vectors reduced together (sum16)
        const C* kp[16];
        for (int64_t p0 = 0; p0 < n; p0 += 16) {
            const int64_t count = std::min<int64_t>(16, n - p0);
            for (int64_t i = 0; i < count; ++i) kp[i] = k_cache + keys.next() * slot_floats + kvh * d;
            for (int64_t i = count; i < 16; ++i) kp[i] = kp[0];  // (padding lanes, masked below)
            const __mmask16 valid = tail_mask(count);
            for (int64_t g = 0; g < group; ++g) {
                const float* qh = q + (s * heads + kvh * group + g) * d;
                __m512 part[16];
                for (int i = 0; i < 16; ++i) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int j = 0; j < CHUNKS; ++j)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * j), load(kp[i] + 16 * j, (__mmask16)0xFFFF), acc);
                    part[i] = acc;
                }
                __m512 v = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));
                if (soft_cap > 0) {
                    alignas(64) float tmp[16];
                    _mm512_store_ps(tmp, v);
                    for (int i = 0; i < 16; ++i) tmp[i] = soft_cap * tanhf(tmp[i] / soft_cap);
                    v = _mm512_load_ps(tmp);
                }
                _mm512_mask_storeu_ps(sc_all + g * n + p0, valid, v);
                mx[g] = std::max(mx[g], _mm512_mask_reduce_max_ps(valid, v));
            }
        }
    } else {
        for (int64_t p = first; p < ctx; ++p) {  // scores: one K row load for the group's heads
            const C* kp = k_cache + keys.next() * slot_floats + kvh * d;
            for (int64_t g = 0; g < group; ++g) {
                const float* qh = q + (s * heads + kvh * group + g) * d;
                float v = dot(qh, kp, d) * scale;
                if (soft_cap > 0) v = soft_cap * tanhf(v / soft_cap);
                sc_all[g * n + p - first] = v;
                mx[g] = std::max(mx[g], v);
            }
        }
    }
    float inv_total[MAX_GROUP];
    for (int64_t g = 0; g < group; ++g) {  // exp(score - max), vectorised
        float* sc = sc_all + g * n;
        const __m512 mv = _mm512_set1_ps(mx[g]);
        __m512 tv = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; p += 16) {
            const __mmask16 k = tail_mask(n - p);
            const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + p), mv)));
            _mm512_mask_storeu_ps(sc + p, k, e);
            tv = _mm512_add_ps(tv, e);
        }
        inv_total[g] = n > 0 ? 1.0f / _mm512_reduce_add_ps(tv) : 0.0f;
    }
    if (CHUNKS > 0) {
        __m512 acc[REGISTER_GROUP][CHUNKS > 0 ? CHUNKS : 1];
        for (int64_t g = 0; g < group; ++g)
            for (int j = 0; j < CHUNKS; ++j) acc[g][j] = _mm512_setzero_ps();
        SlotWalker values(table, block_size, first);
        for (int64_t p = first; p < ctx; ++p) {
            const C* vp = v_cache + values.next() * slot_floats + kvh * d;
            __m512 v[CHUNKS > 0 ? CHUNKS : 1];
            for (int j = 0; j < CHUNKS; ++j) v[j] = load(vp + 16 * j, (__mmask16)0xFFFF);
            for (int64_t g = 0; g < group; ++g) {
                const __m512 w = _mm512_set1_ps(sc_all[g * n + p - first]);
                for (int j = 0; j < CHUNKS; ++j) acc[g][j] = _mm512_fmadd_ps(w, v[j], acc[g][j]);
            }
        }
        for (int64_t g = 0; g < group; ++g) {
            float* o = out + (s * heads + kvh * group + g) * d;
            for (int j = 0; j < CHUNKS; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv_total[g])));
        }
        return;
    }
    for (int64_t g = 0; g < group; ++g) {
        float* o = out + (s * heads + kvh * group + g) * d;
        memset(o, 0, d * sizeof(float));
        SlotWalker values(table, block_size, first);
        for (int64_t p = first; p < ctx; ++p) {
            const C* vp = v_cache + values.next() * slot_floats + kvh * d;
            const __m512 w = _mm512_set1_ps(sc_all[g * n + p - first] * inv_total[g]);
            for (int64_t j = 0; j < d; j += 16) {
                const __mmask16 k = tail_mask(d - j);
                _mm512_mask_storeu_ps(o + j, k, _mm512_fmadd_ps(w, load(vp + j, k), _mm512_maskz_loadu_ps(k, o + j)));
            }
        }
    }
}

template <typename C>
void decode_attention(const float* q, const C* k_cache, const C* v_cache, const int32_t* block_tables,
                      int64_t table_stride, const int32_t* context_lens, int64_t b, int64_t heads, int64_t kv_heads,
                      int64_t d, int64_t block_size, float scale, int64_t window, float soft_cap, float* out,
                      int threads) {
    const int64_t group = heads / kv_heads;  // <= 64 (NativeCpuOps checks)
    auto fn = group > 8 ? attend<0, C> : d == 64 ? attend<4, C> : d == 128 ? attend<8, C> : attend<0, C>;
    const bool parallel = threads > 1 && b * kv_heads >= 2 && b > 1;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (parallel)
    for (int64_t s = 0; s < b; ++s)
        for (int64_t kvh = 0; kvh < kv_heads; ++kvh)
            fn(q, k_cache, v_cache, block_tables + s * table_stride, context_lens[s], heads, kv_heads, d, block_size,
               scale, window, soft_cap, s, kvh, out);
}

}  // namespace

extern "C" {

// One query per sequence (at position context_len - 1) over its paged context (see attend).
void fq_decode_attention(const float* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,
                         int64_t table_stride, const int32_t* context_lens, int64_t b, int64_t heads,
                         int64_t kv_heads, int64_t d, int64_t block_size, float scale, int64_t window,
                         float soft_cap, float* out, int threads, int cache_f16) {
    if (cache_f16)
        decode_attention(q, (const uint16_t*)k_cache, (const uint16_t*)v_cache, block_tables, table_stride,
                         context_lens, b, heads, kv_heads, d, block_size, scale, window, soft_cap, out, threads);
    else
        decode_attention(q, (const float*)k_cache, (const float*)v_cache, block_tables, table_stride, context_lens,
                         b, heads, kv_heads, d, block_size, scale, window, soft_cap, out, threads);
}

}  // extern "C"
