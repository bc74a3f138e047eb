// speedec: products of a few rows with a large weight matrix (AVX2 + FMA; an
// AVX-512 variant, op few_rows_linear.avx512, and its run-time probe further down).
//
// out[m, j] = sum_k x[m, k] * w[j, k] for x [M, K] and w [N, K] (the nn.Linear
// layout); w is float32 or bfloat16, x float32 (bfloat16 x is widened to float32
// first), products and sums in float32, the output in x's dtype. Decoding multiplies 1-8 rows by weights far larger than
// the caches, so the work is to stream w once: each pair of w rows is loaded
// into registers once per chunk of up to six x rows (x stays in L1/L2), and
// the next pair is prefetched while the current one is used.
//
// Batch invariance: the arithmetic of one output (m, j) — eight lane-wise FMA
// chains over k in order, then the same horizontal sum and scalar tail — does
// not depend on M, on the chunk (m) is in, on whether j is paired, or on how
// the threads split N. A row therefore gets bit-identical products whether it
// is multiplied alone or together with other rows (the scalar tail is built
// with -ffp-contract=off so that no instance fuses it differently). This
// removes the largest source of float32 differences between SPEED's batched
// steps and one-row decoding; attention and other ops are not covered.
//
// bfloat16 weights: eight bf16 values are loaded (16 bytes) and widened to
// float32 exactly (a bf16 is the top half of a float32), then used as above;
// the arithmetic is the float32 path's on the widened weights, so it is
// batch-invariant the same way and reads half the bytes.

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <setjmp.h>
#include <signal.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

// Eight weights starting at p, as float32 lanes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }

inline float horizontal_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

// C rows of x (at x, row stride K) against R = 1 or 2 rows of w starting at j.
template <int C, int R, typename W>
inline void block(const float* x, const W* w, float* out, int64_t K, int64_t N, int64_t j,
                  int64_t n_end) {
  const int64_t k8 = K & ~int64_t(7);
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < C; ++m) acc[r][m] = _mm256_setzero_ps();
  const bool prefetch = j + 2 * R <= n_end;
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 v[R];
    for (int r = 0; r < R; ++r) v[r] = load8(w + (j + r) * K + k);
    if (prefetch && (k & 15) == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (j + R + r) * K + k), _MM_HINT_T0);
    for (int m = 0; m < C; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(xv, v[r], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wr = w + (j + r) * K;
    for (int m = 0; m < C; ++m) {
      float s = horizontal_sum(acc[r][m]);
      for (int64_t k = k8; k < K; ++k) s += x[m * K + k] * widen(wr[k]);
      out[m * N + j + r] = s;
    }
  }
}

template <int R, typename W>
inline void all_rows(const float* x, const W* w, float* out, int64_t M, int64_t K, int64_t N,
                     int64_t j, int64_t n_end) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) block<6, R, W>(x + m * K, w, out + m * N, K, N, j, n_end);
  const float* xm = x + m * K;
  float* om = out + m * N;
  switch (M - m) {
    case 1: block<1, R, W>(xm, w, om, K, N, j, n_end); break;
    case 2: block<2, R, W>(xm, w, om, K, N, j, n_end); break;
    case 3: block<3, R, W>(xm, w, om, K, N, j, n_end); break;
    case 4: block<4, R, W>(xm, w, om, K, N, j, n_end); break;
    case 5: block<5, R, W>(xm, w, om, K, N, j, n_end); break;
    default: break;
  }
}

template <typename W>
void run(const float* xp, const W* wp, float* op, int64_t M, int64_t K, int64_t N) {
  // Work is split in pairs of w rows so that a pair never straddles two threads.
  at::parallel_for(0, (N + 1) / 2, 32, [&](int64_t begin, int64_t end) {
    const int64_t j0 = 2 * begin, j1 = std::min<int64_t>(2 * end, N);
    int64_t j = j0;
    for (; j + 1 < j1; j += 2) all_rows<2, W>(xp, wp, op, M, K, N, j, j1);
    for (; j < j1; ++j) all_rows<1, W>(xp, wp, op, M, K, N, j, j1);
  });
}

