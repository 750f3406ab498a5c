// One decoding step of a Llama-family (Llama, Mistral, Qwen2) or Gemma-3 decoder in a single native call.
//
// At batch 1 on a CPU a small model's step is ~900 tiny kernels; launching them (even from inductor's
// C++ wrapper) and the generic int4/int8 kernels' per-call threading cost more than reading the
// weights. Here a step is one call: every matrix-vector product reads its stored weights once, in
// whatever form the model keeps them, and dequantizes in registers:
//   float32 weights: FMA;  bf16 weights and int4 codes: AVX512-BF16 dot products against a bf16 copy
//   of the activation (what a bf16 model computes);  int8 codes: widened to float32, FMA.
// INT4 codes 0..15 become exact bf16 numbers 128 + q by OR-ing them into the mantissa of 128.0
// (0x4300); ``sum (q - 8) x == sum (128 + q) x - 136 sum x``, where ``136 sum x`` is accumulated by the
// same dot-product instruction, so the subtraction cancels in float32 lane by lane.
// Activations stay float32 between products; the KV cache is the engine's (float32 or bf16), so
// compiled multi-token steps and rollbacks share it.
// `steps` runs several consecutive tokens at once (verifying a chain of drafts): each weight is read
// from memory once for all of them (float weights feed one accumulator chain per token; quantized
// rows are reused from L1), so 5 tokens of SmolLM2-135M cost ~1.35x one. It can also return hidden
// states (EAGLE-3 drafting reads them).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LEANLM_NATIVE 1
#include <immintrin.h>
#endif

