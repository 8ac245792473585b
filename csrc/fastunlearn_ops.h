// Declarations of the ops of fastunlearn._C (defined in ihl_cpu.cpp and lowrank.cpp, bound in bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <tuple>

// Inverted Hinge Loss, per row: loss = max(0, margin + p_y - p_r), p = softmax(logits[i]),
// r = the runner-up (argmax over v != y, lowest index on ties). Returns (loss f32 (N,), stats f32 (N, 2) =
// (max, log sum exp(z - max)), runner i32 (N,)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ihl_forward(
    torch::Tensor logits, torch::Tensor labels, int64_t ignore_index, double margin);

// d(sum_i grad_rows[i] * loss[i]) / d logits, written into grad_out (which may alias logits).
void ihl_backward(
    torch::Tensor grad_rows,
    torch::Tensor logits,
    torch::Tensor labels,
    torch::Tensor stats,
    torch::Tensor runner,
    int64_t ignore_index,
    double margin,
    torch::Tensor grad_out);

// Row-weighted low-rank approximation (defined in lowrank.cpp; ATen ops, CPU and CUDA tensors): per matrix b,
// the top-`rank` SVD of M = diag(w[b]) W[b], M ≈ U diag(S) Vᵀ. W (B, out, in) float32/bfloat16/float16,
// w (B, out) float32, omega (B, in, l >= rank) float32 Gaussian (ignored when exact). Randomized range finder
// with n_iter re-orthonormalized power iterations, or the full SVD when exact. Returns float32
// (U (B, out, rank), S (B, rank) descending, V (B, in, rank)); each column of V has its largest-|.| entry > 0.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> weighted_lowrank(
    torch::Tensor W, torch::Tensor w, torch::Tensor omega, int64_t rank, int64_t n_iter, bool exact);
