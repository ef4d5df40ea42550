// Torch-facing launcher of the CUDA assignment solver (built only with MOEFUSE_CUDA).
#pragma once

#ifdef MOEFUSE_CUDA
#include <torch/extension.h>

#include <tuple>

namespace moefuse {

// Same contract as linear_assignment_cpu for a finite float32/float64/int64 CUDA cost matrix (no forbidden
// entries), solved by the auction of lap_cuda.cu: exact for integer-valued costs; otherwise the total
// is within (max - min cost) * 2^-20 of the optimum. Outputs are int64 CUDA tensors. `stream` is the
// caller's current cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream), and the
// caller makes the cost's device current; this file needs no CUDA headers.
std::tuple<at::Tensor, at::Tensor> linear_assignment_cuda(const at::Tensor& cost, bool maximize, int64_t stream);

}  // namespace moefuse
#endif
