// A CPU stand-in for the CUDA features quant_gemm_pipe.cu uses, so that its source (a few asm helpers swapped
// for the functions below by tests/test_quant_gemm_pipe_host.py) runs on the host with its own index math.
//
// Threads of a block are ucontexts on one OS thread, switched at __syncthreads and at warp-collective MMAs
// (round robin, forward or backward). mma.sync m16n8k16 follows the PTX ISA's fragment tables (products and
// sums in double, rounded to float). cp.async copies land when the issuing thread's wait_group retires their
// group (late) or when issued (early), and every shared-memory word records which copy wrote it and in which
// barrier epoch, so a read that is not ordered after the copy by the issuer's wait_group and a __syncthreads
// (RAW), a copy issued in the epoch of another thread's read (WAR), and overlapping copies in flight are
// counted as races, whatever the schedule. Global reads of copies are bounds-checked against the buffers the
// caller registered; cp.async sizes and alignments are checked as the ISA requires.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)

struct Dim3 {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(2) __half {
    uint16_t bits;
};
struct alignas(4) __half2 {
    uint16_t lo, hi;
};
struct alignas(2) __nv_bfloat16 {
    uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
    uint16_t lo, hi;
};

static inline float half_bits_to_float(uint16_t b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (float)h;
}
static inline uint16_t float_to_half_bits(float f) {
    const _Float16 h = (_Float16)f;  // round to nearest even
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
}
static inline float bf16_bits_to_float(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t float_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float2 __half22float2(__half2 h) { return {half_bits_to_float(h.lo), half_bits_to_float(h.hi)}; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {float_to_bf16_bits(a), float_to_bf16_bits(b)};
}

#if FORGE_DTYPE == 1
typedef __nv_bfloat16 scalar_t;
static inline double mma_value(uint16_t b) { return bf16_bits_to_float(b); }
#else
typedef __half scalar_t;
static inline double mma_value(uint16_t b) { return half_bits_to_float(b); }
#endif
template <typename T> T from_float(float x);
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return {float_to_bf16_bits(x)}; }
template <> inline __half from_float<__half>(float x) { return {float_to_half_bits(x)}; }

static inline int min(int a, int b) { return a < b ? a : b; }

// e4m3 (bias 7, no infinities, 0x7F / 0xFF NaN) -> fp16 bits, exact.
static inline uint16_t e4m3_to_half_bits(unsigned v) {
    const unsigned s = (v >> 7) & 1, e = (v >> 3) & 15, m = v & 7;
    float f;
    if (e == 15 && m == 7) f = NAN;
    else if (e == 0) f = std::ldexp((float)m, -9);
    else f = std::ldexp(1.f + m / 8.f, (int)e - 7);
    return float_to_half_bits(s ? -f : f);
}
// cvt.rn.f16x2.e4m3x2 d, a: a's upper byte -> d's upper half, lower byte -> lower half.
static inline unsigned host_cvt_e4m3x2_f16x2(unsigned short in) {
    return e4m3_to_half_bits(in & 0xFF) | ((unsigned)e4m3_to_half_bits(in >> 8) << 16);
}
// lop3.b32 d, a, b, c, lut: bit i of d = lut[(a_i << 2) | (b_i << 1) | c_i].
static inline unsigned host_lop3(unsigned a, unsigned b, unsigned c, unsigned lut) {
    unsigned d = 0;
    for (int i = 0; i < 32; ++i) {
        const unsigned idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1);
        d |= ((lut >> idx) & 1u) << i;
    }
    return d;
}

// ---- the block's threads, its shared memory and the race bookkeeping ----

struct HostCopy {
    unsigned dst;
    const unsigned char* src;
    int bytes, src_bytes, id;
};
struct HostWord {  // one 4-byte word of dynamic shared memory
    int copy = -1, issuer = -1, issue_epoch = -1, done_epoch = -1;  // done_epoch -1: in flight
    int read_epoch = -1, reader = -1;
    bool many_readers = false;
};
enum HostState { RUNNABLE, AT_BARRIER, AT_MMA, DONE };
struct HostThread {
    ucontext_t ctx;
    std::vector<char> stack;
    Dim3 idx;
    HostState state = RUNNABLE;
    int epoch = 0;
    std::vector<HostCopy> open;
    std::deque<std::vector<HostCopy>> groups;
    unsigned a[4], b[2];
    float c[4], d[4];
};
struct HostBuffer {
    const unsigned char* base;
    size_t bytes;
};

struct HostBlock {
    std::vector<HostThread> threads;
    std::vector<unsigned char> smem;
    std::vector<HostWord> words;
    int last_block_int = 0;
    int next_copy = 0;
};

static HostBlock* g_block_state;
static HostThread* g_cur;
static ucontext_t g_sched;
static Dim3 g_block_idx, g_grid_dim;
static bool g_late = true;
static long g_races = 0, g_errors = 0;
static std::vector<HostBuffer> g_buffers;
static const unsigned long long HOST_POLICY = 0x5eed5eedULL;  // what evict_first_policy() "creates"