namespace {

#ifndef PREFETCH
#define PREFETCH 4096  // bytes ahead of each weight stream: DRAM latency hidden behind the arithmetic
#endif

enum Kind : int64_t { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };
constexpr int64_t ROW_BLOCK = 4;  // quantized weight rows reused across a step's tokens while in L1

inline uint16_t to_bf16(float f) {  // round to nearest even (activations are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A linear layer's stored weight, in one of four forms:
//   F32  w float [N, K];  BF16 w bf16 [N, K];  I8 w int8 [N, K] with scale float [N];
//   I4   w uint8 [N, Kp / 2] (per 64-value chunk, byte j = code j | code (j + 32) << 4), scale float
//        [N, G] and, for asymmetric codes, offset float [N, G]: w = (q - 8) * scale + offset.
// Optional bias float [N] and smooth float [K] (the input is divided by it: SmoothQuant / AWQ).
struct Linear {
  int64_t kind, N, K, Kp, group;
  torch::Tensor w, scale, offset, bias, smooth;
  // Scratch: the prepared inputs, one row of `stride` per token (float, bf16 zero-padded to a multiple
  // of 64, and per-group lane sums for I4).
  int64_t stride = 0, capacity = 0;
  std::vector<float> xf;
  std::vector<uint16_t> xb;
  std::vector<float> sum136, sum1;

  Linear(int64_t kind_, torch::Tensor w_, c10::optional<torch::Tensor> scale_, c10::optional<torch::Tensor> offset_,
         c10::optional<torch::Tensor> bias_, c10::optional<torch::Tensor> smooth_, int64_t in_features, int64_t group_)
      : kind(kind_), K(in_features), group(group_), w(w_.contiguous()) {
    N = w.size(0);
    Kp = kind == I4 ? w.size(1) * 2 : K;
    TORCH_CHECK(kind >= F32 && kind <= I4, "decode_step: unknown weight kind ", kind);
    if (kind == F32) TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.size(1) == K, "F32 weight [N, K] float32");
    if (kind == BF16) TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.size(1) == K, "BF16 weight [N, K] bf16");
    if (kind == I8) {
      TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.size(1) == K, "I8 weight [N, K] int8");
      TORCH_CHECK(scale_.has_value() && scale_->numel() == N, "I8 needs a float scale per row");
      scale = scale_->to(torch::kFloat32).contiguous();
    }
    if (kind == I4) {
      TORCH_CHECK(w.scalar_type() == torch::kUInt8 && group % 64 == 0 && Kp % group == 0 && Kp >= K,
                  "I4 weight [N, Kp / 2] uint8 with groups of a multiple of 64");
      TORCH_CHECK(scale_.has_value() && scale_->numel() == N * (Kp / group), "I4 needs a scale per group");
      scale = scale_->to(torch::kFloat32).contiguous();
      if (offset_.has_value()) offset = offset_->to(torch::kFloat32).contiguous();
    }
    if (bias_.has_value()) bias = bias_->to(torch::kFloat32).contiguous();
    if (smooth_.has_value()) smooth = smooth_->to(torch::kFloat32).contiguous();
    stride = (Kp + 63) / 64 * 64;
    reserve(1);
  }

  void reserve(int64_t rows) {
    if (rows <= capacity) return;
    xf.assign(rows * stride, 0.f);
    xb.assign(rows * stride, 0);  // the padding past K stays zero: masked tails read it
    if (kind == I4) {
      sum136.assign(rows * (Kp / group) * 16, 0.f);
      sum1.assign(rows * (Kp / group) * 16, 0.f);
    }
    capacity = rows;
  }

  // Row n of the weight as the product reads it (dequantized, smoothing undone) into out[K]: the
  // embedding lookup of a model whose embedding is tied to this (output) layer.
  void row(int64_t n, float* out) const {
    if (kind == F32) {
      std::memcpy(out, w.data_ptr<float>() + n * K, K * sizeof(float));
    } else if (kind == BF16) {
      const uint16_t* r = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()) + n * K;
      for (int64_t k = 0; k < K; ++k) out[k] = from_bf16(r[k]);
    } else if (kind == I8) {
      const int8_t* r = w.data_ptr<int8_t>() + n * K;
      const float s = scale.data_ptr<float>()[n];
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(r[k]) * s;
    } else {
      const uint8_t* r = w.data_ptr<uint8_t>() + n * (Kp / 2);
      const int64_t G = Kp / group;
      const float* s = scale.data_ptr<float>() + n * G;
      const float* o = offset.defined() ? offset.data_ptr<float>() + n * G : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t b = r[(k / 64) * 32 + (k % 32)];
        const int q = (k % 64) < 32 ? (b & 0xF) : (b >> 4);
        out[k] = static_cast<float>(q - 8) * s[k / group] + (o ? o[k / group] : 0.f);
      }
    }
    if (smooth.defined())
      for (int64_t k = 0; k < K; ++k) out[k] /= smooth.data_ptr<float>()[k];
  }

  // Called once per step, for the step's `rows` inputs x [rows, K], before any thread computes rows.
  void prepare(const float* x, int64_t rows) {
    reserve(rows);
    const float* sm = smooth.defined() ? smooth.data_ptr<float>() : nullptr;
    for (int64_t t = 0; t < rows; ++t) {
      const float* xt = x + t * K;
      float* f = xf.data() + t * stride;
      uint16_t* b16 = xb.data() + t * stride;
      for (int64_t k = 0; k < K; ++k) f[k] = sm ? xt[k] / sm[k] : xt[k];
      if (kind == BF16 || kind == I4)
        for (int64_t k = 0; k < K; ++k) b16[k] = to_bf16(f[k]);
#ifdef LEANLM_NATIVE
      if (kind == I4) {
        const int64_t G = Kp / group;
        const __m512bh c136 = (__m512bh)_mm512_set1_epi16(0x4308);  // bf16 136.0
        const __m512bh c1 = (__m512bh)_mm512_set1_epi16(0x3F80);    // bf16 1.0
        for (int64_t g = 0; g < G; ++g) {
          __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
          for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(b16 + k);
            a = _mm512_dpbf16_ps(a, c136, xv);
            if (offset.defined()) b = _mm512_dpbf16_ps(b, c1, xv);  // only asymmetric codes read sum x
          }
          _mm512_storeu_ps(sum136.data() + (t * G + g) * 16, a);
          _mm512_storeu_ps(sum1.data() + (t * G + g) * 16, b);
        }
      }
#endif
    }
  }

