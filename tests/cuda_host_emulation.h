// A CPU stand-in for the CUDA features quant_gemm_pipe.cu uses, so that its source (quant_common.cuh's inlined by
// tests/host_kernels.py, a few asm helpers swapped for the functions below by tests/test_quant_gemm_pipe_host.py)
// runs on the host with its own index math.
//
// Threads of a block are ucontexts on one OS thread, switched at __syncthreads and at warp-collective MMAs
// (round robin, forward or backward). mma.sync m16n8k16 follows the PTX ISA's fragment tables (products and
// sums in double, rounded to float). cp.async copies land when the issuing thread's wait_group retires their
// group (late) or when issued (early), and every shared-memory word records which copy wrote it and in which
// barrier epoch, so a read that is not ordered after the copy by the issuer's wait_group and a __syncthreads
// (RAW), a copy issued in the epoch of another thread's read (WAR), and overlapping copies in flight are
// counted as races, whatever the schedule. Global reads of copies are bounds-checked against the buffers the
// caller registered; cp.async sizes and alignments are checked as the ISA requires.
//
// With FORGE_HOST_COMMON defined, the test compiles forge/kernels/common.cuh's own source after this header (its
// includes dropped, its load / store / prefetch / PDL helpers swapped for the host_* functions below), as
// tests/test_quant_gemm_host.py does for quant_gemm.cu, norm.cu, activation.cu and rope_cache.cu. Then also:
// plain shared-memory stores and loads (store_vec, *reinterpret_cast, the `Sh<T>` elements a `__shared__` array
// becomes) are tracked per word as copies that land at once: a read of a word another thread wrote, or a write
// of a word another thread read or wrote, in the same barrier epoch is a race, and a read of a word nothing
// wrote in this block is one too; __shfl_xor_sync is a warp collective like mma.sync (each lane gets lane ^ o's
// value, every lane of the warp at the same call); global loads and stores are bounds-checked against the
// registered buffers, stores land only in buffers registered as outputs and count the writes of every byte, and
// with g_check_pdl a global access before the thread's forge_wait_prior_grid() is an error. Plain shared accesses
// are also grouped into warp requests (the lanes' n-th access from one call site) and their bank conflicts
// counted (g_banks).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
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
static inline double mma_value(uint16_t b) { return bf16_bits_to_float(b); }
#else
static inline double mma_value(uint16_t b) { return half_bits_to_float(b); }
#endif
#ifndef FORGE_HOST_COMMON  // else common.cuh's own scalar_t and from_float
#if FORGE_DTYPE == 1
typedef __nv_bfloat16 scalar_t;
#else
typedef __half scalar_t;
#endif
template <typename T> T from_float(float x);
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return {float_to_bf16_bits(x)}; }
template <> inline __half from_float<__half>(float x) { return {float_to_half_bits(x)}; }
#endif