at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "few_rows_linear: x [..., K] and w [N, K] expected");
  const bool w_bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  (w.scalar_type() == at::kFloat || w_bf16),
              "few_rows_linear: float32 or bfloat16 weights and rows only");
  TORCH_CHECK(w_bf16 || x.scalar_type() == at::kFloat,
              "few_rows_linear: float32 weights take float32 rows");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "few_rows_linear: CPU tensors only");
  TORCH_CHECK(x.size(-1) == w.size(1), "few_rows_linear: x has ", x.size(-1), " columns, w has ",
              w.size(1));
  // Any leading dimensions: rows are x's rows, the output has x's shape with N columns.
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  const at::Tensor xc = x.to(at::kFloat).contiguous().view({-1, x.size(-1)});
  const at::Tensor wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (w_bf16)
    run<bf16>(xp, wc.data_ptr<bf16>(), op, M, K, N);
  else
    run<float>(xp, wc.data_ptr<float>(), op, M, K, N);
  out = out.view(shape);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// ---------------------------------------------------------------------------
// few_rows_linear.avx512 (few_rows_linear_avx512 here): the same product with
// 16-lane (AVX-512) accumulators.
//
// Only the functions marked SPEEDEC_AVX512 / SPEEDEC_AVX512_BF16 contain AVX-512
// instructions (the rest of the file is built for AVX2 + FMA), and the op runs
// them only after probe_avx512 (below) has seen such instructions execute, so
// the library still loads and its AVX2 ops still run on CPUs without AVX-512.
//
// Arithmetic of one output (m, j), float32 rows (bf16 rows are widened first)
// and float32 or bf16 weights (widened exactly, as in the AVX2 path): sixteen
// lane-wise FMA chains over k in order, 16 k at a time, the last K % 16 columns
// as one more FMA step on zero-filled (masked) loads, then a fixed horizontal sum
// (the two 256-bit halves added, then the AVX2 path's eight-lane sum). Nothing
// in it depends on M, on which chunk of up to eight x rows holds row m, on
// whether j is in a pair of w rows, or on how the threads split N: batch-
// invariant bit for bit, as the AVX2 path is. (The two paths round differently,
// so they differ from each other in the last bits.)
//
// bf16 rows with bf16 weights, where AVX512_BF16 runs: vdpbf16ps multiplies
// 32 bf16 pairs and adds them pairwise into 16 float32 lanes (lane i takes
// k = 32 s + 2 i and 2 i + 1, in the instruction's fixed order; input and output
// denormals are flushed), the last K % 32 columns as one more step on masked
// loads, then the same horizontal sum. Nothing depends on M, the chunk, the
// pairing or the thread split either. It needs no widening and no float32 copy
// of the rows (half the bytes of x to re-read per w row), and measured faster
// than widening for 1-16 rows on the development host (see speedec/kernels.py);
// CPUs without AVX512_BF16 widen bf16 rows instead. The bf16 output is the
// float32 sum rounded once.