#ifdef LEANLM_NATIVE
  // Cache lines `PREFETCH` bytes ahead of a weight stream at `p` (`lines` of them: the bytes one
  // iteration reads).
  template <typename T>
  static inline void prefetch(const T* p, int lines) {
    const char* c = reinterpret_cast<const char*>(p) + PREFETCH;
    for (int i = 0; i < lines; ++i) _mm_prefetch(c + 64 * i, _MM_HINT_T0);
  }

  // R rows of INT4 codes at once: each input chunk is loaded once for all of them.
  template <int R>
  void i4_rows(float* y, int64_t n, const float* bs, int64_t t) const {
    const int64_t G = Kp / group, stride = Kp / 2;
    const uint16_t* xbt = xb.data() + t * this->stride;
    const float* s136t = sum136.data() + t * G * 16;
    const float* s1t = sum1.data() + t * G * 16;
    const uint8_t* w0 = w.data_ptr<uint8_t>() + n * stride;
    const float* s0 = scale.data_ptr<float>() + n * G;
    const float* o0 = offset.defined() ? offset.data_ptr<float>() + n * G : nullptr;
    const __m512i low4 = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);
    __m512 acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 d[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
        const __m512bh xlo = (__m512bh)_mm512_loadu_si512(xbt + k);
        const __m512bh xhi = (__m512bh)_mm512_loadu_si512(xbt + k + 32);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          prefetch(w0 + r * stride + k / 2, 1);
          const __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w0 + r * stride + k / 2)));
          // (raw & 0xF) | 0x4300 and ((raw >> 4) & 0xF) | 0x4300: bf16 128 + code
          const __m512i lo = _mm512_ternarylogic_epi32(raw, low4, base, 0xEA);
          const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), low4, base, 0xEA);
          d[r] = _mm512_dpbf16_ps(d[r], (__m512bh)lo, xlo);
          d[r] = _mm512_dpbf16_ps(d[r], (__m512bh)hi, xhi);
        }
      }
      const __m512 s136 = _mm512_loadu_ps(s136t + g * 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_sub_ps(d[r], s136), _mm512_set1_ps(s0[r * G + g]), acc[r]);
        if (o0) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(s1t + g * 16), _mm512_set1_ps(o0[r * G + g]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float o = _mm512_reduce_add_ps(acc[r]);
      y[n + r] = bs ? o + bs[n + r] : o;
    }
  }
#endif

#ifdef LEANLM_NATIVE
  // Float32 or bf16 weights, several tokens: rows [n0, n1) for tokens t0..t0 + T - 1 (token t's output
  // at y + t * ystride): each weight chunk is loaded once and feeds T independent accumulator chains.
  template <int T>
  void float_tokens(float* y, int64_t ystride, int64_t n0, int64_t n1, int64_t t0) const {
    const float* bs = bias.defined() ? bias.data_ptr<float>() : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      __m512 acc[T];
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
      if (kind == F32) {
        const float* wr = w.data_ptr<float>() + n * K;
        for (int64_t k = 0; k < K; k += 16) {
          prefetch(wr + k, 1);
          const __mmask16 m =
              K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
          const __m512 wv = _mm512_maskz_loadu_ps(m, wr + k);
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t)
            acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf.data() + (t0 + t) * stride + k), acc[t]);
        }
      } else {
        const uint16_t* wr = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()) + n * K;
        for (int64_t k = 0; k < K; k += 32) {  // the bf16 inputs are zero-padded: a masked weight load is enough
          prefetch(wr + k, 1);
          const __mmask32 m = K - k >= 32 ? ~0u : static_cast<__mmask32>((1ull << (K - k)) - 1u);
          const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k);
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t)
            acc[t] = _mm512_dpbf16_ps(acc[t], wv, (__m512bh)_mm512_loadu_si512(xb.data() + (t0 + t) * stride + k));
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const float o = _mm512_reduce_add_ps(acc[t]);
        y[t * ystride + n] = bs ? o + bs[n] : o;
      }
    }
  }

  // Rows [n0, n1) of every token (token t's output at y + t * N).
  void token_rows(float* y, int64_t n0, int64_t n1, int64_t tokens) const {
    if (kind == F32 || kind == BF16) {
      for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
        float* yt = y + t0 * N;
        switch (std::min<int64_t>(8, tokens - t0)) {
          case 1: float_tokens<1>(yt, N, n0, n1, t0); break;
          case 2: float_tokens<2>(yt, N, n0, n1, t0); break;
          case 3: float_tokens<3>(yt, N, n0, n1, t0); break;
          case 4: float_tokens<4>(yt, N, n0, n1, t0); break;
          case 5: float_tokens<5>(yt, N, n0, n1, t0); break;
          case 6: float_tokens<6>(yt, N, n0, n1, t0); break;
          case 7: float_tokens<7>(yt, N, n0, n1, t0); break;
          default: float_tokens<8>(yt, N, n0, n1, t0); break;
        }
      }
      return;
    }
    for (int64_t n = n0; n < n1; n += ROW_BLOCK)  // quantized rows: reused across the tokens while in L1
      for (int64_t t = 0; t < tokens; ++t) rows(y + t * N, n, std::min(n1, n + ROW_BLOCK), t);
  }
