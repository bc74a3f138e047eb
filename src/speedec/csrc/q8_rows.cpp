// speedec: 8-bit weights (llama.cpp's q8_0) times a few float32 rows, one kernel per instruction set.
//
// Weights: qs int8 [N, K] (values in [-127, 127]) and d float16 [N, K / 32]: W ~ qs * d, one scale
// per block of 32 consecutive weights along K (the nn.Linear layout). Rows: x float32 [..., K]. Each
// row's blocks are quantized as llama.cpp quantizes activations for a q8_0 product: amax = max |x|,
// dx = amax / 127 (float32, not rounded to fp16), xq = round_half_even(x * (127 / amax)) in
// [-127, 127]. Then
//
//   out[m, j] = sum_b (dx[m, b] * d[j, b]) * isum(m, j, b),   isum = sum_k xq[m, k] qs[j, k] (exact)
//
// with a fixed float32 order: block b adds its term into lane b % 16 (blocks in increasing order),
// then the 16 lanes are added pairwise, halves first (16 -> 8 -> 4 -> 2 -> 1). Every path here, and
// the PyTorch path of q8_kernels.py, performs exactly these float32 operations (no FMA among them;
// the scalar parts are built with -ffp-contract=off), so the paths agree bit for bit. An output
// (m, j) is computed the same way whatever the other rows, their number, the chunk of rows it is
// in, whether j is paired or which thread takes it: the product is batch-invariant.
//
// Streaming: a decoding step multiplies 1-16 rows by weights far larger than the caches, so each
// weight row is read once per call for all the rows (up to 16; more rows take another pass), in
// pairs, the next pair prefetched meanwhile. The integer dot products run on transposed blocks:
// the 8 (or 16) blocks of a group of one weight row are transposed in registers as 4-byte columns,
// so that lane l of every vector belongs to block l. One dot-product instruction per column then
// accumulates whole blocks per lane, and the block sums come out as one vector, ready to be scaled:
// no horizontal sum per block and row. The transpose is paid once per weight row and shared by all
// the rows; the rows are laid out to match once per call. For one to a few rows the 256-bit paths
// skip the transpose and gather each block's sum with horizontal adds instead (cheaper there).
// Weight rows go in tiles of 8 and K in chunks, so that the rows' share of a chunk stays in L1.
//
// Paths (one library: the base is built for AVX2 + FMA + F16C, the AVX-512 code in a
// `#pragma GCC target` region, AVX-VNNI's one instruction in inline assembly so the 256-bit code is
// shared with the avx2 path without letting the compiler use AVX-VNNI elsewhere):
//   avx2        |w| (u8) x sign(x, w) (s8) by vpmaddubsw, the pairs summed to int32 by vpmaddwd.
//   avxvnni     vpdpbusd (VEX, 256 bits) on w + 128 (u8) and xq (s8); the excess 128 * sum(xq) of
//               each block is precomputed with the rows and starts the accumulator negated.
//   avx512vnni  the same on 512 bits: groups of 16 blocks, transposed with vpermt2d.
// Integer ranges (nothing saturates, nothing overflows): a vpmaddubsw pair is at most
// 2 * 127 * 127 = 32258 <= 32767; a vpdpbusd product at most 255 * 127 and a lane's block sum at most
// 32 * 255 * 127 = 1036320, the excess at most 128 * 32 * 127 = 520192; |isum| <= 32 * 127 * 127 =
// 516128 < 2^24, so its float32 conversion is exact.
//
// probe(isa) says whether an instruction set really runs: CPUID and XGETBV first (a feature the CPU
// or the OS does not enable is reported missing), then a few of its instructions under a SIGILL
// handler. A flag is not proof: a hypervisor can advertise what it does not enable, and on Linux a
// process's first AMX tile instruction raises SIGILL unless it has requested the tile state first
// (arch_prctl ARCH_REQ_XCOMP_PERM, which the AMX probe does; with it, AMX runs on the development
// host, where it had been reported to raise SIGILL).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cpuid.h>
#include <immintrin.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;    // weights per scale
constexpr int kLanes = 16;        // float32 accumulation lanes: block b adds into lane b % 16
constexpr int kSteps = 8;         // 4-byte columns per block
constexpr int64_t kMaxRows = 16;  // rows per pass over the weights

