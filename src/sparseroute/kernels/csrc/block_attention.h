// Block-sparse causal attention on the CPU (block_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sparseroute {

// {out [B, H, S, D], lse [B, H, S]} of q [B, H, S, D], k, v [B, Hkv, S, D], a normalised selection
// idx [B, Hkv, ceil(S / block_size), K] and an optional key_bias [B, Hkv, S]; float32/float64.
std::vector<at::Tensor> block_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& idx, const c10::optional<at::Tensor>& key_bias,
                                                int64_t block_size, double scale);

// {dq, dk, dv, dkey_bias (None without a key_bias)} from the forward's out and lse.
std::vector<c10::optional<at::Tensor>> block_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
    const c10::optional<at::Tensor>& key_bias, const at::Tensor& out, const at::Tensor& lse, int64_t block_size,
    double scale);

}  // namespace sparseroute
