// Declarations of the ops of fastunlearn._C (defined in ihl_cpu.cpp and logprob_cpu.cpp, bound in bindings.cpp).
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

// log p(label) and the first argmax of each row, in one pass and without a gradient (evaluation). Returns
// (logp f32 (N,), argmax i64 (N,)); ignored rows: (0, -1); rows with a non-finite log-sum-exp: (NaN, -1).
std::tuple<torch::Tensor, torch::Tensor> logprob_argmax_forward(
    torch::Tensor logits, torch::Tensor labels, int64_t ignore_index);