// e4m3 (bias 7, no infinities, 0x7F / 0xFF NaN) -> fp16 bits, exact.
static inline uint16_t e4m3_to_half_bits(unsigned v) {
    const unsigned s = (v >> 7) & 1, e = (v >> 3) & 15, m = v & 7;
    float f;
    if (e == 15 && m == 7) f = NAN;
    else if (e == 0) f = std::ldexp((float)m, -9);
    else f = std::ldexp(1.f + m / 8.f, (int)e - 7);
    return float_to_half_bits(s ? -f : f);
}
// ---- what common.cuh and the kernels that include it call (cuda_bf16.h, cuda_fp16.h, cuda_fp8.h, math) ----
struct __half_raw {
    unsigned short x;
    operator __half() const { return {x}; }
};
struct __half2_raw {
    unsigned short x, y;
    operator __half2() const { return {x, y}; }
};
static inline float __bfloat162float(__nv_bfloat16 x) { return bf16_bits_to_float(x.bits); }
static inline float __half2float(__half x) { return half_bits_to_float(x.bits); }
static inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {float_to_bf16_bits(x)}; }
static inline __half __float2half_rn(float x) { return {float_to_half_bits(x)}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
static inline float2 make_float2(float x, float y) { return {x, y}; }
// The rounded product / fused multiply-add the kernels spell out (-ffp-contract=off keeps the rest unfused).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// rsqrtf: the GPU's is MUFU.RSQ (approximate, not correctly rounded); the host's is 1 / sqrt in double, rounded
// once. Two kernels that both call it agree on the host exactly when they agree on the GPU (same argument, same
// instruction), which is what the tests compare; the values themselves may differ from a GPU's in the last bits.
// Each call's argument is logged (g_rsqrt_args): two kernels' norms compare bit for bit in float32 there, where
// their bf16 / fp16 outputs would hide most one-ulp differences.
static std::vector<float> g_rsqrt_args;
static inline float rsqrtf(float x) {
    g_rsqrt_args.push_back(x);
    return (float)(1.0 / std::sqrt((double)x));
}

// e4m3: float -> code, round to nearest even, saturated to +-448 (__NV_SATFINITE), NaN -> 0x7F.
typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
struct __nv_fp8_e4m3 {
    __nv_fp8_storage_t __x;
};
static inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t, __nv_fp8_interpretation_t) {
    if (std::isnan(x)) return 0x7F;
    const unsigned char sign = std::signbit(x) ? 0x80 : 0;
    const double a = std::fabs((double)x);
    if (a >= 448.0) return sign | 0x7E;
    int e;
    std::frexp(a, &e);  // a = f 2^e, f in [0.5, 1): the leading bit is 2^(e - 1)
    const int ulp_exp = std::max(e - 1, -6) - 3;  // 3 mantissa bits; subnormals below 2^-6
    const double q = std::nearbyint(std::ldexp(a, -ulp_exp));  // round to nearest even (default mode)
    const double v = std::ldexp(q, ulp_exp);
    if (v == 0) return sign;
    int ve;
    std::frexp(v, &ve);
    if (ve - 1 < -6) return sign | (unsigned char)q;  // subnormal: code = m
    return sign | (unsigned char)(((ve - 1 + 7) << 3) | ((int)std::ldexp(v, -(ve - 1) + 3) & 7));
}
static inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 f, __nv_saturation_t s, __nv_fp8_interpretation_t i) {
    return (__nv_fp8x2_storage_t)(__nv_cvt_float_to_fp8(f.x, s, i) | (__nv_cvt_float_to_fp8(f.y, s, i) << 8));
}
static inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t x, __nv_fp8_interpretation_t) {
    return {(unsigned short)e4m3_to_half_bits(x)};
}
static inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t x, __nv_fp8_interpretation_t) {
    return {(unsigned short)e4m3_to_half_bits(x & 0xFF), (unsigned short)e4m3_to_half_bits(x >> 8)};
}

static inline int min(int a, int b) { return a < b ? a : b; }

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
static const size_t HOST_STACK = 1 << 16;  // a thread's coroutine stack
enum HostState { RUNNABLE, AT_BARRIER, AT_MMA, AT_SHFL, DONE };
struct HostThread {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;  // not zero-filled: a block of 256 threads would memset 16 MB
    Dim3 idx;
    HostState state = RUNNABLE;
    int epoch = 0;
    std::vector<HostCopy> open;
    std::deque<std::vector<HostCopy>> groups;
    unsigned a[4], b[2];
    float c[4], d[4];
    unsigned shfl_value, shfl_mask;  // __shfl_xor_sync: this lane's value (bits) and mask, then its result
    int shfl_xor;
    bool waited = false;  // forge_wait_prior_grid() called
    std::map<const void*, int> site_seq;  // shared accesses made so far from each call site
};
// A plain shared-memory access (bank conflicts): the lanes of a warp with the same (site, seq) made it together.
struct HostAccess {
    const void* site;
    int seq, warp, lane, epoch;
    bool store;
    unsigned bytes, at;  // at: byte offset (static shared memory from 0x100000)
};
// Per (epoch, store, bytes): warp-wide requests, the phases they take without conflicts, and the wavefronts
// the banks serve them in (shared memory: 32 banks of 4 bytes; 16-byte accesses in phases of 8 lanes, 8-byte
// of 16, narrower of 32; distinct words of one bank in a phase serialize, one word broadcasts).
struct HostBankStats {
    long requests = 0, phases = 0, wavefronts = 0;
};
static std::map<std::tuple<int, int, int>, HostBankStats> g_banks;
static const void* g_site;  // the kernel code that made the access being checked
struct HostBuffer {
    const unsigned char* base;
    size_t bytes;
    unsigned char* writes = nullptr;  // an output: one count per byte (stores land only in outputs)
};