// ---------------------------------------------------------------------------
// The rows of a call, quantized once; a row's values depend on that row only. The tables the
// groups read are group-major (a group's rows side by side, contiguous), not row-major: rows K
// bytes apart would fall into the same L1 sets (K = 4096: 16 rows, one set per line, 12 ways).
struct Rows {
  int64_t M = 0, K = 0, nb = 0, lanes = 0, groups = 0;
  at::Tensor storage;  // the tables below, one allocation
  const int8_t* q = nullptr;     // [M, K] xq in natural order (for the blocks after the last group)
  const float* dx = nullptr;     // [M, nb]
  const int8_t* t = nullptr;     // [groups, M, 8, lanes, 4]: column s, lane l = bytes 4s.. of block g lanes + l
  const float* gdx = nullptr;    // [groups, M, lanes] dx of the group's blocks
  const int32_t* gcorr = nullptr;  // [groups, M, lanes] -128 * sum of the block's xq (the VNNI offset)
};

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// One row's blocks: xq, dx and the negated, scaled block sums (see Rows).
void quantize_row(const float* x, int64_t nb, int8_t* q, float* dx, int32_t* corr) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    __m256i top = _mm256_setzero_si256();
    // max |x| on the bits: for non-negative floats integer order is float order, and a NaN (bits
    // above inf's) wins, so a NaN reaches dx and the outputs as it does through torch.amax.
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      top = _mm256_max_epi32(top, _mm256_and_si256(_mm256_castps_si256(v[i]), magnitude));
    }
    __m128i t4 = _mm_max_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    t4 = _mm_max_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_max_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    const float amax = _mm_cvtss_f32(_mm_castsi128_ps(t4));
    dx[b] = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i qi[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));  // 0 * inf (amax subnormal) -> 0
      qi[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));  // integral: exact
      sum = _mm256_add_epi32(sum, qi[i]);
    }
    // packs interleave the 128-bit halves: 4-byte groups come out as a0 b0 c0 d0 a1 b1 c1 d1.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), _mm256_permutevar8x32_epi32(bytes, order));
    corr[b] = -128 * hsum_epi32(sum);
  }
}

Rows prepare_rows(const float* x, int64_t M, int64_t K, int lanes) {
  Rows rows;
  const int64_t nb = K / kBlock, groups = nb / lanes;
  rows.M = M, rows.K = K, rows.nb = nb, rows.lanes = lanes, rows.groups = groups;
  // Each table 64-byte aligned (the allocator aligns the start).
  auto size = [](int64_t bytes) { return (bytes + 63) & ~int64_t(63); };
  const int64_t q_bytes = size(M * K), dx_bytes = size(M * nb * 4), t_bytes = groups * M * lanes * kBlock;
  const int64_t lane_bytes = groups * M * lanes * 4;
  rows.storage = at::empty({q_bytes + dx_bytes + t_bytes + 2 * lane_bytes}, at::kChar);
  char* base = reinterpret_cast<char*>(rows.storage.data_ptr<int8_t>());
  int8_t* const q = reinterpret_cast<int8_t*>(base);
  float* const dx = reinterpret_cast<float*>(base + q_bytes);
  int8_t* const t = reinterpret_cast<int8_t*>(base + q_bytes + dx_bytes);
  float* const gdx = reinterpret_cast<float*>(base + q_bytes + dx_bytes + t_bytes);
  int32_t* const gcorr = reinterpret_cast<int32_t*>(base + q_bytes + dx_bytes + t_bytes + lane_bytes);
  // Rows are independent; from 9 rows two threads share them (16 rows of K = 4096: ~20 us alone).
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> corr(nb);
    for (int64_t m = begin; m < end; ++m) {
      int8_t* qm = q + m * K;
      quantize_row(x + m * K, nb, qm, dx + m * nb, corr.data());
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t row = g * M + m;
        for (int s = 0; s < kSteps; ++s)
          for (int l = 0; l < lanes; ++l)
            std::memcpy(t + (row * kSteps + s) * lanes * 4 + l * 4, qm + (g * lanes + l) * kBlock + 4 * s, 4);
        std::memcpy(gdx + row * lanes, dx + m * nb + g * lanes, lanes * sizeof(float));
        std::memcpy(gcorr + row * lanes, corr.data() + g * lanes, lanes * sizeof(int32_t));
      }
    }
  });
  rows.q = q, rows.dx = dx, rows.t = t, rows.gdx = gdx, rows.gcorr = gcorr;
  return rows;
}

// ---------------------------------------------------------------------------
// Shared by the paths: the blocks after the last group, the sums, the loop over weight rows.

// The float32 lanes of up to 16 rows against a pair of weight rows.
struct PairLanes {
  alignas(64) float acc[kMaxRows][2][kLanes];
};

