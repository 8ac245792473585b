// CPU kernel of the fused "log p(y) + argmax" row op (registry op logprob_argmax): what evaluation needs from a
// causal LM's next-token logits, the NLL of the target and whether the greedy token is the target, in one pass.
//
// Per row i of logits z (N, V) with label y, in float32 whatever the input dtype (float32, bfloat16, float16):
//
//   m = max_v z_v,   s = sum_v exp(z_v - m),   logp = (z_y - m) - log s,   argmax = min {v : z_v = m}
//
// One streaming pass, block by block (each block read from memory once and kept in L1): the block's max, then,
// only when it beats the running max (strict '>': an earlier block keeps a tie), the first index holding it,
// the running sum rescaled, and the block's exponentials added. No gradient: evaluation only.
//
// Rows: ignored (y == ignore_index): logp 0, argmax -1. Label outside [0, V) (the host checks refuse it first),
// or a log-sum-exp that is not finite (NaN, +inf or all -inf logits): logp NaN, argmax -1.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_rows.h"
#include "fastunlearn_ops.h"

// The two inner loops are compiled for AVX2 and for the baseline ISA; the loader picks one (GNU ifunc), so the
// extension still runs on any x86-64 CPU. Elsewhere: one baseline build. They vectorize (GCC 12) only because
// setup.py compiles with -fno-trapping-math (selects on floats may then be if-converted; no value changes).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTUNLEARN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTUNLEARN_VECTOR_CLONES
#endif

namespace {

using fastunlearn_cpu::check_logits_labels;
using fastunlearn_cpu::parallel_rows;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kBlock = 512;  // elements per block
constexpr int kLanes = 16;       // independent partial maxima / sums: one or two SIMD registers, no reassociation

// exp(x) for x = z - (running max) <= 0, branch-free so that the loops calling it vectorize. Cody-Waite reduction
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is exact), Cephes' degree-6 polynomial for exp(r)
// (relative error about 1e-7), times 2^n built from the exponent bits. x < -87 (exp(x) < 1.7e-38: nothing next to
// the max's own term 1) and x = -inf give 0; NaN gives NaN (n is then replaced by 0 before the integer cast).
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float xc = x < -87.f ? -87.f : (x > 0.f ? 0.f : x);  // NaN passes through both comparisons
  const float t = xc * 1.44269504088896341f;
  float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick; |t| < 2^22)
  n = n == n ? n : 0.f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // n in [-126, 0]: a normal float 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : e_r * scale;
}

// max over x[0, n); NaN entries are skipped (the exponential sum turns them into a NaN row); -inf if none is above.
// The tail has its own accumulator: sharing lane[0] with the main loop keeps GCC from vectorizing it.
FASTUNLEARN_VECTOR_CLONES float block_max(const float* x, int64_t n) {
  float lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = -kInf;
  const int64_t full = n - n % kLanes;
  for (int64_t v = 0; v < full; v += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] = x[v + k] > lane[k] ? x[v + k] : lane[k];
  float m = -kInf;
  for (int64_t v = full; v < n; ++v) m = x[v] > m ? x[v] : m;
  for (int k = 0; k < kLanes; ++k) m = lane[k] > m ? lane[k] : m;
  return m;
}

// sum over x[0, n) of exp(x_v - ref), with ref >= every x_v; kLanes partial sums (float32 accuracy over a long
// row, and the SIMD lanes).
FASTUNLEARN_VECTOR_CLONES float block_exp_sum(const float* x, int64_t n, float ref) {
  float acc[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t v = 0; v < full; v += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += exp_nonpositive(x[v + k] - ref);
  float tail = 0.f;
  for (int64_t v = full; v < n; ++v) tail += exp_nonpositive(x[v] - ref);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  return acc[0] + tail;
}

// The block as float32: the input itself, or converted into buf (bfloat16 and float16 convert exactly, so the
// argmax and its ties are those of the input).
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t v = 0; v < n; ++v) buf[v] = static_cast<float>(src[v]);
    return buf;
  }
}

template <typename scalar_t>
void logprob_argmax_kernel(const scalar_t* z, int64_t row_stride, const int64_t* labels, int64_t N, int64_t V,
                           int64_t ignore_index, float* logp, int64_t* argmax) {
  parallel_rows(N, V, [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = z + i * row_stride;
      const int64_t y = labels[i];
      if (y == ignore_index) {
        logp[i] = 0.f;
        argmax[i] = -1;
        continue;
      }
      float m = -kInf, s = 0.f;
      int64_t arg = -1;
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t n = std::min(kBlock, V - b0);
        const float* x = as_float(row + b0, n, buf);
        const float bm = block_max(x, n);
        if (bm > m) {  // a new maximum: its first index in this block, and the sum rescaled to it
          int64_t v = 0;
          while (!(x[v] == bm)) ++v;
          arg = b0 + v;
          s *= std::exp(m - bm);  // 0 while m = -inf; +inf max: NaN below
          m = bm;
        }
        // Reference 0 while m = -inf (every entry so far -inf or NaN): -inf adds 0 rather than NaN, NaN adds NaN.
        s += block_exp_sum(x, n, m > -kInf ? m : 0.f);
      }
      const float log_s = std::log(s);
      if (y < 0 || y >= V || !std::isfinite(m + log_s)) {
        logp[i] = kNaN;
        argmax[i] = -1;
        continue;
      }
      logp[i] = (static_cast<float>(row[y]) - m) - log_s;
      argmax[i] = arg;
    }
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> logprob_argmax_forward(torch::Tensor logits, torch::Tensor labels,
                                                                 int64_t ignore_index) {
  check_logits_labels(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto logp = torch::empty({N}, logits.options().dtype(at::kFloat));
  auto argmax = torch::empty({N}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_argmax_forward", [&] {
    logprob_argmax_kernel<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), labels.data_ptr<int64_t>(), N,
                                    V, ignore_index, logp.data_ptr<float>(), argmax.data_ptr<int64_t>());
  });
  return {logp, argmax};
}