#define threadIdx (g_cur->idx)
#define blockIdx g_block_idx
#define gridDim g_grid_dim

static void host_report(bool race, const char* what, unsigned at) {
    if (race) ++g_races;
    else ++g_errors;
    if (g_races + g_errors <= 8)
        std::fprintf(stderr, "%s: %s (thread %u, block %u %u %u, shared byte %u, epoch %d)\n", race ? "race" : "error",
                     what, g_cur->idx.x, g_block_idx.x, g_block_idx.y, g_block_idx.z, at, g_cur->epoch);
}

static int host_tid() { return (int)g_cur->idx.x; }

static void host_yield(HostState s) {
    g_cur->state = s;
    swapcontext(&g_cur->ctx, &g_sched);
}

static void __syncthreads() { host_yield(AT_BARRIER); }
static void __threadfence() {}
static void __trap() {
    host_report(false, "__trap", 0);
    throw 1;
}
static int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}

static bool host_in_buffers(const void* p, size_t n) {
    const unsigned char* q = (const unsigned char*)p;
    for (const HostBuffer& b : g_buffers)
        if (q >= b.base && q + n <= b.base + b.bytes) return true;
    return false;
}
static float __ldcg(const float* p) {
    if (!host_in_buffers(p, 4)) host_report(false, "__ldcg outside the buffers", 0);
    return *p;
}

static unsigned smem_addr(const void* p) { return (unsigned)((const unsigned char*)p - g_block_state->smem.data()); }

// A shared-memory read of n bytes at p (p may also be a register's address: then nothing is checked).
static void host_check_read(const void* p, size_t n, size_t align) {
    HostBlock& b = *g_block_state;
    const unsigned char* q = (const unsigned char*)p;
    if (q < b.smem.data() || q >= b.smem.data() + b.smem.size()) return;
    const unsigned at = (unsigned)(q - b.smem.data());
    if (at % align) host_report(false, "misaligned shared load", at);
    if (at + n > b.smem.size()) host_report(false, "shared load past the dynamic size", at);
    for (unsigned w = at / 4; w < (at + n + 3) / 4 && w < b.words.size(); ++w) {
        HostWord& hw = b.words[w];
        const int me = host_tid(), e = g_cur->epoch;
        if (hw.copy < 0) host_report(true, "read of a word no copy wrote", at);
        else if (hw.issuer == me ? hw.done_epoch < 0 : (hw.done_epoch < 0 || e <= hw.done_epoch))
            host_report(true, "read not ordered after the copy (wait_group + __syncthreads)", at);
        if (hw.read_epoch == e && hw.reader != me) hw.many_readers = true;
        else if (hw.read_epoch != e) hw.read_epoch = e, hw.reader = me, hw.many_readers = false;
    }
}
template <typename T> static T host_deref(const void* p) {  // *reinterpret_cast<const T*>(p)
    host_check_read(p, sizeof(T), alignof(T));
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

static void host_issue(unsigned dst, const void* src, int bytes, int src_bytes) {
    HostBlock& b = *g_block_state;
    if (dst % bytes) host_report(false, "cp.async destination not aligned to its size", dst);
    if ((uintptr_t)src % bytes) host_report(false, "cp.async source not aligned to its size", dst);
    if (dst + bytes > b.smem.size()) {
        host_report(false, "cp.async past the dynamic shared memory", dst);
        return;
    }
    if (src_bytes && !host_in_buffers(src, src_bytes)) host_report(false, "cp.async reads outside the buffers", dst);
    const int me = host_tid(), e = g_cur->epoch;
    const HostCopy c{dst, (const unsigned char*)src, bytes, src_bytes, b.next_copy++};
    for (unsigned w = dst / 4; w < (dst + bytes) / 4; ++w) {
        HostWord& hw = b.words[w];
        if (hw.read_epoch == e && (hw.many_readers || hw.reader != me))
            host_report(true, "copy issued in the epoch of another thread's read (WAR)", dst);
        if (hw.copy >= 0 && (hw.issuer == me ? hw.done_epoch < 0 : (hw.done_epoch < 0 || e <= hw.done_epoch)))
            host_report(true, "copy overlaps a copy still in flight", dst);
        hw.copy = c.id, hw.issuer = me, hw.issue_epoch = e, hw.done_epoch = -1, hw.read_epoch = -1;
    }
    if (g_late) g_cur->open.push_back(c);
    else {
        std::memset(&b.smem[dst], 0, bytes);
        if (src_bytes) std::memcpy(&b.smem[dst], src, src_bytes);
        g_cur->open.push_back(HostCopy{dst, nullptr, bytes, -1, c.id});  // landed; retires with its group
    }
}

template <int BYTES> static void cp_async(unsigned dst, const void* src, bool pred) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    host_issue(dst, src, BYTES, pred ? BYTES : 0);
}
static void cp_async_stream16(unsigned dst, const void* src, bool pred, unsigned long long policy) {
    if (policy != HOST_POLICY) host_report(false, "cache policy is not evict_first_policy()'s", dst);
    host_issue(dst, src, 16, pred ? 16 : 0);
}
static unsigned long long evict_first_policy() { return HOST_POLICY; }
static void cp_async_commit() {
    g_cur->groups.push_back(std::move(g_cur->open));
    g_cur->open.clear();
}
template <int N> static void cp_async_wait() {
    HostBlock& b = *g_block_state;
    while ((int)g_cur->groups.size() > N) {
        for (const HostCopy& c : g_cur->groups.front()) {
            if (c.src_bytes >= 0) {
                std::memset(&b.smem[c.dst], 0, c.bytes);
                if (c.src_bytes) std::memcpy(&b.smem[c.dst], c.src, c.src_bytes);
            }
            for (unsigned w = c.dst / 4; w < (c.dst + c.bytes) / 4; ++w)
                if (b.words[w].copy == c.id) b.words[w].done_epoch = g_cur->epoch;
        }
        g_cur->groups.pop_front();
    }
}
template <typename T> static void pin(T&) {}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: a warp-collective; fragments as the PTX ISA lists them
// (group g = lane / 4, c = lane % 4; the lower k / column in the low 16 bits).
static void host_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, const float (&c)[4]) {
    HostThread& t = *g_cur;
    std::memcpy(t.a, a, sizeof t.a);
    t.b[0] = b0, t.b[1] = b1;
    std::memcpy(t.c, c, sizeof t.c);
    host_yield(AT_MMA);  // the scheduler computes the warp's d once all 32 lanes are here
    std::memcpy(d, t.d, sizeof t.d);
}
static void host_warp_mma(HostThread* lanes) {
    double A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, c = lane & 3;
        const HostThread& t = lanes[lane];
        for (int h = 0; h < 2; ++h) {
            A[g][2 * c + h] = mma_value(t.a[0] >> (16 * h));
            A[g + 8][2 * c + h] = mma_value(t.a[1] >> (16 * h));
            A[g][2 * c + 8 + h] = mma_value(t.a[2] >> (16 * h));
            A[g + 8][2 * c + 8 + h] = mma_value(t.a[3] >> (16 * h));
            B[2 * c + h][g] = mma_value(t.b[0] >> (16 * h));
            B[2 * c + 8 + h][g] = mma_value(t.b[1] >> (16 * h));
            C[g][2 * c + h] = t.c[h];
            C[g + 8][2 * c + h] = t.c[2 + h];
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, c = lane & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = 2 * c + (i & 1);
            double s = C[row][col];
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            lanes[lane].d[i] = (float)s;
        }
    }
}
static void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const float c[4] = {d[0], d[1], d[2], d[3]};
    host_mma(d, a, b0, b1, c);
}
static void mma16816_first(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const float c[4] = {0.f, 0.f, 0.f, 0.f};
    host_mma(d, a, b0, b1, c);
}

