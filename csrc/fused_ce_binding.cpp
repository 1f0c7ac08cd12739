// Torch binding of csrc/fused_ce.cu: tensor checks, dtype dispatch, current stream.
// Built just in time by megamft/loss/fused_ce.py where a CUDA build of torch exists.

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

extern "C" cudaError_t megamft_ce_shard_stats(const void*, int, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                                              float*, float*, float*, cudaStream_t);
extern "C" cudaError_t megamft_ce_finalize(int64_t, const float*, const float*, const float*, const float*,
                                           const float*, const int64_t*, const int64_t*, float*, double*, double*,
                                           double*, cudaStream_t);
extern "C" cudaError_t megamft_ce_backward_inplace(void*, int, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                                                   const float*, const float*, const float*, float, cudaStream_t);

namespace {

int dtype_code(const at::Tensor& logits) {
  if (logits.scalar_type() == at::kFloat) return 0;
  if (logits.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "fused cross entropy reads float32 or bfloat16 logits, got ", logits.scalar_type());
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1,
              "logits must be a CUDA [tokens, vocab] tensor with contiguous rows");
  TORCH_CHECK(labels.is_cuda() && labels.scalar_type() == at::kLong && labels.numel() == logits.size(0),
              "labels must be CUDA int64 with one entry per token");
}

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

}  // namespace

std::vector<at::Tensor> shard_stats(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start) {
  check_logits(logits, labels);
  const auto tokens = logits.size(0);
  auto options = logits.options().dtype(at::kFloat);
  auto row_max = at::empty({tokens}, options);
  auto row_sumexp = at::empty({tokens}, options);
  auto row_target = at::empty({tokens}, options);
  check_cuda(megamft_ce_shard_stats(logits.data_ptr(), dtype_code(logits), tokens, logits.size(1), logits.stride(0),
                                    labels.contiguous().data_ptr<int64_t>(), vocab_start, row_max.data_ptr<float>(),
                                    row_sumexp.data_ptr<float>(), row_target.data_ptr<float>(),
                                    at::cuda::getCurrentCUDAStream()),
             "shard_stats");
  return {row_max, row_sumexp, row_target};
}

std::vector<at::Tensor> finalize(const at::Tensor& row_max, const at::Tensor& row_sumexp, const at::Tensor& row_target,
                                 const at::Tensor& weights, const at::Tensor& mask, const at::Tensor& task_ids,
                                 const at::Tensor& sample_ids, int64_t num_tasks, int64_t num_samples) {
  const auto tokens = row_max.numel();
  for (const auto* t : {&row_sumexp, &row_target, &weights, &mask}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->numel() == tokens, "float32 per-token inputs");
  }
  auto per_token = at::empty({tokens}, row_max.options());
  auto doubles = row_max.options().dtype(at::kDouble);
  auto task_sums = at::zeros({num_tasks}, doubles);
  auto sample_sums = at::zeros({num_samples}, doubles);
  auto total = at::zeros({}, doubles);
  check_cuda(megamft_ce_finalize(tokens, row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(),
                                 row_target.data_ptr<float>(), weights.contiguous().data_ptr<float>(),
                                 mask.contiguous().data_ptr<float>(), task_ids.contiguous().data_ptr<int64_t>(),
                                 sample_ids.contiguous().data_ptr<int64_t>(), per_token.data_ptr<float>(),
                                 task_sums.data_ptr<double>(), sample_sums.data_ptr<double>(),
                                 total.data_ptr<double>(), at::cuda::getCurrentCUDAStream()),
             "finalize");
  return {per_token, task_sums, sample_sums, total};
}

void backward_inplace(at::Tensor logits, const at::Tensor& labels, int64_t vocab_start, const at::Tensor& row_max,
                      const at::Tensor& row_sumexp, const at::Tensor& scaled_weights) {
  check_logits(logits, labels);
  check_cuda(megamft_ce_backward_inplace(logits.data_ptr(), dtype_code(logits), logits.size(0), logits.size(1),
                                         logits.stride(0), labels.contiguous().data_ptr<int64_t>(), vocab_start,
                                         row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(),
                                         scaled_weights.contiguous().data_ptr<float>(), 1.0f,
                                         at::cuda::getCurrentCUDAStream()),
             "backward_inplace");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shard_stats", &shard_stats, "per-token max, sum-exp and target logit over a vocab shard");
  m.def("finalize", &finalize, "per-token loss, weighted total, masked per-task and per-sample sums");
  m.def("backward_inplace", &backward_inplace, "write (softmax - onehot) * weight over the logits");
}