static const size_t HOST_STATIC_SMEM = 48 * 1024;  // the static __shared__ arrays' arena
struct HostBlock {
    std::vector<HostThread> threads;
    std::vector<unsigned char> smem;  // dynamic
    std::vector<HostWord> words;
    std::vector<unsigned char> ssmem;  // static, bump-allocated by host_shared in declaration order
    std::vector<HostWord> swords;
    std::vector<std::pair<int, size_t>> statics;  // (declaration, offset)
    std::vector<HostAccess> accesses;
    int last_block_int = 0;
    int next_copy = 0;
};

static HostBlock* g_block_state;
static HostThread* g_cur;
static ucontext_t g_sched;
static Dim3 g_block_idx, g_grid_dim;
static bool g_late = true, g_check_pdl = false;
static size_t g_static_bytes = 0;  // the most static shared memory a block of the launch declared
static long g_races = 0, g_errors = 0;
static std::vector<HostBuffer> g_buffers;
static const unsigned long long HOST_POLICY = 0x5eed5eedULL;  // what evict_first_policy() "creates"

static Dim3 g_block_dim;
#define threadIdx (g_cur->idx)
#define blockIdx g_block_idx
#define gridDim g_grid_dim
#define blockDim g_block_dim

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

static const HostBuffer* host_buffer(const void* p, size_t n) {
    const unsigned char* q = (const unsigned char*)p;
    for (const HostBuffer& b : g_buffers)
        if (q >= b.base && q + n <= b.base + b.bytes) return &b;
    return nullptr;
}
static bool host_in_buffers(const void* p, size_t n) { return host_buffer(p, n) != nullptr; }
static float __ldcg(const float* p) {
    if (!host_in_buffers(p, 4)) host_report(false, "__ldcg outside the buffers", 0);
    return *p;
}

static unsigned smem_addr(const void* p) { return (unsigned)((const unsigned char*)p - g_block_state->smem.data()); }

// The shared region holding p: dynamic (offsets from 0) or static (reported from 0x100000); false if neither.
static bool host_shared_region(const void* p, std::vector<unsigned char>*& bytes, std::vector<HostWord>*& words,
                               unsigned& at, unsigned& report_base) {
    HostBlock& b = *g_block_state;
    const unsigned char* q = (const unsigned char*)p;
    if (q >= b.smem.data() && q < b.smem.data() + b.smem.size())
        bytes = &b.smem, words = &b.words, report_base = 0;
    else if (q >= b.ssmem.data() && q < b.ssmem.data() + b.ssmem.size())
        bytes = &b.ssmem, words = &b.swords, report_base = 0x100000;
    else
        return false;
    at = (unsigned)(q - bytes->data());
    return true;
}
static bool host_on_stack(const void* p) {  // a register (the thread's coroutine stack)
    const char* q = (const char*)p;
    return q >= g_cur->stack.get() && q < g_cur->stack.get() + HOST_STACK;
}
// A global access of n bytes at p: inside a registered buffer (an output for stores), aligned, after the
// thread's PDL wait where g_check_pdl. Returns the buffer (null: reported).
static const HostBuffer* host_check_global(const void* p, size_t n, size_t align, bool store) {
    const HostBuffer* buf = host_buffer(p, n);
    if (buf == nullptr) host_report(false, store ? "global store outside the buffers" : "global load outside the buffers", 0);
    else if (store && buf->writes == nullptr) host_report(false, "global store to an input buffer", 0);
    if ((uintptr_t)p % align) host_report(false, "misaligned global access", 0);
    if (g_check_pdl && !g_cur->waited) host_report(false, "global access before forge_wait_prior_grid()", 0);
    return buf;
}

