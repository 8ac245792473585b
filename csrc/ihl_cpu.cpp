// CPU kernels of the Inverted Hinge Loss (IHL).
//
// Per row i of logits z (N, V) with label y, p = softmax(z), r = runner-up (argmax over v != y,
// lowest index on ties):   loss_i = max(0, margin + p_y - p_r).
// All math is float32 whatever the input dtype (float32, bfloat16, float16).
// These are CPU-only functions even in the CUDA build: CUDA tensors go through the Triton path.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_rows.h"
#include "fastunlearn_ops.h"

namespace {

using fastunlearn_cpu::check_logits_labels;
using fastunlearn_cpu::parallel_rows;
using fastunlearn_cpu::shape_str;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kBlock = 512;  // forward: elements per online-softmax block
constexpr int kLanes = 8;        // forward: partial sums per block

template <typename scalar_t>
void ihl_forward_kernel(const scalar_t* z, int64_t row_stride, const int64_t* labels, int64_t N, int64_t V,
                        int64_t ignore_index, float margin, float* loss, float* stats, int32_t* runner) {
  parallel_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = z + i * row_stride;
      const int64_t y = labels[i];
      // 1. Ignored row: no loss, no gradient.
      if (y == ignore_index) {
        loss[i] = 0.f;
        stats[2 * i] = 0.f;
        stats[2 * i + 1] = 0.f;
        runner[i] = -1;
        continue;
      }
      // 2. One streaming pass, block by block (each block is read from memory once and stays in L1):
      //    online max m and sum s = sum_v exp(z_v - m), and the runner-up r. r is seeded with the lowest
      //    index != y; strict '>' then keeps the lowest index on ties (and the seed if all others are -inf).
      float m = -kInf, s = 0.f;
      int64_t r = (y == 0) ? 1 : 0;
      float zr = static_cast<float>(row[r]);
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t b1 = std::min(V, b0 + kBlock);
        // 2a. Block max and runner-up.
        float bm = -kInf;
        for (int64_t v = b0; v < b1; ++v) {
          const float x = static_cast<float>(row[v]);
          bm = x > bm ? x : bm;
          if (x > zr && v != y) {
            zr = x;
            r = v;
          }
        }
        // 2b. The max grows: rescale s. Reference 0 while m = -inf, so no (-inf) - (-inf) = NaN.
        if (bm > m) {
          s *= std::exp(m - bm);
          m = bm;
        }
        const float ref = (m == -kInf) ? 0.f : m;
        // 2c. Add the block's exponentials in kLanes partial sums (fp32 accuracy over a long row, and ILP).
        //     NaN or +inf logits make s NaN, so the row is flagged invalid below.
        float acc[kLanes] = {};
        int64_t v = b0;
        for (; v + kLanes <= b1; v += kLanes)
          for (int k = 0; k < kLanes; ++k) acc[k] += std::exp(static_cast<float>(row[v + k]) - ref);
        for (; v < b1; ++v) acc[0] += std::exp(static_cast<float>(row[v]) - ref);
        for (int w = kLanes / 2; w > 0; w /= 2)
          for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
        s += acc[0];
      }
      // 3. Keep m and log s apart: p = exp((z - m) - log s) stays exact to fp32 rounding even for |z| ~ 1e4,
      //    where a single lse = m + log s would lose ~1e-3 relative accuracy.
      const float log_s = std::log(s);
      stats[2 * i] = m;
      stats[2 * i + 1] = log_s;
      // Invalid row (label out of range; NaN, +inf or all -inf logits): NaN loss, runner -1.
      if (y < 0 || y >= V || !std::isfinite(m + log_s)) {
        loss[i] = kNaN;
        runner[i] = -1;
        continue;
      }
      // 4. loss = max(0, margin + p_y - p_r).
      const float py = std::exp((static_cast<float>(row[y]) - m) - log_s);
      const float pr = std::exp((zr - m) - log_s);
      loss[i] = std::max(0.f, margin + py - pr);
      runner[i] = static_cast<int32_t>(r);
    }
  });
}

