// Fused vocab-parallel cross entropy with masked per-task / per-sample sums.
//
// Torch-free on purpose: this file needs only the CUDA headers, so CI compiles
// it with nvcc on machines without a GPU or a CUDA build of torch. The torch
// binding (tensor checks, dtype dispatch, current stream, the stable sorts of
// the ids) is fused_ce_binding.cpp.
//
// Scheme (megatron's vocab-parallel cross entropy, one read of the logits):
//   1. shard_stats: per token, over this rank's vocab shard, the max logit, the
//      sum of exp(logit - max) (online, one pass) and the target logit when the
//      label falls in the shard (0 otherwise).
//   2. the caller all-reduces across TP: max (MAX), sum-exp rescaled to the
//      global max (SUM), target (SUM).
//   3. finalize: loss = log(sumexp) + max - target per token; the weighted
//      total sum_t w_t * loss_t, and mask_t * loss_t summed per task and per
//      sample.
//   4. backward_inplace: grad = (softmax - onehot) * weight * scale, written
//      over the logits (no second [tokens, vocab] buffer).
//
// Determinism: every result is bitwise the same run after run for the same
// inputs (same GPU, same launch configuration). No kernel uses floating-point
// atomics; every sum is taken in a fixed order:
//   - row statistics: each thread walks a fixed strided set of columns, then a
//     fixed shuffle / shared-memory tree merges the threads.
//   - weighted total: each block sums a fixed range of tokens (fixed tree) into
//     a per-block partial; one block then sums the partials in a fixed order.
//   - per-task and per-sample sums: the binding stably sorts the ids (a stable
//     sort's permutation is unique), so every id's tokens form one contiguous
//     segment, in token order. A bounds kernel finds each segment's [begin,
//     end), and a group of threads per id sums its segment with a fixed strided
//     walk and a fixed tree. Why a sort rather than per-block partials: partials
//     need [blocks x ids] memory, and ids can be as many as tokens (per-sample
//     sums over short samples); the sort needs O(tokens + ids) memory and time
//     whatever the number of ids. Fixed-point integer atomics would also be
//     order-independent, but lose range and precision and cannot hold inf.
//
// Special values:
//   - a row whose logits are all -inf has max -inf and sum-exp 0 (never NaN);
//     its loss is +inf. A token with weight 0 (or mask 0) contributes exactly 0
//     to the total (or to its task and sample sums), even when its loss is inf
//     or NaN, and gets an exactly 0 gradient row.
//   - labels outside this shard ([vocab_start, vocab_start + vocab)) have no
//     target here; task and sample ids outside [0, num_tasks) / [0, num_samples)
//     are skipped: no id is ever used to address memory before it is checked.
//   - all offsets into the logits are 64-bit (tokens x vocab may exceed 2^31).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTokensPerPartial = 4096;  // tokens summed by one block of the weighted total
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_as_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store_from_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_from_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_from_float(__half* p, float v) { *p = __float2half(v); }

// Merge (max, sum of exp(x - max)) pairs. A pair with max -inf holds only -inf
// values (sum 0) and changes nothing.
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

// Thread 0 ends with the merge of the block's pairs (fixed tree).
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

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Thread 0 ends with the block's sum (fixed tree). Every thread of the block
// must call it.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double shared[kWarps];
  v = warp_sum(v);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < kWarps ? shared[lane] : 0.0);
  return v;
}

// The label's column in this shard, or -1 when it lies outside the shard.
// Compares before subtracting so that no label value can overflow.
__device__ __forceinline__ int64_t local_column(int64_t label, int64_t vocab_start, int64_t vocab) {
  if (label < vocab_start) return -1;
  const int64_t local = label - vocab_start;  // vocab_start >= 0 and label >= vocab_start: no overflow
  return local < vocab ? local : -1;
}