// ---- running a grid: blocks one after another in a given order, a block's threads round robin ----

static void (*g_entry)();
static void host_thread_main() {
    try {
        g_entry();
    } catch (int) {
    }
    if (!g_cur->open.empty() || !g_cur->groups.empty()) {
        bool copies = !g_cur->open.empty();
        for (auto& gr : g_cur->groups) copies |= !gr.empty();
        if (copies) host_report(true, "thread exits with copies in flight", 0);
    }
    g_cur->state = DONE;
}

static void host_run_block(int threads, size_t smem_bytes, bool backward) {
    HostBlock block;
    block.threads.resize(threads);
    block.smem.assign(smem_bytes, 0xA5);
    block.words.resize(smem_bytes / 4);
    g_block_state = &block;
    for (int i = 0; i < threads; ++i) {
        HostThread& t = block.threads[i];
        t.idx = {(unsigned)i, 0, 0};
        t.stack.resize(1 << 16);
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = t.stack.data();
        t.ctx.uc_stack.ss_size = t.stack.size();
        t.ctx.uc_link = &g_sched;
        makecontext(&t.ctx, host_thread_main, 0);
    }
    for (;;) {
        for (int k = 0; k < threads; ++k) {
            HostThread& t = block.threads[backward ? threads - 1 - k : k];
            if (t.state != RUNNABLE) continue;
            g_cur = &t;
            swapcontext(&g_sched, &t.ctx);
        }
        bool progress = false;
        for (int w = 0; w < threads / 32; ++w) {
            HostThread* lanes = &block.threads[32 * w];
            if (std::all_of(lanes, lanes + 32, [](const HostThread& t) { return t.state == AT_MMA; })) {
                host_warp_mma(lanes);
                for (int l = 0; l < 32; ++l) lanes[l].state = RUNNABLE;
                progress = true;
            }
        }
        if (progress) continue;
        int done = 0, barrier = 0;
        for (HostThread& t : block.threads) done += t.state == DONE, barrier += t.state == AT_BARRIER;
        if (done == threads) break;
        if (barrier + done == threads && done == 0) {
            for (HostThread& t : block.threads) t.state = RUNNABLE, ++t.epoch;
            continue;
        }
        g_cur = &block.threads[0];
        host_report(false, "deadlock: threads wait at a barrier or an MMA that cannot complete", 0);
        break;
    }
    g_block_state = nullptr;
}
