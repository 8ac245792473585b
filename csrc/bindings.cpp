// pybind11 module fastunlearn._C: the CPU C++ kernels (CUDA tensors go through the Triton path).
#include <torch/extension.h>

#include "fastunlearn_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastunlearn C++ ops on CPU tensors: Inverted Hinge Loss, per-token log-probability with the argmax";
  m.def("ihl_forward", &ihl_forward,
        "IHL forward: (loss f32 (N,), stats f32 (N, 2), runner i32 (N,)) from logits (N, V) and labels (N,)",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("margin"));
  m.def("ihl_backward", &ihl_backward,
        "IHL backward: writes d(sum_i grad_rows[i] * loss[i]) / d logits into grad_out (may alias logits)",
        py::arg("grad_rows"), py::arg("logits"), py::arg("labels"), py::arg("stats"), py::arg("runner"),
        py::arg("ignore_index"), py::arg("margin"), py::arg("grad_out"));
  m.def("logprob_argmax_forward", &logprob_argmax_forward,
        "log p(label) and argmax per row, one pass, no gradient: (logp f32 (N,), argmax i64 (N,)); ignored rows "
        "(0, -1), rows with a non-finite log-sum-exp (NaN, -1)",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"));
}