#define SPEEDEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define SPEEDEC_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Sixteen weights starting at p (the first `lanes` of them, the rest zero) as float32.
SPEEDEC_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SPEEDEC_AVX512 inline __m512 load16(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
SPEEDEC_AVX512 inline __m512 widen16(__m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
SPEEDEC_AVX512 inline __m512 load16(const bf16* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
SPEEDEC_AVX512 inline __m512 load16(const bf16* p, __mmask16 lanes) {
  return widen16(_mm256_maskz_loadu_epi16(lanes, p));
}

SPEEDEC_AVX512 inline float horizontal_sum16(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return horizontal_sum(_mm256_add_ps(lo, hi));
}

// C rows of x (float32, row stride K) against R = 1 or 2 rows of w starting at j;
// out is float32 or bf16 (each sum rounded once, to nearest even, as Tensor.to rounds).
template <int C, int R, typename W, typename O>
SPEEDEC_AVX512 inline void block16(const float* x, const W* w, O* out, int64_t K, int64_t N, int64_t j,
                                   bool prefetch) {
  const int64_t k16 = K & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (K & 15)) - 1);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < C; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k16; k += 16) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) v[r] = load16(w + (j + r) * K + k);
    // The next rows' cache line at this column (in the loop itself: GCC drops a prefetch-only
    // helper that it does not inline, as a call without effects).
    if (prefetch && (k & (64 / sizeof(W) - 1)) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (j + R + r) * K + k), _MM_HINT_T0);
    for (int m = 0; m < C; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * K + k);
      // One load of x for both w rows: GCC would fold it into each FMA, and 512-bit
      // loads, not FMAs, limit this loop at 4-8 rows (measured: 5-10% faster).
      if (R > 1) asm("" : "+v"(xv));
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv, v[r], acc[r][m]);
    }
  }
  if (tail) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) v[r] = load16(w + (j + r) * K + k16, tail);
    for (int m = 0; m < C; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + k16);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv, v[r], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < C; ++m) out[m * N + j + r] = static_cast<O>(horizontal_sum16(acc[r][m]));
}

// bf16 rows (row stride K) against R rows of bf16 w: vdpbf16ps, 32 columns a step.
template <int C, int R, typename O>
SPEEDEC_AVX512_BF16 inline void block_dpbf16(const bf16* x, const bf16* w, O* out, int64_t K, int64_t N,
                                             int64_t j, bool prefetch) {
  const int64_t k32 = K & ~int64_t(31);
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (K & 31)) - 1);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < C; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k32; k += 32) {
    __m512bh v[R];
    for (int r = 0; r < R; ++r) v[r] = (__m512bh)_mm512_loadu_si512(w + (j + r) * K + k);
    if (prefetch)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (j + R + r) * K + k), _MM_HINT_T0);
    for (int m = 0; m < C; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, v[r]);
    }
  }
  if (tail) {
    __m512bh v[R];
    for (int r = 0; r < R; ++r) v[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (j + r) * K + k32);
    for (int m = 0; m < C; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k32);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, v[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < C; ++m) out[m * N + j + r] = static_cast<O>(horizontal_sum16(acc[r][m]));
}

// The block kernels as types, for all_rows16. (BlockDpbf16's is a call from all_rows16: a
// function with more target features cannot be inlined into one with fewer.)
struct Block16 {
  template <int C, int R, typename X, typename W, typename O>
  SPEEDEC_AVX512 static void call(const X* x, const W* w, O* out, int64_t K, int64_t N, int64_t j,
                                  bool prefetch) {
    block16<C, R>(x, w, out, K, N, j, prefetch);
  }
};
struct BlockDpbf16 {
  template <int C, int R, typename X, typename W, typename O>
  SPEEDEC_AVX512_BF16 static void call(const X* x, const W* w, O* out, int64_t K, int64_t N, int64_t j,
                                       bool prefetch) {
    block_dpbf16<C, R>(x, w, out, K, N, j, prefetch);
  }
};

// Every row of x against R rows of w at j, in chunks of up to eight rows.
template <typename B, int R, typename X, typename W, typename O>
SPEEDEC_AVX512 inline void all_rows16(const X* x, const W* w, O* out, int64_t M, int64_t K, int64_t N, int64_t j,
                                      int64_t n_end) {
  const bool prefetch = j + 2 * R <= n_end;
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) B::template call<8, R>(x + m * K, w, out + m * N, K, N, j, prefetch);
  const X* xm = x + m * K;
  O* om = out + m * N;
  switch (M - m) {
    case 1: B::template call<1, R>(xm, w, om, K, N, j, prefetch); break;
    case 2: B::template call<2, R>(xm, w, om, K, N, j, prefetch); break;
    case 3: B::template call<3, R>(xm, w, om, K, N, j, prefetch); break;
    case 4: B::template call<4, R>(xm, w, om, K, N, j, prefetch); break;
    case 5: B::template call<5, R>(xm, w, om, K, N, j, prefetch); break;
    case 6: B::template call<6, R>(xm, w, om, K, N, j, prefetch); break;
    case 7: B::template call<7, R>(xm, w, om, K, N, j, prefetch); break;
    default: break;
  }
}

