// Fused fake quantization for QAT/QAD on CPUs: symmetric block formats whose scales come from the
// tensor itself (dynamic activations, RTN weights), in one pass per block instead of ~20 PyTorch ops.
//
// Per block of B values: amax = max |x|; scale = amax / range, stored as fp32, or (NVFP4) as E4M3
// relative to an fp32 tensor scale `gscale`; y = round(x / scale) * scale on the element grid (E2M1
// or a signed integer). The arithmetic is that of leanlm/quant/formats.py, operation for operation,
// so the results are the same bits. The backward recomputes the block from x (nothing else saved):
// straight-through inside the clipping range, plus, with scale_grad, the scale's gradient passed to
// the block's largest magnitude (see `_FakeQuantSTE`).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct Format {
  int64_t block;  // values per block (the caller guarantees it divides the last dimension)
  float range;    // what a block's amax maps onto: 6 (E2M1) or max + 1/2 (integers)
  float int_max;  // 0: E2M1 elements; else the largest positive integer code
  float gscale;   // 0: fp32 scales; else the fp32 tensor scale under E4M3 block scales
};

inline float round_e4m3(float f) {  // f in [2^-9, 448]: round to nearest even E4M3 value
  if (f < 0.015625f) return std::rint(f * 512.0f) / 512.0f;  // subnormals: steps of 2^-9
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFFu + ((u >> 20) & 1u);  // keep 3 mantissa bits, ties to even
  u &= 0xFFF00000u;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float block_scale(float amax, const Format& fmt) {
  const float s = amax / fmt.range;
  if (fmt.gscale == 0.0f) return s > 0.0f ? s : 1.0f;
  float b = s / fmt.gscale;
  b = b < 0.001953125f ? 0.001953125f : (b > 448.0f ? 448.0f : b);  // E4M3's smallest subnormal and max
  return round_e4m3(b) * fmt.gscale;
}

// std::rint (round half to even in the default rounding mode) inlines to one instruction; nearbyint
// is a library call. Steps are powers of two, so multiplying by their inverse divides exactly. INT is
// a template parameter so that the per-value loops have no branches and vectorize.
template <bool INT>
inline float on_grid(float v, float int_max) {
  if constexpr (INT) {
    const float q = std::rint(v);
    return std::min(std::max(q, -int_max - 1.0f), int_max);
  } else {
    const float mag = std::min(std::fabs(v), 6.0f);
    float inv = mag < 2.0f ? 2.0f : 1.0f;  // E2M1's spacing: 1/2 below 2, 1 below 4, 2 up to 6
    inv = mag < 4.0f ? inv : 0.5f;
    float step = mag < 2.0f ? 0.5f : 1.0f;
    step = mag < 4.0f ? step : 2.0f;
    return std::copysign(std::rint(mag * inv) * step, v);
  }
}

inline float block_amax(const float* x, int64_t n) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

inline int64_t first_index_of(const float* x, int64_t n, float amax) {  // where torch's max(dim) points
  for (int64_t i = 0; i < n; ++i)
    if (std::fabs(x[i]) == amax) return i;
  return 0;
}

Format format_of(int64_t block, double range, double int_max, double gscale) {
  return Format{block, static_cast<float>(range), static_cast<float>(int_max), static_cast<float>(gscale)};
}

void check(const torch::Tensor& x, int64_t block) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "fake_quant: contiguous float32 CPU tensors only");
  TORCH_CHECK(block > 0 && x.numel() % block == 0, "fake_quant: the block size must divide the tensor");
}

template <bool INT>
void forward_blocks(const float* px, float* py, int64_t b0, int64_t b1, const Format& fmt) {
  const int64_t n = fmt.block;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = px + b * n;
    float* yb = py + b * n;
    const float s = block_scale(block_amax(xb, n), fmt);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yb[i] = on_grid<INT>(xb[i] / s, fmt.int_max) * s;
  }
}

template <bool INT>
void backward_blocks(const float* px, const float* pg, float* po, int64_t b0, int64_t b1, const Format& fmt,
                     bool scale_grad) {
  const int64_t n = fmt.block;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = px + b * n;
    const float* gb = pg + b * n;
    float* ob = po + b * n;
    const float amax = block_amax(xb, n);
    const float s = block_scale(amax, fmt);
    // |x| / range <= s rather than |x| <= s * range: as formats.py decides it
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) ob[i] = std::fabs(xb[i]) / fmt.range <= s ? gb[i] : 0.0f;
    if (!scale_grad) continue;
    float through = 0.0f;  // dL/d amax: sum_i g_i (y_i - x_i [inside]) / amax
#pragma omp simd reduction(+ : through)
    for (int64_t i = 0; i < n; ++i) {
      const float kept = std::fabs(xb[i]) / fmt.range <= s ? xb[i] : 0.0f;
      through += gb[i] * (on_grid<INT>(xb[i] / s, fmt.int_max) * s - kept);
    }
    const int64_t top = first_index_of(xb, n, amax);
    const float sign = xb[top] > 0.0f ? 1.0f : (xb[top] < 0.0f ? -1.0f : 0.0f);
    ob[top] += through / std::max(amax, 1e-30f) * sign;
  }
}

int64_t grain(int64_t block) { return std::max<int64_t>(1, 16384 / block); }

torch::Tensor forward(torch::Tensor x, int64_t block, double range, double int_max, double gscale) {
  check(x, block);
  const Format fmt = format_of(block, range, int_max, gscale);
  auto y = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / block, grain(block), [&](int64_t b0, int64_t b1) {
    fmt.int_max != 0.0f ? forward_blocks<true>(px, py, b0, b1, fmt) : forward_blocks<false>(px, py, b0, b1, fmt);
  });
  return y;
}

torch::Tensor backward(torch::Tensor grad, torch::Tensor x, int64_t block, double range, double int_max,
                       double gscale, bool scale_grad) {
  check(x, block);
  check(grad, block);
  TORCH_CHECK(grad.numel() == x.numel(), "fake_quant: gradient and input differ in size");
  const Format fmt = format_of(block, range, int_max, gscale);
  auto gx = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  const float* pg = grad.data_ptr<float>();
  float* po = gx.data_ptr<float>();
  at::parallel_for(0, x.numel() / block, grain(block), [&](int64_t b0, int64_t b1) {
    fmt.int_max != 0.0f ? backward_blocks<true>(px, pg, po, b0, b1, fmt, scale_grad)
                        : backward_blocks<false>(px, pg, po, b0, b1, fmt, scale_grad);
  });
  return gx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fake-quantize x in blocks (scales from x)");
  m.def("backward", &backward, "straight-through gradient of `forward` (with the scale's, optionally)");
}