// A plain shared access, for the bank counts (g_site: set by host_deref / host_store).
static void host_note_access(unsigned at, size_t n, bool store) {
    const int seq = g_cur->site_seq[g_site]++;
    g_block_state->accesses.push_back({g_site, seq, host_tid() / 32, host_tid() % 32, g_cur->epoch, store,
                                       (unsigned)n, at});
}
// A read of n bytes at p: shared memory (race checks), a global buffer (bounds) or a register (nothing).
// False: p is outside what the kernel may read (reported; the caller reads zeros instead).
static bool host_check_read(const void* p, size_t n, size_t align) {
    std::vector<unsigned char>* bytes;
    std::vector<HostWord>* words;
    unsigned at, base;
    if (!host_shared_region(p, bytes, words, at, base))
        return host_on_stack(p) || host_check_global(p, n, align, false) != nullptr;
    if (at % align) host_report(false, "misaligned shared load", base + at);
    if (at + n > bytes->size()) {
        host_report(false, "shared load past the dynamic size", base + at);
        return false;
    }
    host_note_access(base + at, n, false);
    for (unsigned w = at / 4; w < (at + n + 3) / 4 && w < words->size(); ++w) {
        HostWord& hw = (*words)[w];
        const int me = host_tid(), e = g_cur->epoch;
        if (hw.copy < 0) host_report(true, "read of a word no copy wrote", base + at);
        else if (hw.issuer == me ? hw.done_epoch < 0 : (hw.done_epoch < 0 || e <= hw.done_epoch))
            host_report(true, "read not ordered after the copy (wait_group + __syncthreads)", base + at);
        if (hw.read_epoch == e && hw.reader != me) hw.many_readers = true;
        else if (hw.read_epoch != e) hw.read_epoch = e, hw.reader = me, hw.many_readers = false;
    }
    return true;
}
template <typename T> __attribute__((noinline)) static T host_deref(const void* p) {  // *reinterpret_cast<const T*>(p)
    g_site = __builtin_return_address(0);
    T v;
    if (host_check_read(p, sizeof(T), alignof(T))) std::memcpy(&v, p, sizeof(T));
    else std::memset(&v, 0, sizeof(T));
    return v;
}
template <typename T> static T host_ld(const T* p) { return host_deref<T>(p); }  // p[i] of a global array

