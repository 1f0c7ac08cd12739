// Torch binding of csrc/fused_ce.cu: tensor checks, dtype dispatch, device
// guard, current stream, and the stable sorts that make the per-task and
// per-sample sums deterministic. Built just in time by megamft/loss/fused_ce.py
// (build_extension) where a CUDA build of torch exists.
//
// Only c10/cuda headers that a CUDA build of torch ships and that need no
// cuBLAS / cuSPARSE / cuSOLVER headers (not ATen/cuda/CUDAContext.h), so the
// build needs no include path beyond torch's own.
//
// Every tensor is checked before a pointer reaches a kernel: device (the
// logits' CUDA device), dtype, shape (one entry per token), contiguity. A
// failed check raises RuntimeError (TORCH_CHECK) naming the argument.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <limits>
#include <string>
#include <vector>

extern "C" cudaError_t megamft_ce_shard_stats(const void*, int, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                                              float*, float*, float*, cudaStream_t);
extern "C" int64_t megamft_ce_finalize_workspace_bytes(int64_t, int64_t, int64_t);
extern "C" cudaError_t megamft_ce_finalize(int64_t, const float*, const float*, const float*, const float*,
                                           const float*, const int64_t*, const int64_t*, int64_t, const int64_t*,
                                           const int64_t*, int64_t, float*, double*, double*, double*, void*,
                                           cudaStream_t);
extern "C" cudaError_t megamft_ce_backward_inplace(void*, int, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                                                   const float*, const float*, const float*, float, cudaStream_t);

namespace {

// Numbers and shapes in check messages are formatted with std::to_string, not
// streamed: on a machine whose compiler ships a newer libstdc++ than the one
// the Python process loads, the extension's own instantiation of
// ostream::operator<<(long) crashes (seen on a GPU test machine); strings and
// torch's own printers (devices, dtypes) are safe.
std::string num(int64_t value) { return std::to_string(value); }

std::string shape(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

int dtype_code(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return -1;
}

// logits: a CUDA [tokens, vocab] tensor with contiguous, non-overlapping rows.
void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [tokens, vocab shard], got shape ", shape(logits.sizes()));
  dtype_code(logits);
  TORCH_CHECK(logits.size(1) > 0, "logits must have at least one vocab column");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "logits must have contiguous rows (stride(1) == 1), got strides ", shape(logits.strides()));
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
              "logits rows must not overlap (stride(0) >= vocab), got strides ", shape(logits.strides()));
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "logits has too many rows: ",
              num(logits.size(0)));
}

int64_t row_stride(const at::Tensor& logits) {
  return logits.size(0) <= 1 ? logits.size(1) : logits.stride(0);
}

