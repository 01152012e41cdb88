// Softmax top-k routing decision for CPUs, forward and backward (softmax_topk.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sparseroute {

// {probs [T, E], indices [T, K] int64, weights [T, K]}: softmax over each row of ``logits``, the K
// largest probabilities in descending order, and those probabilities, divided by their sum
// (clamped below at 1e-20) when ``renormalize``.
std::vector<at::Tensor> softmax_topk_forward(const at::Tensor& logits, int64_t K, bool renormalize);

// dL/dlogits from dL/dprobs and dL/dweights (either may be absent: zero), given the forward's
// outputs.
at::Tensor softmax_topk_backward(const std::optional<at::Tensor>& grad_probs, const std::optional<at::Tensor>& grad_w,
                                 const at::Tensor& probs, const at::Tensor& idx, const at::Tensor& w, bool renormalize);

}  // namespace sparseroute