#endif

  // y[n] for n in [n0, n1), of token t's prepared input.
  void rows(float* y, int64_t n0, int64_t n1, int64_t t) const {
#ifdef LEANLM_NATIVE
    const float* bs = bias.defined() ? bias.data_ptr<float>() : nullptr;
    const float* xft = xf.data() + t * stride;
    const uint16_t* xbt = xb.data() + t * stride;
    const int64_t full16 = K / 16 * 16;
    const __mmask16 tail16 = static_cast<__mmask16>((1u << (K - full16)) - 1u);
    for (int64_t n = n0; n < n1; ++n) {
      float out;
      if (kind == F32) {
        const float* wr = w.data_ptr<float>() + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          prefetch(wr + k, 2);
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(xft + k), a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 16), _mm512_loadu_ps(xft + k + 16), a1);
        }
        for (; k < full16; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(xft + k), a0);
        if (k < K) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail16, wr + k), _mm512_loadu_ps(xft + k), a1);
        out = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      } else if (kind == BF16) {
        const uint16_t* wr = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()) + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
          prefetch(wr + k, 2);
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(xbt + k));
          a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wr + k + 32),
                                (__m512bh)_mm512_loadu_si512(xbt + k + 32));
        }
        for (; k < K; k += 32) {  // the bf16 input is zero-padded: a masked weight load is enough
          const __mmask32 m = K - k >= 32 ? ~0u : static_cast<__mmask32>((1ull << (K - k)) - 1u);
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k),
                                (__m512bh)_mm512_loadu_si512(xbt + k));
        }
        out = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      } else if (kind == I8) {
        const int8_t* wr = w.data_ptr<int8_t>() + n * K;
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {  // four FMA chains in flight
          prefetch(wr + k, 1);
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j)
            a[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k + 16 * j)))),
                                   _mm512_loadu_ps(xft + k + 16 * j), a[j]);
        }
        for (; k < K; k += 16) {
          const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : tail16;
          const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, wr + k)));
          a[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xft + k), a[0]);
        }
        out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))) *
              scale.data_ptr<float>()[n];
      } else {  // I4
        const int64_t nr = std::min<int64_t>(4, n1 - n);
        if (nr == 4) i4_rows<4>(y, n, bs, t); else if (nr == 3) i4_rows<3>(y, n, bs, t);
        else if (nr == 2) i4_rows<2>(y, n, bs, t); else i4_rows<1>(y, n, bs, t);
        n += nr - 1;
        continue;
      }
      y[n] = bs ? out + bs[n] : out;
    }
#else
    TORCH_CHECK(false, "decode_step was built without AVX512-BF16");
#endif
  }
};

