// Batched row-weighted low-rank approximation, the SVD that FILA initializes LoRA from.
//
// Per matrix b, with M = diag(w) W (out, in) in float32:  M ≈ U diag(S) Vᵀ, top r singular triplets,
// which minimize ‖diag(w)(W - B A)‖_F over rank-r products B A (Eckart–Young on M).
//
// Randomized mode (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), l = omega.size(2) >= r columns:
//   Y = M Ω;  n_iter times { Q = qr(Y); P = qr(Mᵀ Q); Y = M P };  Q = qr(Y)          Q: (out, k), k = min(out, l)
//   M ≈ Q Qᵀ M;  svd(Qᵀ M) = Ũ S Vᵀ;  U = Q Ũ                                          then truncate to r
// Exact mode: svd(M) truncated to r (omega is ignored).
// Signs: each column of V has its largest-|.| entry positive (lowest row index on ties); U and V columns
// flip together, so U S Vᵀ is unchanged.
//
// ATen ops only, so the same code serves CPU and CUDA tensors; CPU batches run in cache-sized chunks.
// fastunlearn/lowrank.py (_weighted_lowrank_torch) makes the same ATen calls in the same order: both paths
// agree bit for bit.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "fastunlearn_ops.h"

// Integers and shapes enter messages as std::to_string text, never streamed: c10::str's ostream crashed
// (SIGSEGV in std::num_put) with g++ headers newer than the libstdc++ torch loads (see ihl_cpu.cpp).
#define CHECK_FLOAT32(x) TORCH_CHECK((x).scalar_type() == at::kFloat, #x " must be float32, got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, ref)                                                                          \
  TORCH_CHECK((x).device() == (ref).device(), #x " must be on the device of " #ref " (", (ref).device(), \
              "), got ", (x).device())

namespace {

std::string shape_str(const torch::Tensor& t) {
  std::string out = "shape (";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + (t.dim() == 1 ? ",)" : ")");
}

void check_lowrank_args(const torch::Tensor& W, const torch::Tensor& w, const torch::Tensor& omega, int64_t rank,
                        int64_t n_iter, bool exact) {
  TORCH_CHECK(W.dim() == 3, "W must be 3-D (B, out, in), got ", shape_str(W));
  const auto dt = W.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "W must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = W.size(0), out = W.size(1), in = W.size(2);
  TORCH_CHECK(B > 0 && out > 0 && in > 0, "W must be non-empty, got ", shape_str(W));
  CHECK_FLOAT32(w);
  CHECK_SAME_DEVICE(w, W);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == B && w.size(1) == out, "w must have shape (B, out) = (", std::to_string(B),
              ", ", std::to_string(out), ") to match W ", shape_str(W), ", got ", shape_str(w));
  const int64_t min_dim = std::min(out, in);
  TORCH_CHECK(rank >= 1 && rank <= min_dim, "rank must be in [1, min(out, in) = ", std::to_string(min_dim), "], got ",
              std::to_string(rank));
  TORCH_CHECK(n_iter >= 0, "n_iter must be >= 0, got ", std::to_string(n_iter));
  if (exact) return;  // omega is not used
  CHECK_FLOAT32(omega);
  CHECK_SAME_DEVICE(omega, W);
  TORCH_CHECK(omega.dim() == 3 && omega.size(0) == B && omega.size(1) == in && omega.size(2) >= rank,
              "omega must have shape (B, in, l) = (", std::to_string(B), ", ", std::to_string(in),
              ", l) with l >= rank = ", std::to_string(rank), ", got ", shape_str(omega));
}

torch::Tensor orthonormal_basis(const torch::Tensor& Y) { return std::get<0>(at::linalg_qr(Y, "reduced")); }