template <typename T>
__global__ void shard_stats_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                   const int64_t* __restrict__ labels, int64_t vocab_start,
                                   float* __restrict__ row_max, float* __restrict__ row_sumexp,
                                   float* __restrict__ row_target) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;  // 64-bit offset
  float m = -INFINITY;
  float s = 0.0f;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float value = load_as_float(x + v);
    if (value > m) {
      s = s * __expf(m - value) + 1.0f;  // m = -inf at first: 0 * 0 + 1
      m = value;
    } else if (value != -INFINITY) {
      // Skipping -inf keeps s = 0 (not exp(-inf - -inf) = NaN) while the
      // thread has seen only -inf; a NaN logit still propagates.
      s += __expf(value - m);
    }
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {
    row_max[row] = m;
    row_sumexp[row] = s;
    const int64_t local = local_column(labels[row], vocab_start, vocab);
    row_target[row] = local >= 0 ? load_as_float(x + local) : 0.0f;
  }
}

// Per token: loss = log(sumexp) + max - target; +inf for a row of only -inf.
__global__ void token_loss_kernel(int64_t tokens, const float* __restrict__ row_max,
                                  const float* __restrict__ row_sumexp, const float* __restrict__ row_target,
                                  float* __restrict__ per_token_loss) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float top = row_max[t];
  per_token_loss[t] = top == -INFINITY ? INFINITY : logf(row_sumexp[t]) + top - row_target[t];
}

// factor * loss in double, exactly 0 where the factor is 0 (so an inf or NaN
// loss of an ignored token cannot reach a sum).
__device__ __forceinline__ double contribution(float factor, float loss) {
  return factor == 0.0f ? 0.0 : static_cast<double>(factor) * static_cast<double>(loss);
}

// Block b sums tokens [b * kTokensPerPartial, (b + 1) * kTokensPerPartial).
__global__ void weighted_partials_kernel(int64_t tokens, const float* __restrict__ per_token_loss,
                                         const float* __restrict__ weights, double* __restrict__ partials) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kTokensPerPartial;
  const int64_t end = begin + kTokensPerPartial < tokens ? begin + kTokensPerPartial : tokens;
  double acc = 0.0;
  for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) acc += contribution(weights[t], per_token_loss[t]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: the partials in a fixed order.
__global__ void sum_partials_kernel(int64_t count, const double* __restrict__ partials, double* __restrict__ total) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *total = acc;
}

// sorted_ids: the ids in stably sorted order. For each in-range id k with
// tokens, [begin[k], end[k]) is its segment of sorted positions; begin and end
// start at 0 (empty). Ids out of [0, num_ids) are skipped. Each position writes
// at most one begin and one end, and no two positions write the same one.
__global__ void segment_bounds_kernel(int64_t tokens, const int64_t* __restrict__ sorted_ids, int64_t num_ids,
                                      int64_t* __restrict__ begin, int64_t* __restrict__ end) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= tokens) return;
  const int64_t id = sorted_ids[p];
  if (id < 0 || id >= num_ids) return;
  if (p == 0 || sorted_ids[p - 1] != id) begin[id] = p;
  if (p == tokens - 1 || sorted_ids[p + 1] != id) end[id] = p + 1;
}

// sums[k] = sum of mask * loss over id k's segment, in a fixed order: lane i
// of the group walks positions begin + i, begin + i + kGroup, ..., then a fixed
// tree. kGroup = 32: a warp per id (many short segments, e.g. samples);
// kGroup = kThreads: a block per id (few long segments, e.g. tasks).
template <int kGroup>
__global__ void segment_sums_kernel(int64_t num_ids, const int64_t* __restrict__ begin,
                                    const int64_t* __restrict__ end, const int64_t* __restrict__ order,
                                    int64_t tokens, const float* __restrict__ per_token_loss,
                                    const float* __restrict__ mask, double* __restrict__ sums) {
  constexpr int kGroupsPerBlock = kThreads / kGroup;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  double acc = 0.0;
  if (id < num_ids) {
    const int64_t b = begin[id];
    const int64_t e = end[id];
    for (int64_t p = b + lane; p < e; p += kGroup) {
      const int64_t t = order[p];
      if (t >= 0 && t < tokens) acc += contribution(mask[t], per_token_loss[t]);
    }
  }
  if constexpr (kGroup == 32) {
    acc = warp_sum(acc);
    if (lane == 0 && id < num_ids) sums[id] = acc;
  } else {
    acc = block_sum(acc);  // the whole block: no early return above
    if (threadIdx.x == 0 && id < num_ids) sums[id] = acc;
  }
}