// Products of several linears sharing one pass of the thread pool (q/k/v, gate/up), for `tokens`
// inputs x [tokens, K]; each job's output is [tokens, N].
void run(const std::vector<std::pair<Linear*, float*>>& jobs, const float* x, int64_t tokens = 1) {
  int64_t total = 0;
  for (const auto& j : jobs) {
    j.first->prepare(x, tokens);
    total += j.first->N;
  }
  at::parallel_for(0, total, 16, [&](int64_t r0, int64_t r1) {
    int64_t base = 0;
    for (const auto& j : jobs) {
      Linear* l = j.first;
      const int64_t a = std::max(r0, base) - base, b = std::min(r1, base + l->N) - base;
      base += l->N;
      if (a >= b) continue;
      if (tokens == 1) {
        l->rows(j.second, a, b, 0);
      } else {
#ifdef LEANLM_NATIVE
        l->token_rows(j.second, a, b, tokens);
#else
        TORCH_CHECK(false, "decode_step was built without AVX512-BF16");
#endif
      }
    }
  });
}

void rms_norm(const float* x, const float* w, float* out, int64_t n, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

struct Layer {
  // Norm weights as multipliers (Gemma's 1 + w already added), float32; the optional ones are Gemma's.
  torch::Tensor ln1, ln2, post_attn, post_ffn, q_norm, k_norm;
  std::shared_ptr<Linear> q, k, v, o, gate, up, down;
  torch::Tensor keys, values;  // the engine's cache [1, KVH, max_len, D], float32 or bf16
  torch::Tensor length;        // the layer's cumulative length (0-dim int64), advanced by a step
  torch::Tensor cos, sin;      // rotary tables [max_len, D] of this layer's attention type
  int64_t window;              // sliding window (0: full attention)
};

torch::Tensor f32(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->to(torch::kFloat32).contiguous() : torch::Tensor();
}

class Decoder {
 public:
  // `embed` [vocab, hidden] float32 or bf16; none: the embedding is tied to the output layer `head`,
  // whose rows serve the lookups (a quantized tied table).
  Decoder(c10::optional<torch::Tensor> embed, double embed_scale, torch::Tensor norm, std::shared_ptr<Linear> head,
          double eps, int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling, int64_t act)
      : embed_scale_(embed_scale), norm_(norm.to(torch::kFloat32).contiguous()), head_(std::move(head)), eps_(eps),
        H_(heads), KVH_(kv_heads), D_(head_dim), scaling_(scaling), act_(act) {
    if (embed.has_value()) {
      embed_ = embed->contiguous();
      TORCH_CHECK(embed_.scalar_type() == torch::kFloat32 || embed_.scalar_type() == torch::kBFloat16,
                  "decode_step: the embedding must be float32 or bf16");
    }
    TORCH_CHECK(D_ % 16 == 0 && H_ % KVH_ == 0, "decode_step: head_dim a multiple of 16, heads a multiple of kv heads");
    TORCH_CHECK(act_ == 0 || act_ == 1, "decode_step: activation 0 (silu) or 1 (gelu tanh)");
    hidden_ = embed_.defined() ? embed_.size(1) : head_->K;
    vocab_ = embed_.defined() ? embed_.size(0) : head_->N;
  }

  void add_layer(torch::Tensor ln1, torch::Tensor ln2, c10::optional<torch::Tensor> post_attn,
                 c10::optional<torch::Tensor> post_ffn, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, std::shared_ptr<Linear> q, std::shared_ptr<Linear> k,
                 std::shared_ptr<Linear> v, std::shared_ptr<Linear> o, std::shared_ptr<Linear> gate,
                 std::shared_ptr<Linear> up, std::shared_ptr<Linear> down, torch::Tensor keys, torch::Tensor values,
                 torch::Tensor length, torch::Tensor cos, torch::Tensor sin, int64_t window) {
    TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.dim() == 4 && keys.size(1) == KVH_ &&
                    keys.size(3) == D_ && keys.sizes() == values.sizes(),
                "decode_step: cache tensors [1, kv_heads, max_len, head_dim]");
    TORCH_CHECK(keys.scalar_type() == torch::kFloat32 || keys.scalar_type() == torch::kBFloat16,
                "decode_step: the KV cache must be float32 or bf16");
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D_ && sin.sizes() == cos.sizes() && keys.size(2) <= cos.size(0),
                "decode_step: rotary tables [max_len, head_dim]");
    TORCH_CHECK(q->N == H_ * D_ && k->N == KVH_ * D_ && v->N == KVH_ * D_ && o->K == H_ * D_ &&
                    gate->N == up->N && down->K == gate->N && q->K == hidden_ && o->N == hidden_ &&
                    down->N == hidden_,
                "decode_step: layer shapes disagree with the model's");
    layers_.push_back({ln1.to(torch::kFloat32).contiguous(), ln2.to(torch::kFloat32).contiguous(), f32(post_attn),
                       f32(post_ffn), f32(q_norm), f32(k_norm), q, k, v, o, gate, up, down, keys, values, length,
                       cos.to(torch::kFloat32).contiguous(), sin.to(torch::kFloat32).contiguous(), window});
  }

  // Logits [1, vocab] (float32) of `token` at position `pos`, whose keys and values are written at `pos`.
  torch::Tensor step(int64_t token, int64_t pos) { return std::get<0>(steps({token}, pos, {})); }

  // Logits [n, vocab] (float32) of the n consecutive `tokens` at positions pos.., each attending to the
  // cache and the tokens before it; their keys and values are written at pos... Also the hidden states
  // named by `keep` (transformers' `hidden_states` indices: 0 the embeddings, i < layers the output of
  // layer i - 1, i == layers the final norm's output) side by side, [n, keep.size() * hidden].
  std::tuple<torch::Tensor, torch::Tensor> steps(const std::vector<int64_t>& tokens, int64_t pos,
                                                 const std::vector<int64_t>& keep) {
    TORCH_CHECK(!layers_.empty(), "decode_step: no layers");
    const int64_t n = static_cast<int64_t>(tokens.size()), nl = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(n >= 1, "decode_step: no tokens");
    TORCH_CHECK(pos >= 0 && pos + n <= layers_[0].keys.size(2), "decode_step: positions ", pos, "..", pos + n - 1,
                " outside the cache");
    for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < vocab_, "decode_step: token ", t, " outside the vocabulary");
    for (int64_t i : keep) TORCH_CHECK(i >= 0 && i <= nl, "decode_step: hidden state ", i, " outside 0..", nl);
    const int64_t Hd = hidden_, inter = layers_[0].gate->N, QD = H_ * D_, KD = KVH_ * D_;
    std::vector<float> h(n * Hd), x(n * Hd), q(n * QD), k(n * KD), v(n * KD), att(n * QD), tmp(n * Hd),
        g(n * inter), u(n * inter);
    auto hidden = torch::empty({n, static_cast<int64_t>(keep.size()) * Hd}, torch::kFloat32);
    auto save = [&](int64_t index, const std::vector<float>& src) {
      for (size_t j = 0; j < keep.size(); ++j)
        if (keep[j] == index)
          for (int64_t t = 0; t < n; ++t)
            std::memcpy(hidden.data_ptr<float>() + (t * keep.size() + j) * Hd, src.data() + t * Hd, Hd * sizeof(float));
    };
    for (int64_t t = 0; t < n; ++t) {
      float* ht = h.data() + t * Hd;
      if (!embed_.defined()) {
        head_->row(tokens[t], ht);
      } else if (embed_.scalar_type() == torch::kFloat32) {
        std::memcpy(ht, embed_.data_ptr<float>() + tokens[t] * Hd, Hd * sizeof(float));
      } else {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(embed_.data_ptr<at::BFloat16>()) + tokens[t] * Hd;
        for (int64_t i = 0; i < Hd; ++i) ht[i] = from_bf16(e[i]);
      }
      if (embed_scale_ != 1.0)
        for (int64_t i = 0; i < Hd; ++i) ht[i] *= static_cast<float>(embed_scale_);
    }
    save(0, h);
    auto norm_rows = [&](const float* src, const float* w, float* dst, int64_t rows, int64_t width) {
      for (int64_t t = 0; t < rows; ++t) rms_norm(src + t * width, w, dst + t * width, width, eps_);
    };
    for (int64_t li = 0; li < nl; ++li) {
      Layer& L = layers_[li];
      norm_rows(h.data(), L.ln1.data_ptr<float>(), x.data(), n, Hd);
      run({{L.q.get(), q.data()}, {L.k.get(), k.data()}, {L.v.get(), v.data()}}, x.data(), n);
      if (L.q_norm.defined()) {
        norm_rows(q.data(), L.q_norm.data_ptr<float>(), q.data(), n * H_, D_);
        norm_rows(k.data(), L.k_norm.data_ptr<float>(), k.data(), n * KVH_, D_);
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* cs = L.cos.data_ptr<float>() + (pos + t) * D_;
        const float* sn = L.sin.data_ptr<float>() + (pos + t) * D_;
        rope(q.data() + t * QD, H_, cs, sn);
        rope(k.data() + t * KD, KVH_, cs, sn);
        store(L, k.data() + t * KD, v.data() + t * KD, pos + t);
      }
      for (int64_t t = 0; t < n; ++t) {  // token t sees the cache and the new tokens up to itself
        const int64_t p = pos + t;
        const int64_t first = L.window > 0 ? std::max<int64_t>(0, p - L.window + 1) : 0;
        attend(L, q.data() + t * QD, att.data() + t * QD, first, p + 1);
      }
      run({{L.o.get(), tmp.data()}}, att.data(), n);
      if (L.post_attn.defined()) norm_rows(tmp.data(), L.post_attn.data_ptr<float>(), tmp.data(), n, Hd);
      for (int64_t i = 0; i < n * Hd; ++i) h[i] += tmp[i];
      norm_rows(h.data(), L.ln2.data_ptr<float>(), x.data(), n, Hd);
      run({{L.gate.get(), g.data()}, {L.up.get(), u.data()}}, x.data(), n);
      if (act_ == 0) {
        for (int64_t i = 0; i < n * inter; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
      } else {  // gelu, tanh approximation
        for (int64_t i = 0; i < n * inter; ++i) {
          const float a = g[i];
          g[i] = 0.5f * a * (1.f + std::tanh(0.7978845608028654f * (a + 0.044715f * a * a * a))) * u[i];
        }
      }
      run({{L.down.get(), tmp.data()}}, g.data(), n);
      if (L.post_ffn.defined()) norm_rows(tmp.data(), L.post_ffn.data_ptr<float>(), tmp.data(), n, Hd);
      for (int64_t i = 0; i < n * Hd; ++i) h[i] += tmp[i];
      *L.length.data_ptr<int64_t>() = pos + n;
      if (li + 1 < nl) save(li + 1, h);
    }
    norm_rows(h.data(), norm_.data_ptr<float>(), x.data(), n, Hd);
    save(nl, x);
    auto logits = torch::empty({n, head_->N}, torch::kFloat32);
    run({{head_.get(), logits.data_ptr<float>()}}, x.data(), n);
    return {logits, hidden};
  }

 private:
  // transformers' rotate_half convention: pairs (i, i + D/2).
  void rope(float* t, int64_t heads, const float* cs, const float* sn) const {
    const int64_t half = D_ / 2;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* r = t + hh * D_;
      for (int64_t i = 0; i < half; ++i) {
        const float a = r[i], b = r[i + half];
        r[i] = a * cs[i] - b * sn[i];
        r[i + half] = b * cs[i + half] + a * sn[i + half];
      }
    }
  }

  void store(Layer& L, const float* k, const float* v, int64_t pos) const {
    const int64_t T = L.keys.size(2);
    for (int64_t hh = 0; hh < KVH_; ++hh) {
      const int64_t off = (hh * T + pos) * D_;
      if (L.keys.scalar_type() == torch::kFloat32) {
        std::memcpy(L.keys.data_ptr<float>() + off, k + hh * D_, D_ * sizeof(float));
        std::memcpy(L.values.data_ptr<float>() + off, v + hh * D_, D_ * sizeof(float));
      } else {
        uint16_t* kd = reinterpret_cast<uint16_t*>(L.keys.data_ptr<at::BFloat16>()) + off;
        uint16_t* vd = reinterpret_cast<uint16_t*>(L.values.data_ptr<at::BFloat16>()) + off;
        for (int64_t i = 0; i < D_; ++i) {
          kd[i] = to_bf16(k[hh * D_ + i]);
          vd[i] = to_bf16(v[hh * D_ + i]);
        }
      }
    }
  }

