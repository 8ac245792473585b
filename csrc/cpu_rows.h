// What the CPU row kernels share (ihl_cpu.cpp, logprob_cpu.cpp): argument checks with safe messages and the
// split of rows over threads.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

// Integers and shapes enter messages as std::to_string text: streaming them through the ostream that
// c10::str uses crashed (SIGSEGV in std::num_put) on an image whose g++ headers were newer than the
// libstdc++ loaded with torch (seen with torch 2.11 + g++ 13). Strings stream safely.
#define CHECK_CPU(x) \
  TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor (CUDA tensors go through the Triton path), got ", (x).device())
#define CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must be " #d "-D, got ", fastunlearn_cpu::shape_str(x))
#define CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must have dtype ", (t), ", got ", (x).scalar_type())
#define CHECK_SIZE(x, n)                                                                      \
  TORCH_CHECK((x).size(0) == (n), #x " must have N = ", std::to_string(n), " rows (logits.size(0)), got ", \
              fastunlearn_cpu::shape_str(x))
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_LAST_DIM_STRIDE1(x) \
  TORCH_CHECK((x).stride(-1) == 1, #x " must have last-dim stride 1, got ", std::to_string((x).stride(-1)))

namespace fastunlearn_cpu {

inline std::string shape_str(const torch::Tensor& t) {
  std::string out = "shape (";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + (t.dim() == 1 ? ",)" : ")");
}

// Rows split across at::get_num_threads() std::threads (serially below ~2^16 elements). Plain threads
// rather than at::parallel_for, whose OpenMP backend would need -fopenmp here and so a second OpenMP
// runtime next to the one bundled with torch.
template <typename F>
void parallel_rows(int64_t N, int64_t V, const F& body) {
  const int64_t threads = std::min<int64_t>(std::max(at::get_num_threads(), 1), N);
  if (threads <= 1 || N * V < (int64_t{1} << 16)) {
    body(0, N);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (N + threads - 1) / threads;
  for (int64_t begin = per; begin < N; begin += per) pool.emplace_back(body, begin, std::min(N, begin + per));
  body(0, std::min(N, per));
  for (auto& t : pool) t.join();
}

// logits (N, V) float32 / bfloat16 / float16 with unit last-dim stride, V in [2, 2^31); labels (N,) int64.
inline void check_logits_labels(const torch::Tensor& logits, const torch::Tensor& labels) {
  CHECK_CPU(logits);
  CHECK_DIM(logits, 2);
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(1) >= 2, "logits must have V >= 2 classes (dim 1), got ", shape_str(logits));
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), "logits must have V < 2^31, got ",
              shape_str(logits));
  CHECK_LAST_DIM_STRIDE1(logits);
  CHECK_CPU(labels);
  CHECK_DIM(labels, 1);
  CHECK_DTYPE(labels, at::kLong);
  CHECK_SIZE(labels, logits.size(0));
  CHECK_CONTIGUOUS(labels);
}

}  // namespace fastunlearn_cpu
