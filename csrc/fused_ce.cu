// Fused vocab-parallel cross entropy with masked per-task / per-sample sums.
//
// Torch-free on purpose: this file needs only the CUDA headers, so CI compiles
// it with nvcc on machines without a GPU or a CUDA build of torch. The torch
// binding (tensor checks, dtype dispatch, current stream) is fused_ce_binding.cpp.
//
// Scheme (megatron's vocab-parallel cross entropy, one read of the logits):
//   1. shard_stats: per token, over this rank's vocab shard, the max logit, the
//      sum of exp(logit - max) (online, one pass) and the target logit when the
//      label falls in the shard (0 otherwise).
//   2. the caller all-reduces across TP: max (MAX), sum-exp rescaled to the
//      global max (SUM), target (SUM).
//   3. finalize: loss = log(sumexp) + max - target per token; adds
//      weight * loss into the total and mask * loss into per-task and
//      per-sample sums.
//   4. backward_inplace: grad = (softmax - onehot) * weight * scale, written
//      over the logits (no second [tokens, vocab] buffer).

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_from_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_from_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// Merge (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void merge(float& m, float& s, float other_m, float other_s) {
  if (other_m == -INFINITY) return;
  if (m == -INFINITY) {
    m = other_m;
    s = other_s;
    return;
  }
  const float top = fmaxf(m, other_m);
  s = s * __expf(m - top) + other_s * __expf(other_m - top);
  m = top;
}

__device__ __forceinline__ void block_merge(float& m, float& s) {
  __shared__ float shared_m[kWarps];
  __shared__ float shared_s[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    merge(m, s, __shfl_down_sync(0xffffffffu, m, offset), __shfl_down_sync(0xffffffffu, s, offset));
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? shared_m[lane] : -INFINITY;
    s = lane < kWarps ? shared_s[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) {
      merge(m, s, __shfl_down_sync(0xffffffffu, m, offset), __shfl_down_sync(0xffffffffu, s, offset));
    }
  }
}

template <typename T>
__global__ void shard_stats_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                   const int64_t* __restrict__ labels, int64_t vocab_start,
                                   float* __restrict__ row_max, float* __restrict__ row_sumexp,
                                   float* __restrict__ row_target) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  float m = -INFINITY;
  float s = 0.0f;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float value = load_as_float(x + v);
    if (value > m) {
      s = s * __expf(m - value) + 1.0f;  // m = -inf at first: 0 * 0 + 1
      m = value;
    } else {
      s += __expf(value - m);
    }
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {
    row_max[row] = m;
    row_sumexp[row] = s;
    const int64_t local = labels[row] - vocab_start;
    row_target[row] = (local >= 0 && local < vocab) ? load_as_float(x + local) : 0.0f;
  }
}

__global__ void finalize_kernel(int64_t tokens, const float* __restrict__ row_max,
                                const float* __restrict__ row_sumexp, const float* __restrict__ row_target,
                                const float* __restrict__ weights, const float* __restrict__ mask,
                                const int64_t* __restrict__ task_ids, const int64_t* __restrict__ sample_ids,
                                float* __restrict__ per_token_loss, double* __restrict__ task_sums,
                                double* __restrict__ sample_sums, double* __restrict__ weighted_total) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float loss = logf(row_sumexp[t]) + row_max[t] - row_target[t];
  per_token_loss[t] = loss;
  if (weights[t] != 0.0f) atomicAdd(weighted_total, static_cast<double>(weights[t]) * loss);
  if (mask[t] != 0.0f) {
    const double masked = static_cast<double>(mask[t]) * loss;
    atomicAdd(task_sums + task_ids[t], masked);
    atomicAdd(sample_sums + sample_ids[t], masked);
  }
}

template <typename T>
__global__ void backward_inplace_kernel(T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                        const int64_t* __restrict__ labels, int64_t vocab_start,
                                        const float* __restrict__ row_max, const float* __restrict__ row_sumexp,
                                        const float* __restrict__ weights, float grad_scale) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * row_stride;
  const float g = weights[row] * grad_scale;
  const float top = row_max[row];
  const float inverse = 1.0f / row_sumexp[row];
  const int64_t target = labels[row] - vocab_start;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float p = (g == 0.0f) ? 0.0f : __expf(load_as_float(x + v) - top) * inverse;
    store_from_float(x + v, (p - (v == target ? 1.0f : 0.0f)) * g);
  }
}

template <typename T>
cudaError_t launch_stats(const void* logits, int64_t tokens, int64_t vocab, int64_t row_stride,
                         const int64_t* labels, int64_t vocab_start, float* row_max, float* row_sumexp,
                         float* row_target, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  shard_stats_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), vocab, row_stride, labels, vocab_start, row_max, row_sumexp, row_target);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(void* logits, int64_t tokens, int64_t vocab, int64_t row_stride,
                            const int64_t* labels, int64_t vocab_start, const float* row_max,
                            const float* row_sumexp, const float* weights, float grad_scale,
                            cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  backward_inplace_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<T*>(logits), vocab, row_stride, labels, vocab_start, row_max, row_sumexp, weights, grad_scale);
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 = float32, 1 = bfloat16.
extern "C" cudaError_t megamft_ce_shard_stats(const void* logits, int dtype, int64_t tokens, int64_t vocab,
                                              int64_t row_stride, const int64_t* labels, int64_t vocab_start,
                                              float* row_max, float* row_sumexp, float* row_target,
                                              cudaStream_t stream) {
  if (dtype == 0)
    return launch_stats<float>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max, row_sumexp,
                               row_target, stream);
  if (dtype == 1)
    return launch_stats<__nv_bfloat16>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max,
                                       row_sumexp, row_target, stream);
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t megamft_ce_finalize(int64_t tokens, const float* row_max, const float* row_sumexp,
                                           const float* row_target, const float* weights, const float* mask,
                                           const int64_t* task_ids, const int64_t* sample_ids,
                                           float* per_token_loss, double* task_sums, double* sample_sums,
                                           double* weighted_total, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((tokens + kThreads - 1) / kThreads);
  finalize_kernel<<<blocks, kThreads, 0, stream>>>(tokens, row_max, row_sumexp, row_target, weights, mask,
                                                   task_ids, sample_ids, per_token_loss, task_sums, sample_sums,
                                                   weighted_total);
  return cudaGetLastError();
}

extern "C" cudaError_t megamft_ce_backward_inplace(void* logits, int dtype, int64_t tokens, int64_t vocab,
                                                   int64_t row_stride, const int64_t* labels, int64_t vocab_start,
                                                   const float* row_max, const float* row_sumexp,
                                                   const float* weights, float grad_scale, cudaStream_t stream) {
  if (dtype == 0)
    return launch_backward<float>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max, row_sumexp,
                                  weights, grad_scale, stream);
  if (dtype == 1)
    return launch_backward<__nv_bfloat16>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max,
                                          row_sumexp, weights, grad_scale, stream);
  return cudaErrorInvalidValue;
}