// A plain store of n bytes at p: in shared memory a copy issued and landed at once (another thread's read or
// write of the word in this epoch races with it); global: into an output buffer, counted. False: p is outside
// what the kernel may write (reported; the store is dropped, so that it cannot corrupt the host's memory).
static bool host_check_write(void* p, size_t n, size_t align) {
    std::vector<unsigned char>* bytes;
    std::vector<HostWord>* words;
    unsigned at, base;
    if (!host_shared_region(p, bytes, words, at, base)) {
        if (host_on_stack(p)) return true;
        const HostBuffer* buf = host_check_global(p, n, align, true);
        if (buf == nullptr || buf->writes == nullptr) return false;
        for (size_t i = 0; i < n; ++i) ++buf->writes[(const unsigned char*)p - buf->base + i];
        return true;
    }
    if (at % align) host_report(false, "misaligned shared store", base + at);
    if (at + n > bytes->size()) {
        host_report(false, "shared store past the dynamic size", base + at);
        return false;
    }
    host_note_access(base + at, n, true);
    const int me = host_tid(), e = g_cur->epoch, id = g_block_state->next_copy++;
    for (unsigned w = at / 4; w < (at + n + 3) / 4; ++w) {
        HostWord& hw = (*words)[w];
        if (hw.read_epoch == e && (hw.many_readers || hw.reader != me))
            host_report(true, "store in the epoch of another thread's read (WAR)", base + at);
        if (hw.copy >= 0 && (hw.issuer == me ? hw.done_epoch < 0 : (hw.done_epoch < 0 || e <= hw.done_epoch)))
            host_report(true, "store to a word another thread wrote in this epoch (WAW)", base + at);
        hw.copy = id, hw.issuer = me, hw.issue_epoch = e, hw.done_epoch = e, hw.read_epoch = -1;
    }
    return true;
}
template <typename T, typename U> __attribute__((noinline)) static void host_store(T* p, const U& v) {  // *p = v
    g_site = __builtin_return_address(0);
    const T t = v;
    if (host_check_write(p, sizeof(T), alignof(T))) std::memcpy((void*)p, &t, sizeof(T));
}

// An element of a __shared__ array: its reads and writes go through the checks above.
template <typename T> struct Sh {
    T v;
    operator T() const { return host_deref<T>(&v); }
    Sh& operator=(const T& x) {
        host_store(&v, x);
        return *this;
    }
};
// `__shared__ T name[...]` becomes `auto& name = host_shared<Sh<T>[...]>(__LINE__)`: one per block.
template <typename A> static A& host_shared(int declaration) {
    HostBlock& b = *g_block_state;
    for (const auto& [d, off] : b.statics)
        if (d == declaration) return *reinterpret_cast<A*>(&b.ssmem[off]);
    const size_t off = (b.statics.empty() ? 0 : b.ssmem.size() + 15) / 16 * 16;
    if (off + sizeof(A) > HOST_STATIC_SMEM) {
        host_report(false, "static shared memory past 48 KB", (unsigned)off);
        throw 1;
    }
    b.ssmem.resize(off + sizeof(A), 0xA5);  // within the reserved capacity: earlier arrays do not move
    b.swords.resize(b.ssmem.size() / 4 + 1);
    b.statics.emplace_back(declaration, off);
    return *reinterpret_cast<A*>(&b.ssmem[off]);
}

// ---- common.cuh's memory helpers, checked (FORGE_HOST_COMMON: the test removes common.cuh's own) ----
template <typename T, int N> struct Vec;
template <typename T, int N> static Vec<T, N> load_vec(const T* p) { return host_deref<Vec<T, N>>(p); }
template <typename T, int N> static Vec<T, N> load_vec_stream(const T* p) { return host_deref<Vec<T, N>>(p); }
template <typename T, int N> static void store_vec(T* p, const Vec<T, N>& v) { host_store((Vec<T, N>*)p, v); }
static uint4 host_load_stream16(const unsigned char* p) { return host_deref<uint4>(p); }  // ld.global.nc.v4
static void forge_prefetch_l2(const void* p) {  // prefetch.global.L2: an address inside the buffers
    if (!host_in_buffers(p, 1)) host_report(false, "prefetch outside the buffers", 0);
}
static void forge_wait_prior_grid() { g_cur->waited = true; }
static void forge_allow_dependents() {}
// sub.rn.{bf16,f16}x2 d, a, b (each half rounded once).
static unsigned host_sub_x2(unsigned a, unsigned b) {
    unsigned d = 0;
    for (int h = 0; h < 2; ++h) {
        const uint16_t x = a >> (16 * h), y = b >> (16 * h);
#if FORGE_DTYPE == 1
        const uint16_t r = float_to_bf16_bits(bf16_bits_to_float(x) - bf16_bits_to_float(y));
#else
        const uint16_t r = float_to_half_bits(half_bits_to_float(x) - half_bits_to_float(y));
#endif
        d |= (unsigned)r << (16 * h);
    }
    return d;
}

