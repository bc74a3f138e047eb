// speedec: products of a few rows with a large weight matrix (AVX2 + FMA).
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
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

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
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "few_rows_linear: x [M, K] and w [N, K] expected");
  const bool w_bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  (w.scalar_type() == at::kFloat || w_bf16),
              "few_rows_linear: float32 or bfloat16 weights and rows only");
  TORCH_CHECK(w_bf16 || x.scalar_type() == at::kFloat,
              "few_rows_linear: float32 weights take float32 rows");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "few_rows_linear: CPU tensors only");
  TORCH_CHECK(x.size(1) == w.size(1), "few_rows_linear: x has ", x.size(1), " columns, w has ",
              w.size(1));
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (w_bf16)
    run<bf16>(xp, wc.data_ptr<bf16>(), op, M, K, N);
  else
    run<float>(xp, wc.data_ptr<float>(), op, M, K, N);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(speedec_kernels, m) {
  m.def("few_rows_linear(Tensor x, Tensor w) -> Tensor", &few_rows_linear);
}