// The w rows [j0, j1) of one thread: pairs, then a last single row.
template <typename B, typename X, typename W, typename O>
SPEEDEC_AVX512 __attribute__((noinline)) void rows16(const X* x, const W* w, O* out, int64_t M, int64_t K, int64_t N,
                                                     int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 1 < j1; j += 2) all_rows16<B, 2>(x, w, out, M, K, N, j, j1);
  for (; j < j1; ++j) all_rows16<B, 1>(x, w, out, M, K, N, j, j1);
}

template <typename B, typename X, typename W, typename O>
void run16(const X* xp, const W* wp, O* op, int64_t M, int64_t K, int64_t N) {
  // As run(): pairs of w rows never straddle two threads.
  at::parallel_for(0, (N + 1) / 2, 32, [&](int64_t begin, int64_t end) {
    rows16<B>(xp, wp, op, M, K, N, 2 * begin, std::min<int64_t>(2 * end, N));
  });
}

// ---------------------------------------------------------------------------
// probe_avx512(isa): whether "avx512" (F + BW + VL, what few_rows_linear.avx512
// executes) or "avx512bf16" (its vdpbf16ps path, needs "avx512" too) really runs
// here. CPUID must report the set and XGETBV that the OS saves the opmask and
// ZMM state; then a few of its instructions run under a SIGILL handler (a CPUID
// flag is not proof: some hosts advertise instructions whose first use raises
// SIGILL). Probed once per process; probe_avx512_reason says why not.

struct CpuRegs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

CpuRegs cpuid_regs(unsigned leaf, unsigned sub) {
  CpuRegs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) return CpuRegs{};
  return r;
}

volatile int g_probe_sink = 1;

SPEEDEC_AVX512 __attribute__((noinline)) void run_avx512() {
  alignas(64) uint16_t raw[16] = {};
  raw[0] = static_cast<uint16_t>(g_probe_sink);
  __m512 v = _mm512_set1_ps(static_cast<float>(g_probe_sink));
  asm volatile("" : "+v"(v));
  v = _mm512_fmadd_ps(v, load16(reinterpret_cast<const bf16*>(raw), static_cast<__mmask16>(g_probe_sink | 1)), v);
  asm volatile("" : "+v"(v));
  g_probe_sink = static_cast<int>(horizontal_sum16(v));
}

SPEEDEC_AVX512_BF16 __attribute__((noinline)) void run_avx512bf16() {
  __m512 v = _mm512_set1_ps(static_cast<float>(g_probe_sink));
  asm volatile("" : "+v"(v));
  const __m512bh h = _mm512_cvtne2ps_pbh(v, v);
  v = _mm512_dpbf16_ps(v, h, h);
  asm volatile("" : "+v"(v));
  g_probe_sink = static_cast<int>(_mm512_cvtss_f32(v));
}

sigjmp_buf g_probe_jump;
void on_probe_sigill(int) { siglongjmp(g_probe_jump, 1); }

// Whether fn returns rather than raising SIGILL (the previous handler is restored either way).
bool runs_without_sigill(void (*fn)()) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  struct sigaction action {}, previous {};
  action.sa_handler = on_probe_sigill;
  sigemptyset(&action.sa_mask);
  sigaction(SIGILL, &action, &previous);
  volatile bool ran = false;
  if (sigsetjmp(g_probe_jump, 1) == 0) {
    fn();
    ran = true;
  }
  sigaction(SIGILL, &previous, nullptr);
  return ran;
}