// A path's inner loop: groups g0.. g1 - 1 of weight rows j.. j + R - 1 (R = 1 or 2) against rows
// m0.. m0 + C - 1, added into lanes; prefetch: the next pair's same groups. Each path compiles it for
// its instruction set, and the base code calls it (not inlined across instruction sets).
using GroupsFn = void (*)(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j,
                          int R, int64_t g0, int64_t g1, PairLanes& lanes, bool prefetch);

// isum of one block: xq . qs, exactly (|w| * sign(x, w) = x * w byte by byte; see the ranges above).
inline int32_t block_isum(const int8_t* w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return hsum_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Blocks b0.. nb - 1 (fewer than a group), one at a time, into lane b % 16 as a group would add them.
void tail_blocks(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j, int R,
                 int64_t b0, PairLanes& lanes) {
  const int64_t K = x.K, nb = x.nb;
  for (int64_t b = b0; b < nb; ++b)
    for (int r = 0; r < R; ++r) {
      const float db = _cvtsh_ss(d[(j + r) * nb + b]);
      const int8_t* wb = w + (j + r) * K + b * kBlock;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t m = m0 + c;
        const float term = (x.dx[m * nb + b] * db) * static_cast<float>(block_isum(wb, x.q + m * K + b * kBlock));
        lanes.acc[c][r][b % kLanes] += term;
      }
    }
}

// The 16 lanes added pairwise, halves first: 16 -> 8 -> 4 -> 2 -> 1.
inline float reduce_lanes(const float* a) {
  const __m256 v8 = _mm256_add_ps(_mm256_load_ps(a), _mm256_load_ps(a + 8));
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
  return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
}

// Weight rows j0.. j1 - 1 (a thread's share, pairs from j0) against all the rows, 16 rows at a time.
// Weight rows go in tiles of four pairs and K in chunks: the rows' columns of a chunk (at most 16 KB)
// stay in L1 while the tile's weights stream past them, where pair by pair over the whole of K
// 16 rows of K = 4096 (64 KB) would come from L2 again for every pair (the tiles measured 10% faster
// at 8-16 rows). An output's arithmetic is the same whatever the tile, chunk or pair: its groups
// still add into its lanes in order.
void run_range(const Rows& x, GroupsFn groups, const int8_t* w, const uint16_t* d, float* out, int64_t N,
               int64_t j0, int64_t j1) {
  constexpr int64_t kTilePairs = 4, kChunkBytes = 16384;
  PairLanes lanes[kTilePairs];
  const int64_t group_bytes = x.lanes * kBlock;
  for (int64_t jt = j0; jt < j1; jt += 2 * kTilePairs) {
    const int64_t jend = std::min(jt + 2 * kTilePairs, j1);
    for (int64_t m0 = 0; m0 < x.M; m0 += kMaxRows) {
      const int64_t C = std::min(kMaxRows, x.M - m0);
      const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (C * group_bytes));
      for (auto& pair : lanes) std::memset(pair.acc, 0, C * sizeof(pair.acc[0]));
      for (int64_t g0 = 0; g0 < x.groups; g0 += chunk)
        for (int64_t j = jt; j < jend; j += 2)
          groups(x, m0, C, w, d, j, static_cast<int>(std::min<int64_t>(2, jend - j)), g0,
                 std::min(x.groups, g0 + chunk), lanes[(j - jt) / 2], j + 4 <= j1);
      for (int64_t j = jt; j < jend; j += 2) {
        const int R = static_cast<int>(std::min<int64_t>(2, jend - j));
        PairLanes& pair = lanes[(j - jt) / 2];
        tail_blocks(x, m0, C, w, d, j, R, x.groups * x.lanes, pair);
        for (int64_t c = 0; c < C; ++c)
          for (int r = 0; r < R; ++r) out[(m0 + c) * N + j + r] = reduce_lanes(pair.acc[c][r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// avx2 and avxvnni: groups of 8 blocks (256 bits); a group's lanes are 0-7 or 8-15 as g is even or odd.

// r[b] = block b's 8 columns -> r[s] = column s of blocks 0..7.
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);  // within 128-bit halves: columns 0 1 (4 5) of b, b + 1
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = _mm256_unpacklo_epi64(t[i + h], t[i + h + 2]);  // column 2h (4 + 2h) of 4 blocks
      u[i + 2 * h + 1] = _mm256_unpackhi_epi64(t[i + h], t[i + h + 2]);
    }
  for (int s = 0; s < 4; ++s) {
    r[s] = _mm256_permute2x128_si256(u[s], u[s + 4], 0x20);
    r[s + 4] = _mm256_permute2x128_si256(u[s], u[s + 4], 0x31);
  }
}

// acc += (u8) a . (s8) b per 4 bytes, VEX-encoded vpdpbusd (AVX-VNNI).
inline __m256i dpbusd_vex(__m256i acc, __m256i a, __m256i b) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "xm"(b));
  return acc;
}