// __shfl_xor_sync: a warp collective; the scheduler gives lane l the value of lane l ^ o once all 32 are here.
template <typename T> static T __shfl_xor_sync(unsigned mask, T v, int o) {
    static_assert(sizeof(T) == 4, "32-bit shuffles");
    HostThread& t = *g_cur;
    std::memcpy(&t.shfl_value, &v, 4);
    t.shfl_mask = mask, t.shfl_xor = o;
    host_yield(AT_SHFL);
    T r;
    std::memcpy(&r, &t.shfl_value, 4);
    return r;
}
static void host_warp_shfl(HostThread* lanes) {
    unsigned in[32];
    for (int l = 0; l < 32; ++l) {
        in[l] = lanes[l].shfl_value;
        if (lanes[l].shfl_mask != 0xffffffffu || lanes[l].shfl_xor != lanes[0].shfl_xor || lanes[0].shfl_xor > 31) {
            g_cur = &lanes[l];
            host_report(false, "__shfl_xor_sync: lanes disagree on the mask or offset", 0);
        }
    }
    for (int l = 0; l < 32; ++l) lanes[l].shfl_value = in[(l ^ lanes[0].shfl_xor) & 31];
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

static void host_count_banks(std::vector<HostAccess>& acc) {
    std::sort(acc.begin(), acc.end(), [](const HostAccess& a, const HostAccess& b) {
        return std::tie(a.warp, a.site, a.seq, a.lane) < std::tie(b.warp, b.site, b.seq, b.lane);
    });
    for (size_t i = 0; i < acc.size();) {
        size_t j = i;
        while (j < acc.size() && acc[j].warp == acc[i].warp && acc[j].site == acc[i].site && acc[j].seq == acc[i].seq) ++j;
        const unsigned width = acc[i].bytes;
        const int per_phase = width >= 16 ? 8 : width == 8 ? 16 : 32;
        HostBankStats& st = g_banks[{acc[i].epoch, acc[i].store, (int)width}];
        ++st.requests;
        for (int ph = 0; ph < 32 / per_phase; ++ph) {
            std::vector<unsigned> words[32];
            bool any = false;
            for (size_t k = i; k < j; ++k) {
                if (acc[k].lane / per_phase != ph) continue;
                any = true;
                for (unsigned w = acc[k].at / 4; w < (acc[k].at + acc[k].bytes + 3) / 4; ++w)
                    if (std::find(words[w % 32].begin(), words[w % 32].end(), w) == words[w % 32].end())
                        words[w % 32].push_back(w);
            }
            if (!any) continue;
            size_t most = 1;
            for (auto& b : words) most = std::max(most, b.size());
            ++st.phases;
            st.wavefronts += (long)most;
        }
        i = j;
    }
}

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
    block.ssmem.reserve(HOST_STATIC_SMEM);
    g_block_state = &block;
    g_block_dim = {(unsigned)threads, 1, 1};
    for (int i = 0; i < threads; ++i) {
        HostThread& t = block.threads[i];
        t.idx = {(unsigned)i, 0, 0};
        t.stack.reset(new char[HOST_STACK]);
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = t.stack.get();
        t.ctx.uc_stack.ss_size = HOST_STACK;
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
            for (HostState s : {AT_MMA, AT_SHFL})
                if (std::all_of(lanes, lanes + 32, [s](const HostThread& t) { return t.state == s; })) {
                    if (s == AT_MMA) host_warp_mma(lanes);
                    else host_warp_shfl(lanes);
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
        host_report(false, "deadlock: threads wait at a barrier, an MMA or a shuffle that cannot complete", 0);
        break;
    }
    g_static_bytes = std::max(g_static_bytes, block.ssmem.size());
    host_count_banks(block.accesses);
    g_block_state = nullptr;
}