#ifdef LEANLM_NATIVE
  static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
  static inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }

  // Softmax attention of every query head over cached positions [first, n) (head_dim a multiple of 16).
  template <typename T>
  void attend_as(const T* keys, const T* values, int64_t T_len, const float* q, float* out, int64_t first,
                 int64_t n) const {
    const int64_t per_kv = H_ / KVH_;
    at::parallel_for(0, H_, 1, [&](int64_t h0, int64_t h1) {
      std::vector<float> s(n);
      for (int64_t hh = h0; hh < h1; ++hh) {
        const int64_t base = (hh / per_kv) * T_len * D_;
        const float* qh = q + hh * D_;
        float mx = -INFINITY;
        for (int64_t t = first; t < n; ++t) {
          const T* kr = keys + base + t * D_;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t i = 0; i < D_; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load16(kr + i), acc);
          s[t] = _mm512_reduce_add_ps(acc) * static_cast<float>(scaling_);
          mx = std::max(mx, s[t]);
        }
        float total = 0.f;
        for (int64_t t = first; t < n; ++t) total += (s[t] = std::exp(s[t] - mx));
        float* oh = out + hh * D_;
        for (int64_t i = 0; i < D_; i += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t t = first; t < n; ++t)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(s[t]), load16(values + base + t * D_ + i), acc);
          _mm512_storeu_ps(oh + i, _mm512_div_ps(acc, _mm512_set1_ps(total)));
        }
      }
    });
  }