// A per-token vector: on `device`, of `dtype`, 1-D with `length` entries, contiguous.
void check_vector(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype,
                  int64_t length) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (the device of the logits), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must be 1-D with one entry per token (", num(length),
              "), got shape ", shape(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

}  // namespace

std::vector<at::Tensor> shard_stats(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start) {
  check_logits(logits);
  const auto tokens = logits.size(0);
  check_vector(labels, "labels", logits.device(), at::kLong, tokens);
  TORCH_CHECK(vocab_start >= 0, "vocab_start must be >= 0, got ", num(vocab_start));
  const c10::cuda::CUDAGuard guard(logits.device());
  auto options = logits.options().dtype(at::kFloat);
  auto row_max = at::empty({tokens}, options);
  auto row_sumexp = at::empty({tokens}, options);
  auto row_target = at::empty({tokens}, options);
  check_cuda(megamft_ce_shard_stats(logits.data_ptr(), dtype_code(logits), tokens, logits.size(1), row_stride(logits),
                                    labels.data_ptr<int64_t>(), vocab_start, row_max.data_ptr<float>(),
                                    row_sumexp.data_ptr<float>(), row_target.data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream(logits.get_device()).stream()),
             "shard_stats");
  return {row_max, row_sumexp, row_target};
}

std::vector<at::Tensor> finalize(const at::Tensor& row_max, const at::Tensor& row_sumexp, const at::Tensor& row_target,
                                 const at::Tensor& weights, const at::Tensor& mask, const at::Tensor& task_ids,
                                 const at::Tensor& sample_ids, int64_t num_tasks, int64_t num_samples) {
  TORCH_CHECK(row_max.is_cuda(), "row_max must be a CUDA tensor, got one on ", row_max.device());
  TORCH_CHECK(row_max.dim() == 1, "row_max must be 1-D [tokens], got shape ", shape(row_max.sizes()));
  const auto tokens = row_max.size(0);
  const auto device = row_max.device();
  check_vector(row_max, "row_max", device, at::kFloat, tokens);
  check_vector(row_sumexp, "row_sumexp", device, at::kFloat, tokens);
  check_vector(row_target, "row_target", device, at::kFloat, tokens);
  check_vector(weights, "weights", device, at::kFloat, tokens);
  check_vector(mask, "mask", device, at::kFloat, tokens);
  check_vector(task_ids, "task_ids", device, at::kLong, tokens);
  check_vector(sample_ids, "sample_ids", device, at::kLong, tokens);
  TORCH_CHECK(num_tasks >= 0, "num_tasks must be >= 0, got ", num(num_tasks));
  TORCH_CHECK(num_samples >= 0, "num_samples must be >= 0, got ", num(num_samples));
  const c10::cuda::CUDAGuard guard(device);

  // Stable sorts: each id's tokens become one segment in token order, which
  // the kernels sum in a fixed order (see fused_ce.cu). Out-of-range ids sort
  // to the ends and are skipped by the kernels.
  auto [task_sorted, task_order] = at::sort(task_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto [sample_sorted, sample_order] = at::sort(sample_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);

  auto per_token = at::empty({tokens}, row_max.options());
  auto doubles = row_max.options().dtype(at::kDouble);
  auto task_sums = at::empty({num_tasks}, doubles);
  auto sample_sums = at::empty({num_samples}, doubles);
  auto total = at::empty({}, doubles);
  const int64_t workspace_bytes = megamft_ce_finalize_workspace_bytes(tokens, num_tasks, num_samples);
  TORCH_CHECK(workspace_bytes >= 0, "finalize: bad sizes");
  auto workspace = at::empty({workspace_bytes}, row_max.options().dtype(at::kByte));
  check_cuda(megamft_ce_finalize(tokens, row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(),
                                 row_target.data_ptr<float>(), weights.data_ptr<float>(), mask.data_ptr<float>(),
                                 task_sorted.data_ptr<int64_t>(), task_order.data_ptr<int64_t>(), num_tasks,
                                 sample_sorted.data_ptr<int64_t>(), sample_order.data_ptr<int64_t>(), num_samples,
                                 per_token.data_ptr<float>(), task_sums.data_ptr<double>(),
                                 sample_sums.data_ptr<double>(), total.data_ptr<double>(), workspace.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream(device.index()).stream()),
             "finalize");
  return {per_token, task_sums, sample_sums, total};
}

void backward_inplace(at::Tensor logits, const at::Tensor& labels, int64_t vocab_start, const at::Tensor& row_max,
                      const at::Tensor& row_sumexp, const at::Tensor& scaled_weights) {
  check_logits(logits);
  const auto tokens = logits.size(0);
  const auto device = logits.device();
  check_vector(labels, "labels", device, at::kLong, tokens);
  check_vector(row_max, "row_max", device, at::kFloat, tokens);
  check_vector(row_sumexp, "row_sumexp", device, at::kFloat, tokens);
  check_vector(scaled_weights, "scaled_weights", device, at::kFloat, tokens);
  TORCH_CHECK(vocab_start >= 0, "vocab_start must be >= 0, got ", num(vocab_start));
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(megamft_ce_backward_inplace(logits.data_ptr(), dtype_code(logits), tokens, logits.size(1),
                                         row_stride(logits), labels.data_ptr<int64_t>(), vocab_start,
                                         row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(),
                                         scaled_weights.data_ptr<float>(), 1.0f,
                                         c10::cuda::getCurrentCUDAStream(device.index()).stream()),
             "backward_inplace");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shard_stats", &shard_stats, "per-token max, sum-exp and target logit over a vocab shard");
  m.def("finalize", &finalize, "per-token loss, weighted total, masked per-task and per-sample sums (deterministic)");
  m.def("backward_inplace", &backward_inplace, "write (softmax - onehot) * weight over the logits");
}
