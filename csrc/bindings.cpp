// Python bindings of the moefuse._C extension. Heavy kernels release the GIL.
#include <torch/extension.h>

#include "lap_cpu.h"
#include "lap_cuda_launch.h"
#include "merge_cpu.h"
#include "moe_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moefuse C++ kernels";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("count_nonfinite", &moefuse::count_nonfinite, nogil);
  m.def("histogram_level1", &moefuse::histogram_level1, nogil);
  m.def("histogram_level2", &moefuse::histogram_level2, nogil);
  m.def("chunk_counts", &moefuse::chunk_counts, nogil);
  m.def("nth_key_index", &moefuse::nth_key_index, nogil);
  m.def("l1_norms", &moefuse::l1_norms, nogil);
  m.def("fused_gta", &moefuse::fused_gta, nogil);
  m.def("weighted_sum", &moefuse::weighted_sum, nogil);
  m.def("model_stock_rows", &moefuse::model_stock_rows, nogil);
  m.def("della_keep", &moefuse::della_keep, nogil);
  m.def("gram", &moefuse::gram, py::arg("tensors"), py::arg("base") = py::none(), nogil);
  m.def("experts_linear", &moefuse::experts_linear, nogil);
  m.def("silu_mul_", &moefuse::silu_mul_, nogil);
  m.def("combine_rows", &moefuse::combine_rows, nogil);
  m.def("has_bf16_dot", &moefuse::has_bf16_dot);
  m.def("linear_assignment", &moefuse::linear_assignment_cpu, py::arg("cost"), py::arg("maximize"), nogil);
#ifdef MOEFUSE_CUDA
  m.def("linear_assignment_cuda", &moefuse::linear_assignment_cuda, py::arg("cost"), py::arg("maximize"),
        py::arg("stream"), nogil);
#endif
}