template <bool kVnni, int R>
inline void groups256_r(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j,
                        int64_t g0, int64_t g1, PairLanes& lanes, bool prefetch) {
  // Locals, not x's fields: vector stores may alias anything, and the fields would be reloaded.
  const int64_t K = x.K, nb = x.nb, M = x.M;
  const int8_t* const t = x.t;
  const float* const gdx = x.gdx;
  const int32_t* const gcorr = x.gcorr;
  const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; ++g) {
    // The group's columns, once for all the rows: w + 128 (vnni) or |w| and w (avx2).
    __m256i wt[R][kSteps], wa[R][kSteps];
    __m256 dj[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* wg = w + (j + r) * K + g * 8 * kBlock;
      __m256i v[8];
      for (int b = 0; b < 8; ++b) v[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * kBlock));
      if (prefetch)
        for (int b = 0; b < 8; b += 2) _mm_prefetch(reinterpret_cast<const char*>(wg + 2 * K + b * kBlock), _MM_HINT_T0);
      transpose8(v);
      for (int s = 0; s < kSteps; ++s) {
        wt[r][s] = kVnni ? _mm256_xor_si256(v[s], bias) : v[s];
        if (!kVnni) wa[r][s] = _mm256_sign_epi8(v[s], v[s]);
      }
      dj[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + (j + r) * nb + g * 8)));
    }
    const int half = static_cast<int>(g & 1) * 8;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = g * M + m0 + c;  // in the group-major tables
      __m256i xs[kSteps];
      for (int s = 0; s < kSteps; ++s)
        xs[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + row * 8 * kBlock + s * kBlock));
      const __m256 dxv = _mm256_load_ps(gdx + row * 8);
      for (int r = 0; r < R; ++r) {
        __m256i isum = kVnni ? _mm256_load_si256(reinterpret_cast<const __m256i*>(gcorr + row * 8))
                             : _mm256_setzero_si256();
        for (int s = 0; s < kSteps; ++s)
          isum = kVnni ? dpbusd_vex(isum, wt[r][s], xs[s])
                       : _mm256_add_epi32(isum, _mm256_madd_epi16(
                                                    _mm256_maddubs_epi16(wa[r][s], _mm256_sign_epi8(xs[s], wt[r][s])), ones));
        const __m256 term = _mm256_mul_ps(_mm256_mul_ps(dxv, dj[r]), _mm256_cvtepi32_ps(isum));
        float* a = lanes.acc[c][r] + half;
        _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), term));
      }
    }
  }
}

// The same groups without the transpose, for one or a few rows: each block's dot product as 8
// partial sums, the 8 blocks' sums then gathered by horizontal adds. Per block and row this costs
// more than the transposed form, but nothing per weight row, which wins while the rows are few.
// The block sums are the same integers and what follows is the same, so the outputs are the same bits.
template <bool kVnni, int R>
inline void direct256_r(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j,
                        int64_t g0, int64_t g1, PairLanes& lanes, bool prefetch) {
  const int64_t K = x.K, nb = x.nb, M = x.M;
  const int8_t* const q = x.q;
  const float* const gdx = x.gdx;
  const int32_t* const gcorr = x.gcorr;
  const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; ++g) {
    __m256 dj[R];
    for (int r = 0; r < R; ++r) {
      dj[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + (j + r) * nb + g * 8)));
      if (prefetch)
        for (int b = 0; b < 8; b += 2)
          _mm_prefetch(reinterpret_cast<const char*>(w + (j + r + 2) * K + (g * 8 + b) * kBlock), _MM_HINT_T0);
    }
    const int half = static_cast<int>(g & 1) * 8;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t m = m0 + c, row = g * M + m;
      const __m256 dxv = _mm256_load_ps(gdx + row * 8);
      for (int r = 0; r < R; ++r) {
        __m256i part[8];  // block b's 8 partial sums
        for (int b = 0; b < 8; ++b) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j + r) * K + (g * 8 + b) * kBlock));
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + (g * 8 + b) * kBlock));
          part[b] = kVnni ? dpbusd_vex(_mm256_setzero_si256(), _mm256_xor_si256(wv, bias), xv)
                          : _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
        }
        // hadd: [a01 a23 b01 b23 | a45 a67 b45 b67]; twice more, then the 128-bit halves added.
        const __m256i h01 = _mm256_hadd_epi32(part[0], part[1]), h23 = _mm256_hadd_epi32(part[2], part[3]);
        const __m256i h45 = _mm256_hadd_epi32(part[4], part[5]), h67 = _mm256_hadd_epi32(part[6], part[7]);
        const __m256i k0 = _mm256_hadd_epi32(h01, h23), k1 = _mm256_hadd_epi32(h45, h67);
        __m256i isum = _mm256_add_epi32(_mm256_permute2x128_si256(k0, k1, 0x20), _mm256_permute2x128_si256(k0, k1, 0x31));
        if (kVnni) isum = _mm256_add_epi32(isum, _mm256_load_si256(reinterpret_cast<const __m256i*>(gcorr + row * 8)));
        const __m256 term = _mm256_mul_ps(_mm256_mul_ps(dxv, dj[r]), _mm256_cvtepi32_ps(isum));
        float* a = lanes.acc[c][r] + half;
        _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), term));
      }
    }
  }
}

