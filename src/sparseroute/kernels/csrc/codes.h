// The integer codes the Python side passes (activations, backends, products), taken from the
// preprocessor macros that sparseroute/kernels/codes.py defines (compile_definitions(), which
// sparseroute.kernels.extension passes to the compiler): the codes are defined once, in Python,
// and never repeated here by hand.
#pragma once

#include <cstdint>

#if !defined(SPARSEROUTE_ACT_SWIGLU) || !defined(SPARSEROUTE_ACT_GELU) || !defined(SPARSEROUTE_ACT_SILU) || \
    !defined(SPARSEROUTE_ACT_RELU)
#error "sparseroute: the activation codes are missing: build through sparseroute.kernels.extension (codes.py)"
#endif
#if !defined(SPARSEROUTE_BACKEND_ATEN) || !defined(SPARSEROUTE_BACKEND_ONEDNN) || !defined(SPARSEROUTE_BACKEND_OWN)
#error "sparseroute: the backend codes are missing: build through sparseroute.kernels.extension (codes.py)"
#endif
#if !defined(SPARSEROUTE_PRODUCT_UP) || !defined(SPARSEROUTE_PRODUCT_DOWN) || !defined(SPARSEROUTE_PRODUCT_GRAD_ACT) || \
    !defined(SPARSEROUTE_PRODUCT_GRAD_X) || !defined(SPARSEROUTE_PRODUCT_GRAD_W_IN) ||                          \
    !defined(SPARSEROUTE_PRODUCT_GRAD_W_OUT) || !defined(SPARSEROUTE_NUM_PRODUCTS)
#error "sparseroute: the product codes are missing: build through sparseroute.kernels.extension (codes.py)"
#endif

namespace sparseroute {

// The experts' activation (codes.ACTIVATIONS).
enum Activation : int64_t {
  kSwiGLU = SPARSEROUTE_ACT_SWIGLU,
  kGELU = SPARSEROUTE_ACT_GELU,
  kSiLU = SPARSEROUTE_ACT_SILU,
  kReLU = SPARSEROUTE_ACT_RELU,
};

// Where one matrix product runs (codes.BACKENDS): torch's matmul, oneDNN's matmul, or the
// kernel's own row products (row_gemm.h).
enum Backend : int64_t {
  kAten = SPARSEROUTE_BACKEND_ATEN,
  kOneDNN = SPARSEROUTE_BACKEND_ONEDNN,
  kOwn = SPARSEROUTE_BACKEND_OWN,
};

// The expert MLP's per-expert products (codes.PRODUCTS): their positions in a backends list.
enum Product : int64_t {
  kUp = SPARSEROUTE_PRODUCT_UP,              // x @ w_in
  kDown = SPARSEROUTE_PRODUCT_DOWN,          // a @ w_out
  kGradAct = SPARSEROUTE_PRODUCT_GRAD_ACT,   // g @ w_out^T
  kGradX = SPARSEROUTE_PRODUCT_GRAD_X,       // dL/dh @ w_in^T
  kGradWIn = SPARSEROUTE_PRODUCT_GRAD_W_IN,  // x^T dL/dh
  kGradWOut = SPARSEROUTE_PRODUCT_GRAD_W_OUT,  // a^T g
};
constexpr int64_t kNumProducts = SPARSEROUTE_NUM_PRODUCTS;

static_assert(kNumProducts == 6, "codes.PRODUCTS and the kernel's products differ in number");
static_assert(kUp >= 0 && kUp < kNumProducts && kDown >= 0 && kDown < kNumProducts && kGradAct >= 0 &&
                  kGradAct < kNumProducts && kGradX >= 0 && kGradX < kNumProducts && kGradWIn >= 0 &&
                  kGradWIn < kNumProducts && kGradWOut >= 0 && kGradWOut < kNumProducts,
              "a product code is not a position in a list of kNumProducts");

// Names for messages (a switch over the codes: two equal codes would not compile).
inline const char* activation_name(int64_t code) {
  switch (code) {
    case kSwiGLU: return "swiglu";
    case kGELU: return "gelu";
    case kSiLU: return "silu";
    case kReLU: return "relu";
    default: return nullptr;
  }
}

inline const char* backend_name(int64_t code) {
  switch (code) {
    case kAten: return "aten";
    case kOneDNN: return "onednn";
    case kOwn: return "own";
    default: return nullptr;
  }
}

inline const char* product_name(int64_t code) {
  switch (code) {
    case kUp: return "up";
    case kDown: return "down";
    case kGradAct: return "grad_act";
    case kGradX: return "grad_x";
    case kGradWIn: return "grad_w_in";
    case kGradWOut: return "grad_w_out";
    default: return nullptr;
  }
}

}  // namespace sparseroute