// "" where the set runs, else why not.
std::string probe_now(const std::string& isa) {
  const CpuRegs l1 = cpuid_regs(1, 0), l7 = cpuid_regs(7, 0);
  const bool avx512 = ((l7.b >> 16) & 1) && ((l7.b >> 30) & 1) && ((l7.b >> 31) & 1);  // F, BW, VL
  if (!avx512) return "CPUID reports no AVX-512 F/BW/VL";
  if (isa == "avx512bf16" && !((cpuid_regs(7, 1).a >> 5) & 1)) return "CPUID reports no AVX512_BF16";
  if (!((l1.c >> 27) & 1)) return "the OS does not enable XSAVE (no XGETBV)";
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xe6) != 0xe6) return "the OS does not save the ZMM and opmask state (XCR0)";
  if (!runs_without_sigill(run_avx512)) return "AVX-512 F/BW/VL is advertised but raised SIGILL";
  if (isa == "avx512bf16" && !runs_without_sigill(run_avx512bf16))
    return "AVX512_BF16 is advertised but raised SIGILL";
  return "";
}

const std::string& probe_reason(const std::string& isa) {
  TORCH_CHECK(isa == "avx512" || isa == "avx512bf16", "probe_avx512: isa must be 'avx512' or 'avx512bf16', got '",
              isa, "'");
  static const std::string avx512 = probe_now("avx512");
  static const std::string bf16 = probe_now("avx512bf16");
  return isa == "avx512" ? avx512 : bf16;
}

bool probe_avx512(c10::string_view isa) { return probe_reason(std::string(isa)).empty(); }
std::string probe_avx512_reason(c10::string_view isa) { return probe_reason(std::string(isa)); }

at::Tensor few_rows_linear_avx512(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "few_rows_linear.avx512: x [..., K] and w [N, K] expected");
  const bool w_bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  (w.scalar_type() == at::kFloat || w_bf16),
              "few_rows_linear.avx512: float32 or bfloat16 weights and rows only");
  TORCH_CHECK(w_bf16 || x.scalar_type() == at::kFloat, "few_rows_linear.avx512: float32 weights take float32 rows");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "few_rows_linear.avx512: CPU tensors only");
  TORCH_CHECK(x.size(-1) == w.size(1), "few_rows_linear.avx512: x has ", x.size(-1), " columns, w has ", w.size(1));
  const std::string& why = probe_reason("avx512");
  TORCH_CHECK(why.empty(), "few_rows_linear.avx512: cannot run here: ", why);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  const at::Tensor wc = w.contiguous();
  const bool dot_bf16 = w_bf16 && x.scalar_type() == at::kBFloat16 && probe_reason("avx512bf16").empty();
  const at::Tensor xc = (dot_bf16 ? x : x.to(at::kFloat)).contiguous().view({-1, x.size(-1)});
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  // The output in x's dtype, written by the kernel (bf16: each float32 sum rounded once).
  at::Tensor out = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    bf16* op = out.data_ptr<bf16>();
    if (dot_bf16)
      run16<BlockDpbf16>(xc.data_ptr<bf16>(), wc.data_ptr<bf16>(), op, M, K, N);
    else
      run16<Block16>(xc.data_ptr<float>(), wc.data_ptr<bf16>(), op, M, K, N);
  } else if (w_bf16) {
    run16<Block16>(xc.data_ptr<float>(), wc.data_ptr<bf16>(), out.data_ptr<float>(), M, K, N);
  } else {
    run16<Block16>(xc.data_ptr<float>(), wc.data_ptr<float>(), out.data_ptr<float>(), M, K, N);
  }
  return out.view(shape);
}