// Rows at or below which the 256-bit paths skip the transpose: where it measured faster on the
// development Xeon (per 1 KB of weights at one row: avx2 270 -> 120 cycles, avxvnni 200 -> 100).
template <bool kVnni>
constexpr int64_t kDirectRows = kVnni ? 3 : 7;

template <bool kVnni>
void groups256(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j, int R,
               int64_t g0, int64_t g1, PairLanes& lanes, bool prefetch) {
  const bool direct = C <= kDirectRows<kVnni>;
  if (R == 2)
    (direct ? direct256_r<kVnni, 2> : groups256_r<kVnni, 2>)(x, m0, C, w, d, j, g0, g1, lanes, prefetch);
  else
    (direct ? direct256_r<kVnni, 1> : groups256_r<kVnni, 1>)(x, m0, C, w, d, j, g0, g1, lanes, prefetch);
}

}  // namespace

// ---------------------------------------------------------------------------
// avx512vnni: groups of 16 blocks (512 bits), lanes 0-15.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

namespace {

// r[p] = blocks 2p, 2p + 1 (8 columns each) -> r[s] = column s of blocks 0..15, in three rounds of
// two-source permutes (each round halves the columns and doubles the blocks a vector holds).
inline void transpose16x8(__m512i r[8]) {
  const __m512i quad_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i quad_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i pair_lo = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i pair_hi = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512i a[8], b[4][2];
  for (int p = 0; p < 4; ++p) {  // a[4h + p]: blocks 4p..4p + 3, columns 4h..4h + 3
    a[p] = _mm512_permutex2var_epi32(r[2 * p], quad_lo, r[2 * p + 1]);
    a[4 + p] = _mm512_permutex2var_epi32(r[2 * p], quad_hi, r[2 * p + 1]);
  }
  for (int h = 0; h < 2; ++h)  // b[cp][half]: blocks 8 half..8 half + 7, columns 2cp, 2cp + 1
    for (int half = 0; half < 2; ++half) {
      b[2 * h][half] = _mm512_permutex2var_epi32(a[4 * h + 2 * half], pair_lo, a[4 * h + 2 * half + 1]);
      b[2 * h + 1][half] = _mm512_permutex2var_epi32(a[4 * h + 2 * half], pair_hi, a[4 * h + 2 * half + 1]);
    }
  for (int cp = 0; cp < 4; ++cp) {
    r[2 * cp] = _mm512_permutex2var_epi32(b[cp][0], even, b[cp][1]);
    r[2 * cp + 1] = _mm512_permutex2var_epi32(b[cp][0], odd, b[cp][1]);
  }
}

template <int R>
inline void groups512_r(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j,
                        int64_t g0, int64_t g1, PairLanes& lanes, bool prefetch) {
  // Locals, not x's fields: vector stores may alias anything, and the fields would be reloaded.
  const int64_t K = x.K, nb = x.nb, M = x.M;
  const int8_t* const t = x.t;
  const float* const gdx = x.gdx;
  const int32_t* const gcorr = x.gcorr;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; ++g) {
    __m512i wt[R][kSteps];  // the group's columns as w + 128, once for all the rows
    __m512 dj[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* wg = w + (j + r) * K + g * 16 * kBlock;
      for (int p = 0; p < 8; ++p) wt[r][p] = _mm512_loadu_si512(wg + p * 64);
      if (prefetch)
        for (int p = 0; p < 8; ++p) _mm_prefetch(reinterpret_cast<const char*>(wg + 2 * K + p * 64), _MM_HINT_T0);
      transpose16x8(wt[r]);
      for (int s = 0; s < kSteps; ++s) wt[r][s] = _mm512_xor_si512(wt[r][s], bias);
      dj[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + (j + r) * nb + g * 16)));
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = g * M + m0 + c;  // in the group-major tables
      // The row's columns in registers, each used by R dot products (GCC would fold the load into
      // every one of them: twice the loads, and loads were the limit).
      __m512i xs[kSteps];
      for (int s = 0; s < kSteps; ++s) {
        xs[s] = _mm512_load_si512(t + row * 16 * kBlock + s * 64);
        asm("" : "+v"(xs[s]));
      }
      const __m512 dxv = _mm512_load_ps(gdx + row * 16);
      for (int r = 0; r < R; ++r) {
        __m512i isum = _mm512_load_si512(gcorr + row * 16);
        for (int s = 0; s < kSteps; ++s) isum = _mm512_dpbusd_epi32(isum, wt[r][s], xs[s]);
        const __m512 term = _mm512_mul_ps(_mm512_mul_ps(dxv, dj[r]), _mm512_cvtepi32_ps(isum));
        float* a = lanes.acc[c][r];
        _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), term));
      }
    }
  }
}