template <typename T>
__global__ void backward_inplace_kernel(T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                        const int64_t* __restrict__ labels, int64_t vocab_start,
                                        const float* __restrict__ row_max, const float* __restrict__ row_sumexp,
                                        const float* __restrict__ weights, float grad_scale) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * row_stride;  // 64-bit offset
  const float g = weights[row] * grad_scale;
  if (g == 0.0f) {  // ignored token: an exact 0 row, whatever its logits
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) store_from_float(x + v, 0.0f);
    return;
  }
  const float top = row_max[row];
  const float sumexp = row_sumexp[row];
  // A row of only -inf (max -inf, sum-exp 0) has no softmax: p = 0, not NaN.
  const float shift = top == -INFINITY ? 0.0f : top;
  const float inverse = sumexp > 0.0f ? 1.0f / sumexp : 0.0f;
  const int64_t target = local_column(labels[row], vocab_start, vocab);
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float p = __expf(load_as_float(x + v) - shift) * inverse;
    store_from_float(x + v, (p - (v == target ? 1.0f : 0.0f)) * g);
  }
}

template <typename T>
cudaError_t launch_stats(const void* logits, int64_t tokens, int64_t vocab, int64_t row_stride,
                         const int64_t* labels, int64_t vocab_start, float* row_max, float* row_sumexp,
                         float* row_target, cudaStream_t stream) {
  shard_stats_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), vocab, row_stride, labels, vocab_start, row_max, row_sumexp, row_target);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(void* logits, int64_t tokens, int64_t vocab, int64_t row_stride,
                            const int64_t* labels, int64_t vocab_start, const float* row_max,
                            const float* row_sumexp, const float* weights, float grad_scale,
                            cudaStream_t stream) {
  backward_inplace_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<T*>(logits), vocab, row_stride, labels, vocab_start, row_max, row_sumexp, weights, grad_scale);
  return cudaGetLastError();
}

bool valid_rows(int64_t tokens, int64_t vocab, int64_t row_stride, int64_t vocab_start) {
  return tokens >= 0 && tokens <= kMaxGrid && vocab > 0 && row_stride >= vocab && vocab_start >= 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sums of mask * loss per id (sorted ids and their stable-sort order given).
template <int kGroup>
cudaError_t launch_segment_sums(int64_t tokens, const int64_t* sorted_ids, const int64_t* order, int64_t num_ids,
                                const float* per_token_loss, const float* mask, int64_t* bounds, double* sums,
                                cudaStream_t stream) {
  if (num_ids == 0) return cudaSuccess;
  int64_t* begin = bounds;
  int64_t* end = bounds + num_ids;
  cudaError_t status = cudaMemsetAsync(bounds, 0, 2 * num_ids * sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  if (tokens > 0) {
    segment_bounds_kernel<<<static_cast<unsigned>(ceil_div(tokens, kThreads)), kThreads, 0, stream>>>(
        tokens, sorted_ids, num_ids, begin, end);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  constexpr int kGroupsPerBlock = kThreads / kGroup;
  const int64_t blocks = ceil_div(num_ids, kGroupsPerBlock);
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  segment_sums_kernel<kGroup><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      num_ids, begin, end, order, tokens, per_token_loss, mask, sums);
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 = float32, 1 = bfloat16, 2 = float16.
extern "C" cudaError_t megamft_ce_shard_stats(const void* logits, int dtype, int64_t tokens, int64_t vocab,
                                              int64_t row_stride, const int64_t* labels, int64_t vocab_start,
                                              float* row_max, float* row_sumexp, float* row_target,
                                              cudaStream_t stream) {
  if (!valid_rows(tokens, vocab, row_stride, vocab_start)) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (dtype == 0)
    return launch_stats<float>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max, row_sumexp,
                               row_target, stream);
  if (dtype == 1)
    return launch_stats<__nv_bfloat16>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max,
                                       row_sumexp, row_target, stream);
  if (dtype == 2)
    return launch_stats<__half>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max, row_sumexp,
                                row_target, stream);
  return cudaErrorInvalidValue;
}