// rms_norm: out = x * (1 / sqrt(mean(x^2) + eps)) * w over the last dimension,
// float32. Each row's mean square is an eight-lane FMA chain then the
// horizontal sum above (a fixed order, whatever the number of rows: batch-
// invariant), and one call replaces the six element-wise ops of the PyTorch
// formulation, which cost more than the arithmetic at a decoding step's rows.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  w.device().is_cpu(), "rms_norm: float32 CPU tensors only");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: x [..., D] and w [D] expected");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  const int64_t D = w.size(0), rows = D == 0 ? 0 : xc.numel() / D, d8 = D & ~int64_t(7);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < d8; d += 8) {
      const __m256 v = _mm256_loadu_ps(row + d);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = horizontal_sum(acc);
    for (int64_t d = d8; d < D; ++d) ss += row[d] * row[d];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 sv = _mm256_set1_ps(scale);
    float* o = op + r * D;
    for (int64_t d = 0; d < d8; d += 8)
      _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + d), sv), _mm256_loadu_ps(wp + d)));
    for (int64_t d = d8; d < D; ++d) o[d] = (row[d] * scale) * wp[d];
  }
  return out;
}

// ---------------------------------------------------------------------------
// slot_attention: one decoding step's self-attention for rows at their own
// loops and positions, with the KV cache writes, in one call.
//
// Row n (query q[n] [H, hd], key/value k[n], v[n] [Hkv, hd]) sits at loop
// loops[n] and position positions[n]. Its key and value are written to the
// cache at (layer, its loop, head, its position), all rows first; then each
// (row, head) attends over its own virtual layer's keys 0..position:
// scores = (q . key) * scale, softmax, weighted sum of values. The cache is
// [K, L, Hkv, max_len, hd] float32, contiguous; head h reads kv head
// h / (H / Hkv) (grouped-query attention).
//
// Determinism: each (row, head) is computed by one thread, in a fixed order
// (eight-lane FMA dot products then the horizontal sum above, the softmax's
// max, exp and sum over positions in order, the weighted values accumulated
// over positions in order). A row's output depends on its query, its loop's
// cache and its position only: not on the other rows, how many there are or
// which loops they are at, nor on the thread count. One-row decoding and
// SPEED's batched steps therefore attend bit for bit alike.

inline float dot(const float* a, const float* b, int64_t n) {
  const int64_t n8 = n & ~int64_t(7);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = horizontal_sum(acc);
  for (int64_t i = n8; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Attention of N rows (queries at q + n * q_row + h * q_head) over their caches,
// after the rows' keys and values are written (see slot_attention).
at::Tensor attend_rows(const float* qp, int64_t q_row, int64_t q_head, const float* kc, const float* vc,
                       int64_t layer, int64_t n_loops, int64_t Hkv, int64_t max_len, int64_t N, int64_t H,
                       int64_t hd, at::IntArrayRef loops, at::IntArrayRef positions, double scale,
                       const at::TensorOptions& options) {
  auto head_base = [&](const float* cache, int64_t l, int64_t j) {
    return cache + (((layer * n_loops + l) * Hkv + j) * max_len) * hd;
  };
  at::Tensor out = at::empty({N, H * hd}, options);
  float* op = out.data_ptr<float>();
  const int64_t rep = H / Hkv;
  const float fscale = static_cast<float>(scale);
  int64_t longest = 1;
  for (int64_t n = 0; n < N; ++n) longest = std::max<int64_t>(longest, positions[n] + 1);
  // Small steps stay on one thread: the split costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / (longest * hd));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(longest);
    std::vector<float> acc(hd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, h = task % H, j = h / rep, S = positions[n] + 1;
      const float* query = qp + n * q_row + h * q_head;
      const float* kb = head_base(kc, loops[n], j);
      const float* vb = head_base(vc, loops[n], j);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        weights[s] = dot(query, kb + s * hd, hd) * fscale;
        top = std::max(top, weights[s]);
      }
      float total = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        weights[s] = std::exp(weights[s] - top);
        total += weights[s];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t hd8 = hd & ~int64_t(7);
      for (int64_t s = 0; s < S; ++s) {
        const __m256 w = _mm256_set1_ps(weights[s]);
        const float* row = vb + s * hd;
        for (int64_t d = 0; d < hd8; d += 8)
          _mm256_storeu_ps(acc.data() + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(row + d), _mm256_loadu_ps(acc.data() + d)));
        for (int64_t d = hd8; d < hd; ++d) acc[d] += weights[s] * row[d];
      }
      float* o = op + n * H * hd + h * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = acc[d] / total;
    }
  });
  return out;
}