void groups512(const Rows& x, int64_t m0, int64_t C, const int8_t* w, const uint16_t* d, int64_t j, int R,
               int64_t g0, int64_t g1, PairLanes& lanes, bool prefetch) {
  if (R == 2)
    groups512_r<2>(x, m0, C, w, d, j, g0, g1, lanes, prefetch);
  else
    groups512_r<1>(x, m0, C, w, d, j, g0, g1, lanes, prefetch);
}

}  // namespace

#pragma GCC pop_options

namespace {

// ---------------------------------------------------------------------------
// Probes.

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) return Regs{};
  return r;
}

// XCR0: the register state the OS saves (0 when XGETBV is unavailable).
uint64_t xcr0() {
  if (!(cpuid(1, 0).c & (1u << 27))) return 0;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

const std::vector<std::string>& isa_names() {
  static const std::vector<std::string> names = {"avx2",     "fma",        "f16c",    "avx512f",    "avx512bw",
                                                 "avx512vl", "avx512vnni", "avxvnni", "avx512bf16", "amx_int8"};
  return names;
}

bool bit(unsigned reg, int i) { return (reg >> i) & 1u; }

// Whether CPUID reports the set and the OS enables its registers (for AMX: and grants the tile data).
bool cpu_supports(const std::string& isa) {
  const Regs l1 = cpuid(1, 0), l7 = cpuid(7, 0), l7s1 = cpuid(7, 1);
  const uint64_t xcr = xcr0();
  const bool ymm = (xcr & 0x6) == 0x6, zmm = ymm && (xcr & 0xe0) == 0xe0;
  if (isa == "avx2") return ymm && bit(l7.b, 5);
  if (isa == "fma") return ymm && bit(l1.c, 12);
  if (isa == "f16c") return ymm && bit(l1.c, 29);
  if (isa == "avx512f") return zmm && bit(l7.b, 16);
  if (isa == "avx512bw") return zmm && bit(l7.b, 30);
  if (isa == "avx512vl") return zmm && bit(l7.b, 31);
  if (isa == "avx512vnni") return zmm && bit(l7.c, 11);
  if (isa == "avxvnni") return ymm && bit(l7s1.a, 4);
  if (isa == "avx512bf16") return zmm && bit(l7s1.a, 5);
  if (isa == "amx_int8") {
    if (!(bit(l7.d, 24) && bit(l7.d, 25) && (xcr & 0x60000) == 0x60000)) return false;
    // Linux hands out the 8 KB tile state on request: ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }
  TORCH_CHECK(false, "speedec_q8: unknown instruction set '", isa, "'");
}

// Each runs a few instructions of its set; the barriers keep the compiler from folding them away.
volatile int g_sink = 1;

__attribute__((target("avx2"), noinline)) void run_avx2() {
  __m256i v = _mm256_set1_epi32(g_sink);
  asm volatile("" : "+x"(v));
  v = _mm256_add_epi32(v, v);
  asm volatile("" : "+x"(v));
  g_sink = _mm256_extract_epi32(v, 3);
}
__attribute__((target("fma"), noinline)) void run_fma() {
  __m256 v = _mm256_set1_ps(static_cast<float>(g_sink));
  asm volatile("" : "+x"(v));
  v = _mm256_fmadd_ps(v, v, v);
  asm volatile("" : "+x"(v));
  g_sink = static_cast<int>(_mm256_cvtss_f32(v));
}
__attribute__((target("f16c"), noinline)) void run_f16c() {
  __m128i v = _mm_set1_epi16(static_cast<int16_t>(g_sink));
  asm volatile("" : "+x"(v));
  __m256 f = _mm256_cvtph_ps(v);
  asm volatile("" : "+x"(f));
  g_sink = static_cast<int>(_mm256_cvtss_f32(f));
}
__attribute__((target("avx512f"), noinline)) void run_avx512f() {
  __m512i v = _mm512_set1_epi32(g_sink);
  asm volatile("" : "+v"(v));
  v = _mm512_add_epi32(v, v);
  asm volatile("" : "+v"(v));
  g_sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(v));
}
__attribute__((target("avx512f,avx512bw"), noinline)) void run_avx512bw() {
  __m512i v = _mm512_set1_epi32(g_sink);
  asm volatile("" : "+v"(v));
  v = _mm512_add_epi8(v, v);
  asm volatile("" : "+v"(v));
  g_sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(v));
}
__attribute__((target("avx512f,avx512vl"), noinline)) void run_avx512vl() {
  __m256i v = _mm256_set1_epi32(g_sink);
  asm volatile("" : "+v"(v));
  v = _mm256_maskz_add_epi32(static_cast<__mmask8>(g_sink | 1), v, v);
  asm volatile("" : "+v"(v));
  g_sink = _mm256_extract_epi32(v, 0);
}
__attribute__((target("avx512f,avx512vnni"), noinline)) void run_avx512vnni() {
  __m512i v = _mm512_set1_epi32(g_sink);
  asm volatile("" : "+v"(v));
  v = _mm512_dpbusd_epi32(v, v, v);
  asm volatile("" : "+v"(v));
  g_sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(v));
}
__attribute__((target("avxvnni"), noinline)) void run_avxvnni() {
  __m256i v = _mm256_set1_epi32(g_sink);
  asm volatile("" : "+x"(v));
  v = _mm256_dpbusd_avx_epi32(v, v, v);
  asm volatile("" : "+x"(v));
  g_sink = _mm256_extract_epi32(v, 0);
}
__attribute__((target("avx512f,avx512bf16"), noinline)) void run_avx512bf16() {
  __m512 v = _mm512_set1_ps(static_cast<float>(g_sink));
  asm volatile("" : "+v"(v));
  __m512bh h = _mm512_cvtne2ps_pbh(v, v);
  v = _mm512_dpbf16_ps(v, h, h);
  asm volatile("" : "+v"(v));
  g_sink = static_cast<int>(_mm512_cvtss_f32(v));
}
__attribute__((target("amx-tile,amx-int8"), noinline)) void run_amx_int8() {
  // Palette 1, tiles 0-2 of one row of 4 bytes (the smallest valid int8 product).
  alignas(64) unsigned char config[64] = {};
  config[0] = 1;
  for (int t = 0; t < 3; ++t) config[16 + 2 * t] = 4, config[48 + t] = 1;
  // ldtilecfg by hand: GCC 12's _tile_loadconfig does not tell the compiler that it reads the
  // buffer, which then drops the stores above (an invalid configuration: a fault, not a SIGILL).
  asm volatile("ldtilecfg %0" : : "m"(config));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_dpbssd(0, 1, 2);
  _tile_release();
}