// Matrices per chunk. CPU: as many as fit kCpuChunkBytes of float32 M (at least one), so each M stays in
// cache across its 2 + 2 n_iter products: measured (one thread, 2 MiB L2 per core Xeon), one 3072x768
// matrix at a time is 1.5-1.8x faster than bmm over a stack of 6, while stacks of 256x256 or smaller gain
// 10-45% from batching. Other devices (CUDA): the whole batch (batched kernels fill the device).
constexpr int64_t kCpuChunkBytes = int64_t{2} << 20;

int64_t chunk_size(const torch::Tensor& W) {
  if (!W.device().is_cpu()) return W.size(0);
  return std::max<int64_t>(1, kCpuChunkBytes / (W.size(1) * W.size(2) * 4));
}

// Steps 1-4 on a chunk of matrices at once (batched ATen calls).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> lowrank_chunk(const torch::Tensor& W, const torch::Tensor& w,
                                                                      const torch::Tensor& omega, int64_t rank,
                                                                      int64_t n_iter, bool exact) {
  // 1. M = diag(w) W, float32 (type promotion upcasts bf16/fp16 W on the fly: one (B, out, in) buffer).
  //    Measured on CPU: 10-18% faster overall than never forming M (scaling the thin side of each product,
  //    M X = diag(w) (W X)), though that saves this pass.
  const auto M = at::mul(W, w.unsqueeze(-1));  // (B, out, in)
  torch::Tensor U, S, Vh;
  if (exact) {
    // 2a. Full thin SVD of M: (B, out, k), (B, k), (B, k, in) with k = min(out, in).
    std::tie(U, S, Vh) = at::linalg_svd(M, /*full_matrices=*/false);
    U = U.narrow(2, 0, rank);
  } else {
    // 2b. Range finder with power iterations, re-orthonormalized at every product (subspace iteration):
    //     without it the columns of (M Mᵀ)^q M Ω collapse onto the top singular vector in float32.
    auto Y = at::bmm(M, omega);  // (B, out, l)
    for (int64_t i = 0; i < n_iter; ++i) {
      const auto Z = at::bmm(M.mT(), orthonormal_basis(Y));  // (B, in, k)
      Y = at::bmm(M, orthonormal_basis(Z));                  // (B, out, k)
    }
    const auto Q = orthonormal_basis(Y);  // (B, out, k)
    // 3. SVD of the small projection Qᵀ M, lifted back by Q (only the r kept columns).
    torch::Tensor Us;
    // (B, k, k'), (B, k'), (B, k', in) with k' = min(k, in)
    std::tie(Us, S, Vh) = at::linalg_svd(at::bmm(Q.mT(), M), /*full_matrices=*/false);
    U = at::bmm(Q, Us.narrow(2, 0, rank));  // (B, out, r)
  }
  S = S.narrow(1, 0, rank);                   // (B, r), descending
  const auto V = Vh.narrow(1, 0, rank).mT();  // (B, in, r)
  // 4. Deterministic signs: the largest-|.| entry of each column of V becomes positive.
  const auto flip = V.gather(1, V.abs().argmax(1, /*keepdim=*/true)).lt(0);  // (B, 1, r)
  return {at::where(flip, -U, U).contiguous(), S.contiguous(), at::where(flip, -V, V).contiguous()};
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> weighted_lowrank(torch::Tensor W, torch::Tensor w,
                                                                         torch::Tensor omega, int64_t rank,
                                                                         int64_t n_iter, bool exact) {
  check_lowrank_args(W, w, omega, rank, n_iter, exact);
  const int64_t B = W.size(0);
  const int64_t chunk = chunk_size(W);
  if (chunk >= B) return lowrank_chunk(W, w, omega, rank, n_iter, exact);
  std::vector<torch::Tensor> Us, Ss, Vs;
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    auto [U, S, V] = lowrank_chunk(W.narrow(0, b0, n), w.narrow(0, b0, n), exact ? omega : omega.narrow(0, b0, n),
                                   rank, n_iter, exact);
    Us.push_back(U);
    Ss.push_back(S);
    Vs.push_back(V);
  }
  return {at::cat(Us), at::cat(Ss), at::cat(Vs)};
}