#endif

  void attend(Layer& L, const float* q, float* out, int64_t first, int64_t n) const {
#ifdef LEANLM_NATIVE
    const int64_t T_len = L.keys.size(2);
    if (L.keys.scalar_type() == torch::kFloat32) {
      attend_as(L.keys.data_ptr<float>(), L.values.data_ptr<float>(), T_len, q, out, first, n);
    } else {
      attend_as(reinterpret_cast<const uint16_t*>(L.keys.data_ptr<at::BFloat16>()),
                reinterpret_cast<const uint16_t*>(L.values.data_ptr<at::BFloat16>()), T_len, q, out, first, n);
    }
#endif
  }

  torch::Tensor embed_;
  double embed_scale_;
  torch::Tensor norm_;
  std::shared_ptr<Linear> head_;
  double eps_;
  int64_t H_, KVH_, D_, hidden_, vocab_;
  double scaling_;
  int64_t act_;
  std::vector<Layer> layers_;
};

bool available() {
#ifdef LEANLM_NATIVE
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX512-BF16 kernels");
  pybind11::class_<Linear, std::shared_ptr<Linear>>(m, "Linear")
      .def(pybind11::init<int64_t, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                          c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, int64_t, int64_t>())
      .def("forward", [](Linear& l, torch::Tensor x) {  // one input row: tests and the engine's probe
        TORCH_CHECK(x.dim() == 1 && x.size(0) == l.K, "Linear.forward: x [K]");
        auto xc = x.to(torch::kFloat32).contiguous();
        auto y = torch::empty({l.N}, torch::kFloat32);
        run({{&l, y.data_ptr<float>()}}, xc.data_ptr<float>());
        return y;
      })
      .def("row", [](const Linear& l, int64_t n) {  // tests
        TORCH_CHECK(n >= 0 && n < l.N, "Linear.row: row outside the weight");
        auto y = torch::empty({l.K}, torch::kFloat32);
        l.row(n, y.data_ptr<float>());
        return y;
      });
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<c10::optional<torch::Tensor>, double, torch::Tensor, std::shared_ptr<Linear>, double,
                          int64_t, int64_t, int64_t, double, int64_t>())
      .def("add_layer", &Decoder::add_layer)
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("steps", &Decoder::steps, pybind11::call_guard<pybind11::gil_scoped_release>());
}