sigjmp_buf g_jump;
void on_sigill(int) { siglongjmp(g_jump, 1); }

// Whether fn returns rather than raising SIGILL (the previous handler is restored either way).
bool runs(void (*fn)()) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  struct sigaction action {}, previous {};
  action.sa_handler = on_sigill;
  sigemptyset(&action.sa_mask);
  sigaction(SIGILL, &action, &previous);
  volatile bool ran = false;
  if (sigsetjmp(g_jump, 1) == 0) {
    fn();
    ran = true;
  }
  sigaction(SIGILL, &previous, nullptr);
  return ran;
}

bool probe_now(const std::string& isa) {
  using Run = void (*)();
  static const std::array<Run, 10> run = {run_avx2,     run_fma,        run_f16c,    run_avx512f,    run_avx512bw,
                                          run_avx512vl, run_avx512vnni, run_avxvnni, run_avx512bf16, run_amx_int8};
  const auto& names = isa_names();
  const auto it = std::find(names.begin(), names.end(), isa);
  TORCH_CHECK(it != names.end(), "speedec_q8: unknown instruction set '", isa, "'");
  return cpu_supports(isa) && runs(run[it - names.begin()]);
}

// Probes run once per process.
bool probe(c10::string_view isa_view) {
  static std::mutex mutex;
  static std::vector<std::pair<std::string, bool>> done;
  const std::string isa(isa_view);
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : done)
    if (entry.first == isa) return entry.second;
  const bool ok = probe_now(isa);
  done.emplace_back(isa, ok);
  return ok;
}

bool supports(c10::string_view isa) { return cpu_supports(std::string(isa)); }

// ---------------------------------------------------------------------------
// The ops.

