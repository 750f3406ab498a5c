// y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m (speculative verification: 2..16 tokens).
//
// Generic GEMM and inductor's reductions read the weight once per row of x at these sizes; here each
// weight vector is loaded once and multiplied into every row's accumulator (all held in registers),
// so a k-token verification step reads the weights once, like a single-token step.
// Weights are float32, bf16, or int8 codes (the caller applies per-row scales): AVX-512 or AVX2 + FMA.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif

template <typename W>
inline __m512 load_w(const W* p, __mmask16 mask) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<W, int8_t>) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
  } else {  // bf16 is the upper half of a float32
    __m256i h = _mm256_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// NB weight rows x M activation rows per register tile: each loaded vector of x serves NB rows of w
// and each vector of w serves M rows of x (NB * M accumulators stay in the 32 zmm registers).
template <int M, int NB, typename W>
inline void tile(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n) {
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (K - full)) - 1u);
  __m512 acc[NB][M];
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[b][m] = _mm512_setzero_ps();
  const W* wr = w + n * K;
  int64_t k = 0;
  for (; k < full; k += 16) {  // whole vectors: plain loads
    // Several rows of x make an iteration long; prefetch keeps enough weight bytes in flight.
    _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PREFETCH_BYTES, _MM_HINT_T0);
    __m512 wv[NB];
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) wv[b] = load_w(wr + b * K + k, (__mmask16)0xFFFF);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) acc[b][m] = _mm512_fmadd_ps(wv[b], xv, acc[b][m]);
    }
  }
  if (k < K) {  // the partial vector
    __m512 wv[NB];
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) wv[b] = load_w(wr + b * K + k, tail);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + k);
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) acc[b][m] = _mm512_fmadd_ps(wv[b], xv, acc[b][m]);
    }
  }
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) y[m * N + n + b] = _mm512_reduce_add_ps(acc[b][m]);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
template <typename W>
inline __m256 load8(const W* p) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<W, int8_t>) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {  // bf16 is the upper half of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// U independent accumulators per row of x hide the FMA latency when M is small (U * M <= 8 keeps
// them, a weight vector and an x vector within AVX2's 16 ymm registers).
template <int M, typename W>
inline void tile8(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n) {
  constexpr int U = M == 1 ? 4 : (M <= 3 ? 2 : 1);
  const int64_t step = 8 * U, full = K / step * step;
  __m256 acc[U][M];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
  const W* wr = w + n * K;
  int64_t k = 0;
  for (; k < full; k += step) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load8(wr + k + 8 * u);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[u][m]);
    }
  }
  float tail[M] = {0};
  for (; k < K; ++k) {  // the last partial vectors, one value at a time
    const float wv = static_cast<float>(wr[k]);
    for (int m = 0; m < M; ++m) tail[m] += wv * x[m * K + k];
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    __m256 a = acc[0][m];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][m]);
    y[m * N + n] = hsum8(a) + tail[m];
  }
}
#endif

template <int M, typename W>
void rows_block(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  constexpr int NB = 1;  // one weight stream: interleaved row streams measured slower
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<M, NB, W>(x, w, y, K, N, n);
  for (; n < n1; ++n) tile<M, 1, W>(x, w, y, K, N, n);
#elif defined(__AVX2__) && defined(__FMA__)
  for (int64_t n = n0; n < n1; ++n) tile8<M, W>(x, w, y, K, N, n);
#else
  for (int64_t n = n0; n < n1; ++n) {
    float acc[M] = {0};
    for (int64_t k = 0; k < K; ++k) {
      const float wv = static_cast<float>(w[n * K + k]);
      for (int m = 0; m < M; ++m) acc[m] += wv * x[m * K + k];
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = acc[m];
  }
#endif
}

template <typename W>
void dispatch(int64_t M, const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  switch (M) {
#define CASE(m) case m: rows_block<m, W>(x, w, y, K, N, n0, n1); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
    default: TORCH_CHECK(false, "rows_linear supports 1..16 rows, got ", M);
  }
}

torch::Tensor rows_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "rows_linear: x must be float32");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16 ||
              w.scalar_type() == torch::kChar, "rows_linear: w must be float32, bfloat16 or int8");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (wc.scalar_type() == torch::kFloat32) {
      dispatch<float>(M, xp, wc.data_ptr<float>(), yp, K, N, n0, n1);
    } else if (wc.scalar_type() == torch::kChar) {
      dispatch<int8_t>(M, xp, wc.data_ptr<int8_t>(), yp, K, N, n0, n1);
    } else {
      dispatch<at::BFloat16>(M, xp, wc.data_ptr<at::BFloat16>(), yp, K, N, n0, n1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(leanlm_kernels, m) { m.def("rows_linear(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(leanlm_kernels, CPU, m) { m.impl("rows_linear", &rows_linear); }