at::Tensor slot_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor keys, at::Tensor values, int64_t layer, at::IntArrayRef loops,
                          at::IntArrayRef positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "slot_attention: q [N, H, hd], k, v [N, Hkv, hd]");
  TORCH_CHECK(keys.dim() == 5 && values.sizes() == keys.sizes(), "slot_attention: caches [K, L, Hkv, S, hd]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(-1) == 1,
                "slot_attention: float32 CPU tensors with a contiguous last dimension");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "slot_attention: contiguous caches");
  const int64_t N = q.size(0), H = q.size(1), hd = q.size(2), Hkv = k.size(1);
  const int64_t n_loops = keys.size(1), max_len = keys.size(3);
  TORCH_CHECK(k.size(0) == N && v.size(0) == N && v.size(1) == Hkv && k.size(2) == hd && v.size(2) == hd &&
                  keys.size(2) == Hkv && keys.size(4) == hd && H % Hkv == 0,
              "slot_attention: inconsistent shapes");
  TORCH_CHECK(static_cast<int64_t>(loops.size()) == N && static_cast<int64_t>(positions.size()) == N,
              "slot_attention: one loop and one position per row");
  TORCH_CHECK(layer >= 0 && layer < keys.size(0), "slot_attention: layer out of range");
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(loops[n] >= 0 && loops[n] < n_loops && positions[n] >= 0 && positions[n] < max_len,
                "slot_attention: loop or position outside the cache");
  float* kc = keys.data_ptr<float>();
  float* vc = values.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  auto head_base = [&](float* cache, int64_t l, int64_t j) {
    return cache + (((layer * n_loops + l) * Hkv + j) * max_len) * hd;
  };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < Hkv; ++j) {
      std::memcpy(head_base(kc, loops[n], j) + positions[n] * hd, kp + n * k.stride(0) + j * k.stride(1),
                  hd * sizeof(float));
      std::memcpy(head_base(vc, loops[n], j) + positions[n] * hd, vp + n * v.stride(0) + j * v.stride(1),
                  hd * sizeof(float));
    }
  return attend_rows(qp, q.stride(0), q.stride(1), kc, vc, layer, n_loops, Hkv, max_len, N, H, hd, loops,
                     positions, scale, q.options());
}