struct PathInfo {
  int index;
  const char* name;
  std::vector<const char*> isas;
  int lanes;
  GroupsFn groups;
};

const PathInfo& path_info(c10::string_view path) {
  static const std::array<PathInfo, 3> paths = {{
      {0, "avx512vnni", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, 16, groups512},
      {1, "avxvnni", {"avx2", "fma", "f16c", "avxvnni"}, 8, groups256<true>},
      {2, "avx2", {"avx2", "fma", "f16c"}, 8, groups256<false>},
  }};
  for (const auto& info : paths)
    if (path == info.name) return info;
  TORCH_CHECK(false, "speedec_q8::linear: unknown path '", std::string(path), "' (avx512vnni, avxvnni or avx2)");
}

// The first of the path's instruction sets that does not run here (nullptr: all of them ran),
// probed on the path's first use.
const char* path_problem(const PathInfo& info) {
  static std::array<std::atomic<int>, 3> known{{{-1}, {-1}, {-1}}};  // that set's index; size(): none
  const int count = static_cast<int>(info.isas.size());
  int state = known[info.index].load(std::memory_order_acquire);
  if (state < 0) {
    state = count;
    for (int i = 0; i < count && state == count; ++i)
      if (!probe(info.isas[i])) state = i;
    known[info.index].store(state, std::memory_order_release);
  }
  return state == count ? nullptr : info.isas[state];
}

std::vector<int64_t> checked_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, op, ": x must be a CPU tensor [..., K]");
  TORCH_CHECK(x.size(-1) % kBlock == 0, op, ": K = ", x.size(-1), " is not a multiple of 32");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end());
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::string_view path) {
  const PathInfo& info = path_info(path);
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.dim() == 2, "speedec_q8::linear: qs must be int8 [N, K], got ",
              qs.scalar_type(), " with ", qs.dim(), " dimensions");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 2, "speedec_q8::linear: d must be float16 [N, K / 32], got ",
              d.scalar_type(), " with ", d.dim(), " dimensions");
  TORCH_CHECK(qs.device().is_cpu() && d.device().is_cpu(), "speedec_q8::linear: CPU tensors only");
  std::vector<int64_t> shape = checked_rows(x, "speedec_q8::linear");
  const int64_t K = qs.size(1), N = qs.size(0);
  TORCH_CHECK(x.size(-1) == K, "speedec_q8::linear: x has ", x.size(-1), " columns, qs has ", K);
  TORCH_CHECK(d.size(0) == N && d.size(1) == K / kBlock, "speedec_q8::linear: d must be [N, K / 32] = [", N, ", ",
              K / kBlock, "], got ", d.sizes());
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous(), "speedec_q8::linear: qs and d must be contiguous");
  const char* problem = path_problem(info);
  TORCH_CHECK(problem == nullptr, "speedec_q8::linear: the ", info.name, " path cannot run here (", problem,
              " is missing or raised SIGILL)");
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (K == 0) return out.zero_();  // sums of nothing
  const int64_t M = x.numel() / K;
  if (M == 0 || N == 0) return out;
  const Rows rows = prepare_rows(x.data_ptr<float>(), M, K, info.lanes);
  const int8_t* w = qs.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  // Pairs of weight rows never straddle two threads; a task of at least 64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (2 * K));
  at::parallel_for(0, (N + 1) / 2, grain, [&](int64_t begin, int64_t end) {
    run_range(rows, info.groups, w, dp, op, N, 2 * begin, std::min<int64_t>(2 * end, N));
  });
  return out;
}

// The rows' quantization, for tests: xq int8 [..., K] and dx float32 [..., K / 32].
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  std::vector<int64_t> shape = checked_rows(x, "speedec_q8::quantize_rows");
  const int64_t K = shape.back(), M = K == 0 ? 0 : x.numel() / K;
  at::Tensor q = at::empty(shape, x.options().dtype(at::kChar));
  shape.back() = K / kBlock;
  at::Tensor dx = at::empty(shape, x.options());
  at::Tensor corr = at::empty({M, K / kBlock}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K / kBlock, q.data_ptr<int8_t>() + m * K, dx.data_ptr<float>() + m * (K / kBlock),
                 corr.data_ptr<int32_t>() + m * (K / kBlock));
  return {q, dx};
}

}  // namespace

TORCH_LIBRARY(speedec_q8, m) {
  m.def("linear(Tensor x, Tensor qs, Tensor d, str path) -> Tensor", &linear);
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)", &quantize_rows);
  m.def("probe(str isa) -> bool", &probe);
  m.def("cpu_supports(str isa) -> bool", &supports);
}