// Bytes of scratch memory megamft_ce_finalize needs (8-byte aligned start).
extern "C" int64_t megamft_ce_finalize_workspace_bytes(int64_t tokens, int64_t num_tasks, int64_t num_samples) {
  if (tokens < 0 || num_tasks < 0 || num_samples < 0) return -1;
  const int64_t partials = ceil_div(tokens, kTokensPerPartial);
  return static_cast<int64_t>(sizeof(double)) * partials +
         static_cast<int64_t>(sizeof(int64_t)) * 2 * (num_tasks + num_samples);
}

// task_sorted / sample_sorted: the ids stably sorted; task_order / sample_order:
// the token index of each sorted position (the stable sort's permutation).
// Writes per_token_loss [tokens], task_sums [num_tasks], sample_sums
// [num_samples] and *weighted_total, all deterministic (see the top).
extern "C" cudaError_t megamft_ce_finalize(int64_t tokens, const float* row_max, const float* row_sumexp,
                                           const float* row_target, const float* weights, const float* mask,
                                           const int64_t* task_sorted, const int64_t* task_order, int64_t num_tasks,
                                           const int64_t* sample_sorted, const int64_t* sample_order,
                                           int64_t num_samples, float* per_token_loss, double* task_sums,
                                           double* sample_sums, double* weighted_total, void* workspace,
                                           cudaStream_t stream) {
  if (tokens < 0 || num_tasks < 0 || num_samples < 0) return cudaErrorInvalidValue;
  const int64_t partial_count = ceil_div(tokens, kTokensPerPartial);
  if (ceil_div(tokens, kThreads) > kMaxGrid) return cudaErrorInvalidValue;
  double* partials = static_cast<double*>(workspace);
  int64_t* task_bounds = reinterpret_cast<int64_t*>(partials + partial_count);
  int64_t* sample_bounds = task_bounds + 2 * num_tasks;
  cudaError_t status;
  if (tokens > 0) {
    token_loss_kernel<<<static_cast<unsigned>(ceil_div(tokens, kThreads)), kThreads, 0, stream>>>(
        tokens, row_max, row_sumexp, row_target, per_token_loss);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    weighted_partials_kernel<<<static_cast<unsigned>(partial_count), kThreads, 0, stream>>>(
        tokens, per_token_loss, weights, partials);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partial_count, partials, weighted_total);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  status = launch_segment_sums<kThreads>(tokens, task_sorted, task_order, num_tasks, per_token_loss, mask,
                                         task_bounds, task_sums, stream);
  if (status != cudaSuccess) return status;
  return launch_segment_sums<32>(tokens, sample_sorted, sample_order, num_samples, per_token_loss, mask,
                                 sample_bounds, sample_sums, stream);
}

extern "C" cudaError_t megamft_ce_backward_inplace(void* logits, int dtype, int64_t tokens, int64_t vocab,
                                                   int64_t row_stride, const int64_t* labels, int64_t vocab_start,
                                                   const float* row_max, const float* row_sumexp,
                                                   const float* weights, float grad_scale, cudaStream_t stream) {
  if (!valid_rows(tokens, vocab, row_stride, vocab_start)) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (dtype == 0)
    return launch_backward<float>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max, row_sumexp,
                                  weights, grad_scale, stream);
  if (dtype == 1)
    return launch_backward<__nv_bfloat16>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max,
                                          row_sumexp, weights, grad_scale, stream);
  if (dtype == 2)
    return launch_backward<__half>(logits, tokens, vocab, row_stride, labels, vocab_start, row_max, row_sumexp,
                                   weights, grad_scale, stream);
  return cudaErrorInvalidValue;
}