// Gradient of L_i = margin + p_y - p_r (where L_i > 0; zero elsewhere), p = softmax(z):
//
//   dp_k/dz_v = p_k (δ_kv - p_v)
//   dL/dz_v   = p_y (δ_yv - p_v) - p_r (δ_rv - p_v)
//             = p_y δ_yv - p_r δ_rv - p_v (p_y - p_r)
//
// With c = grad_rows[i] where the hinge is active (margin + p_y - p_r > 0) and 0 otherwise:
//   out[v] = -p_v c (p_y - p_r) + [v == y] c p_y - [v == r] c p_r,   p_v = exp((z_v - m) - log s).
// grad_out may alias logits: z_y and z_r are read before the row is written, and every other
// element is read just before it is overwritten.
template <typename scalar_t>
void ihl_backward_kernel(const float* grad_rows, int64_t g_stride, const scalar_t* z, int64_t z_stride,
                         const int64_t* labels, const float* stats, const int32_t* runner,
                         int64_t runner_stride, int64_t N, int64_t V, int64_t ignore_index, float margin,
                         scalar_t* out, int64_t out_stride) {
  parallel_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = z + i * z_stride;
      scalar_t* orow = out + i * out_stride;
      const int64_t y = labels[i];
      const int64_t r = runner[i * runner_stride];
      // 1. Ignored row: zero gradient.
      if (y == ignore_index) {
        std::fill(orow, orow + V, static_cast<scalar_t>(0.f));
        continue;
      }
      // 2. Invalid row (runner -1 from the forward, or out-of-range indices): NaN gradient.
      if (r < 0 || r >= V || y < 0 || y >= V) {
        std::fill(orow, orow + V, static_cast<scalar_t>(kNaN));
        continue;
      }
      // 3. Recompute p_y, p_r (before any write: out may alias z) and the hinge coefficient c.
      const float m = stats[2 * i], log_s = stats[2 * i + 1];
      const float py = std::exp((static_cast<float>(row[y]) - m) - log_s);
      const float pr = std::exp((static_cast<float>(row[r]) - m) - log_s);
      const float c = (margin + py - pr > 0.f) ? grad_rows[i * g_stride] : 0.f;
      if (c == 0.f) {  // inactive hinge (or zero upstream gradient): zero gradient
        std::fill(orow, orow + V, static_cast<scalar_t>(0.f));
        continue;
      }
      // 4. The shared term -p_v c (p_y - p_r) over the row, read-then-write per element.
      const float a = c * (py - pr);
      for (int64_t v = 0; v < V; ++v) {
        const float p = std::exp((static_cast<float>(row[v]) - m) - log_s);
        orow[v] = static_cast<scalar_t>(-p * a);
      }
      // 5. The label and runner-up terms, from the saved p_y, p_r.
      orow[y] = static_cast<scalar_t>(-py * a + c * py);
      orow[r] = static_cast<scalar_t>(-pr * a - c * pr);
    }
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ihl_forward(torch::Tensor logits, torch::Tensor labels,
                                                                    int64_t ignore_index, double margin) {
  check_logits_labels(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  auto loss = torch::empty({N}, f32);
  auto stats = torch::empty({N, 2}, f32);
  auto runner = torch::empty({N}, logits.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ihl_forward", [&] {
    ihl_forward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), labels.data_ptr<int64_t>(), N, V,
                                 ignore_index, static_cast<float>(margin), loss.data_ptr<float>(),
                                 stats.data_ptr<float>(), runner.data_ptr<int32_t>());
  });
  return {loss, stats, runner};
}

void ihl_backward(torch::Tensor grad_rows, torch::Tensor logits, torch::Tensor labels, torch::Tensor stats,
                  torch::Tensor runner, int64_t ignore_index, double margin, torch::Tensor grad_out) {
  check_logits_labels(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  CHECK_CPU(grad_rows);
  CHECK_DIM(grad_rows, 1);
  CHECK_DTYPE(grad_rows, at::kFloat);
  CHECK_SIZE(grad_rows, N);
  CHECK_CPU(stats);
  CHECK_DIM(stats, 2);
  CHECK_DTYPE(stats, at::kFloat);
  CHECK_SIZE(stats, N);
  TORCH_CHECK(stats.size(1) == 2, "stats must have shape (N, 2) = (max, log-sum-exp), got ", shape_str(stats));
  CHECK_CONTIGUOUS(stats);
  CHECK_CPU(runner);
  CHECK_DIM(runner, 1);
  CHECK_DTYPE(runner, at::kInt);
  CHECK_SIZE(runner, N);
  CHECK_CPU(grad_out);
  TORCH_CHECK(grad_out.sizes() == logits.sizes(), "grad_out must have the ", shape_str(logits),
              " of logits, got ", shape_str(grad_out));
  CHECK_DTYPE(grad_out, logits.scalar_type());
  CHECK_LAST_DIM_STRIDE1(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ihl_backward", [&] {
    ihl_backward_kernel<scalar_t>(grad_rows.data_ptr<float>(), grad_rows.stride(0), logits.data_ptr<scalar_t>(),
                                  logits.stride(0), labels.data_ptr<int64_t>(), stats.data_ptr<float>(),
                                  runner.data_ptr<int32_t>(), runner.stride(0), N, V, ignore_index,
                                  static_cast<float>(margin), grad_out.data_ptr<scalar_t>(), grad_out.stride(0));
  });
}