// slot_attention_rope: slot_attention on the fused q/k/v projection of the
// rows, rotary embedding included. qkv [N, (H + 2 Hkv) hd] holds each row's
// H query heads, Hkv key heads and Hkv value heads; rope [max_len, 2, hd]
// (float64, or float32 when the model was cast) holds cos and the signed sin
// of every position (model.py rope_table). Queries and keys are rotated at the rows' positions as
// model.py's apply_rope does, x * cos + roll(x, hd / 2) * sin with cos and sin
// rounded to float32, each product and the sum rounded on its own (no FMA:
// -ffp-contract=off), so a rotated value is bit for bit PyTorch's; the keys
// go to the cache rotated, then the rows attend as in slot_attention.
at::Tensor slot_attention_rope(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor keys, at::Tensor values,
                               int64_t layer, at::IntArrayRef loops, at::IntArrayRef positions, int64_t heads,
                               double scale) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() && qkv.stride(1) == 1,
              "slot_attention_rope: qkv [N, (H + 2 Hkv) hd] float32 CPU with contiguous rows");
  TORCH_CHECK(keys.dim() == 5 && values.sizes() == keys.sizes() && keys.is_contiguous() && values.is_contiguous() &&
                  keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "slot_attention_rope: contiguous float32 caches [K, L, Hkv, S, hd]");
  const int64_t N = qkv.size(0), Hkv = keys.size(2), hd = keys.size(4), H = heads;
  const int64_t n_loops = keys.size(1), max_len = keys.size(3);
  TORCH_CHECK(hd % 2 == 0 && H % Hkv == 0 && qkv.size(1) == (H + 2 * Hkv) * hd,
              "slot_attention_rope: qkv has ", qkv.size(1), " columns, expected (H + 2 Hkv) hd = ",
              (H + 2 * Hkv) * hd);
  TORCH_CHECK(rope.dim() == 3 && rope.size(1) == 2 && rope.size(2) == hd &&
                  (rope.scalar_type() == at::kDouble || rope.scalar_type() == at::kFloat) && rope.is_contiguous(),
              "slot_attention_rope: rope table [max_len, 2, hd] float64 or float32");
  TORCH_CHECK(static_cast<int64_t>(loops.size()) == N && static_cast<int64_t>(positions.size()) == N,
              "slot_attention_rope: one loop and one position per row");
  TORCH_CHECK(layer >= 0 && layer < keys.size(0), "slot_attention_rope: layer out of range");
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(loops[n] >= 0 && loops[n] < n_loops && positions[n] >= 0 && positions[n] < max_len &&
                    positions[n] < rope.size(0), "slot_attention_rope: loop or position outside the cache");
  float* kc = keys.data_ptr<float>();
  float* vc = values.data_ptr<float>();
  const float* xp = qkv.data_ptr<float>();
  const bool wide = rope.scalar_type() == at::kDouble;
  const double* table = wide ? rope.data_ptr<double>() : nullptr;
  const float* table32 = wide ? nullptr : rope.data_ptr<float>();
  const int64_t row_stride = qkv.stride(0), half = hd / 2;
  std::vector<float> queries(N * H * hd), c(hd), sn(hd);
  auto rotate = [&](const float* x, float* out) {
    for (int64_t d = 0; d < hd; ++d) {
      const float a = x[d] * c[d];
      const float b = x[(d + half) % hd] * sn[d];
      out[d] = a + b;
    }
  };
  for (int64_t n = 0; n < N; ++n) {
    // The angles rounded to float32 as rope[pos].to(float32) rounds them.
    for (int64_t d = 0; d < hd; ++d) {
      c[d] = wide ? static_cast<float>(table[positions[n] * 2 * hd + d]) : table32[positions[n] * 2 * hd + d];
      sn[d] = wide ? static_cast<float>(table[positions[n] * 2 * hd + hd + d])
                   : table32[positions[n] * 2 * hd + hd + d];
    }
    const float* row = xp + n * row_stride;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * hd, queries.data() + (n * H + h) * hd);
    for (int64_t j = 0; j < Hkv; ++j) {
      const int64_t base = (((layer * n_loops + loops[n]) * Hkv + j) * max_len + positions[n]) * hd;
      rotate(row + (H + j) * hd, kc + base);
      std::memcpy(vc + base, row + (H + Hkv + j) * hd, hd * sizeof(float));
    }
  }
  return attend_rows(queries.data(), H * hd, hd, kc, vc, layer, n_loops, Hkv, max_len, N, H, hd, loops, positions,
                     scale, qkv.options());
}

}  // namespace

TORCH_LIBRARY(speedec_kernels, m) {
  m.def("few_rows_linear(Tensor x, Tensor w) -> Tensor", &few_rows_linear);
  // The AVX-512 variant is an overload (few_rows_linear.avx512): code that recognises the
  // few-row product by its op name (tests/helpers.py's weight-read counter) sees both paths.
  // A call without an overload name resolves to the default (AVX2) one, registered first.
  m.def("few_rows_linear.avx512(Tensor x, Tensor w) -> Tensor", &few_rows_linear_avx512);
  m.def("probe_avx512(str isa) -> bool", &probe_avx512);
  m.def("probe_avx512_reason(str isa) -> str", &probe_avx512_reason);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("slot_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, int layer, "
        "int[] loops, int[] positions, float scale) -> Tensor", &slot_attention);
  m.def("slot_attention_rope(Tensor qkv, Tensor rope, Tensor(a!) keys, Tensor(b!) values, int layer, "
        "int[] loops, int[] positions, int heads, float scale) -> Tensor", &slot_attention_rope);
}
