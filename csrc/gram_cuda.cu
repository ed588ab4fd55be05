// CUDA Gram forward / reduce / backward over a work table (see gram_cuda.h).
//
// Forward, D <= 8 ("small"): every thread keeps all D(D+1)/2 products of its
// elements in registers; one load per gradient per element, so the kernel
// runs at memory speed. D > 8 ("tiled"): the block stages 64 elements of all
// D gradients in shared memory and each thread owns a 4 x 4 block of the
// Gram (4 + 4 shared loads per 16 FMAs); when there are fewer 4 x 4 blocks
// than threads, several threads share one and split the elements.
// Both write one partial Gram per thread block; launch_gram_reduce sums them
// in a fixed order, so results do not depend on scheduling.
#include "gram_cuda.h"

#include <algorithm>

#include "cuda_element.cuh"

namespace nio_fast {
namespace cuda {
namespace {

using detail::block_sum_store;
using detail::element_pointer;
using detail::fma_acc;
using detail::kThreads;
using detail::load_as;
using detail::store_as;

// Grid-stride over rows with at most this many blocks (enough to fill any
// current GPU several times over), and a partial buffer of at most
// kPartialBudget doubles (16 MiB).
constexpr int64_t kMaxBlocks = 4096;
constexpr int64_t kPartialBudget = int64_t(1) << 21;
// Tiled forward: elements staged per step, Gram block per thread.
constexpr int kTileElements = 64;
constexpr int kMicro = 4;

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename Storage, typename Acc, int D>
__global__ void __launch_bounds__(kThreads)
    gram_forward_small_kernel(const int64_t* __restrict__ addresses, const int64_t* __restrict__ rows,
                              int64_t num_rows, double* __restrict__ block_partials) {
  constexpr int kPairs = D * (D + 1) / 2;
  Acc acc[kPairs];
#pragma unroll
  for (int q = 0; q < kPairs; ++q) acc[q] = Acc(0);

  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t p = rows[3 * r];
    const int64_t first = rows[3 * r + 1];
    const int64_t count = rows[3 * r + 2];
    const Storage* base[D];
#pragma unroll
    for (int d = 0; d < D; ++d) base[d] = element_pointer<Storage>(addresses, p * D + d) + first;
#pragma unroll 4
    for (int64_t e = threadIdx.x; e < count; e += kThreads) {
      Acc x[D];
#pragma unroll
      for (int d = 0; d < D; ++d) x[d] = load_as<Acc>(base[d] + e);
      int q = 0;
#pragma unroll
      for (int i = 0; i < D; ++i) {
#pragma unroll
        for (int j = i; j < D; ++j, ++q) acc[q] = fma_acc(x[i], x[j], acc[q]);
      }
    }
  }
  block_sum_store<kPairs>(acc, block_partials + int64_t(blockIdx.x) * kPairs);
}

__host__ __device__ inline int64_t pair_index(int i, int j, int D) {
  // Row-major upper triangle: row i starts after sum_{k<i} (D - k) entries.
  return int64_t(i) * D - int64_t(i) * (i - 1) / 2 + (j - i);
}

template <typename Acc>
struct TiledForwardShared {
  static constexpr int kTileBytes = kTileElements * (kMaxGramDim + 1) * int(sizeof(Acc));
  static constexpr int kReduceBytes = kThreads * kMicro * kMicro * int(sizeof(double));
  static constexpr int kBytes = kTileBytes > kReduceBytes ? kTileBytes : kReduceBytes;
};

template <typename Storage, typename Acc>
__global__ void __launch_bounds__(kThreads)
    gram_forward_tiled_kernel(const int64_t* __restrict__ addresses, const int64_t* __restrict__ rows,
                              int64_t num_rows, int D, double* __restrict__ block_partials) {
  // The staging tile and, at the end, the cross-thread reduction share one buffer.
  __shared__ __align__(16) unsigned char shared_bytes[TiledForwardShared<Acc>::kBytes];
  __shared__ const Storage* row_base[kMaxGramDim];
  auto tile = reinterpret_cast<Acc(*)[kMaxGramDim + 1]>(shared_bytes);  // tile[e][d], padded rows

  const int blocks_per_side = (D + kMicro - 1) / kMicro;
  const int padded_D = blocks_per_side * kMicro;
  const int gram_blocks = blocks_per_side * (blocks_per_side + 1) / 2;
  const int lanes = max(1, kThreads / gram_blocks);  // threads per Gram block
  const int slot = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const bool active = slot < gram_blocks;
  int bi = 0, bj = 0;  // this slot's Gram block (bi <= bj), row-major over the upper triangle
  if (active) {
    int s = slot;
    while (s >= blocks_per_side - bi) {
      s -= blocks_per_side - bi;
      ++bi;
    }
    bj = bi + s;
  }
  const int i0 = bi * kMicro;
  const int j0 = bj * kMicro;

  Acc acc[kMicro][kMicro];
#pragma unroll
  for (int a = 0; a < kMicro; ++a)
#pragma unroll
    for (int b = 0; b < kMicro; ++b) acc[a][b] = Acc(0);

  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t p = rows[3 * r];
    const int64_t first = rows[3 * r + 1];
    const int64_t count = rows[3 * r + 2];
    __syncthreads();  // row_base and tile of the previous row are consumed
    if (threadIdx.x < D) row_base[threadIdx.x] = element_pointer<Storage>(addresses, p * D + threadIdx.x) + first;
    for (int64_t start = 0; start < count; start += kTileElements) {
      const int n = static_cast<int>(min(int64_t(kTileElements), count - start));
      __syncthreads();  // row_base written / previous tile consumed
      for (int idx = threadIdx.x; idx < padded_D * kTileElements; idx += kThreads) {
        const int d = idx / kTileElements;
        const int e = idx % kTileElements;
        tile[e][d] = (d < D && e < n) ? load_as<Acc>(row_base[d] + start + e) : Acc(0);
      }
      __syncthreads();
      if (active) {
        for (int e = lane; e < n; e += lanes) {
          Acc xi[kMicro], xj[kMicro];
#pragma unroll
          for (int a = 0; a < kMicro; ++a) xi[a] = tile[e][i0 + a];
#pragma unroll
          for (int b = 0; b < kMicro; ++b) xj[b] = tile[e][j0 + b];
#pragma unroll
          for (int a = 0; a < kMicro; ++a)
#pragma unroll
            for (int b = 0; b < kMicro; ++b) acc[a][b] = fma_acc(xi[a], xj[b], acc[a][b]);
        }
      }
    }
  }

  // Lanes of one Gram block are consecutive threads: the first sums them in order.
  __syncthreads();
  auto reduce = reinterpret_cast<double(*)[kMicro * kMicro]>(shared_bytes);
#pragma unroll
  for (int a = 0; a < kMicro; ++a)
#pragma unroll
    for (int b = 0; b < kMicro; ++b) reduce[threadIdx.x][a * kMicro + b] = static_cast<double>(acc[a][b]);
  __syncthreads();
  if (active && lane == 0) {
    double* partial = block_partials + int64_t(blockIdx.x) * (int64_t(D) * (D + 1) / 2);
    for (int a = 0; a < kMicro; ++a) {
      for (int b = 0; b < kMicro; ++b) {
        const int i = i0 + a;
        const int j = j0 + b;
        if (i >= D || j >= D || i > j) continue;
        double total = 0.0;
        for (int l = 0; l < lanes; ++l) total += reduce[threadIdx.x + l][a * kMicro + b];
        partial[pair_index(i, j, D)] = total;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    gram_reduce_kernel(const double* __restrict__ partials, int64_t num_partials, int D, double* __restrict__ gram) {
  __shared__ double sums[kThreads];
  const int64_t pairs = int64_t(D) * (D + 1) / 2;
  const int pair = blockIdx.x;
  double sum = 0.0;
  for (int64_t b = threadIdx.x; b < num_partials; b += kThreads) sum += partials[b * pairs + pair];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int i = 0;
    int rest = pair;
    while (rest >= D - i) {
      rest -= D - i;
      ++i;
    }
    const int j = i + rest;
    gram[i * D + j] = sums[0];
    gram[j * D + i] = sums[0];
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename Storage, typename Acc, int D>
__global__ void __launch_bounds__(kThreads)
    gram_backward_small_kernel(const int64_t* __restrict__ in_addresses, const int64_t* __restrict__ out_addresses,
                               const int64_t* __restrict__ rows, int64_t num_rows, const double* __restrict__ S) {
  __shared__ Acc s[D * D];
  for (int k = threadIdx.x; k < D * D; k += kThreads) s[k] = static_cast<Acc>(S[k]);
  __syncthreads();
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t p = rows[3 * r];
    const int64_t first = rows[3 * r + 1];
    const int64_t count = rows[3 * r + 2];
    const Storage* in[D];
    Storage* out[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      in[d] = element_pointer<Storage>(in_addresses, p * D + d) + first;
      out[d] = const_cast<Storage*>(element_pointer<Storage>(out_addresses, p * D + d)) + first;
    }
#pragma unroll 2
    for (int64_t e = threadIdx.x; e < count; e += kThreads) {
      Acc x[D];
#pragma unroll
      for (int j = 0; j < D; ++j) x[j] = load_as<Acc>(in[j] + e);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        Acc y = Acc(0);
#pragma unroll
        for (int j = 0; j < D; ++j) y = fma_acc(s[d * D + j], x[j], y);
        store_as(out[d] + e, y);
      }
    }
  }
}

// D > 8: stage kTile elements of all D inputs, then thread (element e, group g)
// computes outputs in blocks of 8 rows of S, reading S transposed so the 8
// coefficients of one input are adjacent (warp-uniform, broadcast loads).
constexpr int kOutBlock = 8;

template <typename Acc>
struct BackwardTile {
  // float: 64 x 64 inputs + 64 x 64 S = 32 KiB; double: 16 x 64 + 64 x 64 = 40 KiB (static limit 48 KiB).
  static constexpr int kElements = sizeof(Acc) == 4 ? 64 : 16;
};

template <typename Storage, typename Acc>
__global__ void __launch_bounds__(kThreads)
    gram_backward_tiled_kernel(const int64_t* __restrict__ in_addresses, const int64_t* __restrict__ out_addresses,
                               const int64_t* __restrict__ rows, int64_t num_rows, int D,
                               const double* __restrict__ S) {
  constexpr int kTile = BackwardTile<Acc>::kElements;
  constexpr int kGroups = kThreads / kTile;
  __shared__ Acc s_t[kMaxGramDim][kMaxGramDim];  // s_t[j][d] = S[d][j]
  __shared__ Acc tile[kMaxGramDim][kTile];      // tile[j][e]
  __shared__ const Storage* in_base[kMaxGramDim];
  __shared__ Storage* out_base[kMaxGramDim];

  for (int k = threadIdx.x; k < D * D; k += kThreads) s_t[k % D][k / D] = static_cast<Acc>(S[k]);
  const int e = threadIdx.x % kTile;
  const int group = threadIdx.x / kTile;
  const int out_blocks = (D + kOutBlock - 1) / kOutBlock;

  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t p = rows[3 * r];
    const int64_t first = rows[3 * r + 1];
    const int64_t count = rows[3 * r + 2];
    __syncthreads();  // previous row consumed (and s_t written)
    if (threadIdx.x < D) {
      in_base[threadIdx.x] = element_pointer<Storage>(in_addresses, p * D + threadIdx.x) + first;
      out_base[threadIdx.x] = const_cast<Storage*>(element_pointer<Storage>(out_addresses, p * D + threadIdx.x)) + first;
    }
    for (int64_t start = 0; start < count; start += kTile) {
      const int n = static_cast<int>(min(int64_t(kTile), count - start));
      __syncthreads();  // bases written / previous tile consumed
      for (int idx = threadIdx.x; idx < D * kTile; idx += kThreads) {
        const int j = idx / kTile;
        const int k = idx % kTile;
        tile[j][k] = k < n ? load_as<Acc>(in_base[j] + start + k) : Acc(0);
      }
      __syncthreads();
      if (e < n) {
        for (int block = group; block < out_blocks; block += kGroups) {
          const int d0 = block * kOutBlock;
          Acc y[kOutBlock];
#pragma unroll
          for (int o = 0; o < kOutBlock; ++o) y[o] = Acc(0);
          for (int j = 0; j < D; ++j) {
            const Acc x = tile[j][e];
#pragma unroll
            for (int o = 0; o < kOutBlock; ++o) {
              // Columns d >= D of s_t are never written; those outputs are dropped below.
              y[o] = fma_acc(s_t[j][min(d0 + o, kMaxGramDim - 1)], x, y[o]);
            }
          }
#pragma unroll
          for (int o = 0; o < kOutBlock; ++o) {
            if (d0 + o < D) store_as(out_base[d0 + o] + start + e, y[o]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

template <typename Storage, typename Acc>
cudaError_t launch_forward_typed(const int64_t* addresses, const int64_t* rows, int64_t num_rows, int D,
                                 double* partials, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(gram_forward_num_blocks(num_rows, D)));
  switch (D) {
#define NIO_FAST_SMALL_FORWARD(DIM)                                                                   \
  case DIM:                                                                                           \
    gram_forward_small_kernel<Storage, Acc, DIM><<<grid, kThreads, 0, stream>>>(addresses, rows, num_rows, \
                                                                                 partials);           \
    break;
    NIO_FAST_SMALL_FORWARD(1)
    NIO_FAST_SMALL_FORWARD(2)
    NIO_FAST_SMALL_FORWARD(3)
    NIO_FAST_SMALL_FORWARD(4)
    NIO_FAST_SMALL_FORWARD(5)
    NIO_FAST_SMALL_FORWARD(6)
    NIO_FAST_SMALL_FORWARD(7)
    NIO_FAST_SMALL_FORWARD(8)
#undef NIO_FAST_SMALL_FORWARD
    default:
      gram_forward_tiled_kernel<Storage, Acc><<<grid, kThreads, 0, stream>>>(addresses, rows, num_rows, D, partials);
  }
  return cudaGetLastError();
}

template <typename Storage, typename Acc>
cudaError_t launch_backward_typed(const int64_t* in_addresses, const int64_t* out_addresses, const int64_t* rows,
                                  int64_t num_rows, int D, const double* S, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(std::min(num_rows, kMaxBlocks)));
  switch (D) {
#define NIO_FAST_SMALL_BACKWARD(DIM)                                                                  \
  case DIM:                                                                                           \
    gram_backward_small_kernel<Storage, Acc, DIM><<<grid, kThreads, 0, stream>>>(in_addresses, out_addresses, \
                                                                                  rows, num_rows, S); \
    break;
    NIO_FAST_SMALL_BACKWARD(1)
    NIO_FAST_SMALL_BACKWARD(2)
    NIO_FAST_SMALL_BACKWARD(3)
    NIO_FAST_SMALL_BACKWARD(4)
    NIO_FAST_SMALL_BACKWARD(5)
    NIO_FAST_SMALL_BACKWARD(6)
    NIO_FAST_SMALL_BACKWARD(7)
    NIO_FAST_SMALL_BACKWARD(8)
#undef NIO_FAST_SMALL_BACKWARD
    default:
      gram_backward_tiled_kernel<Storage, Acc>
          <<<grid, kThreads, 0, stream>>>(in_addresses, out_addresses, rows, num_rows, D, S);
  }
  return cudaGetLastError();
}

bool valid_dim(int D) { return D >= 1 && D <= kMaxGramDim; }

}  // namespace

int64_t gram_forward_num_blocks(int64_t num_rows, int D) {
  const int64_t by_memory = std::max<int64_t>(1, kPartialBudget / gram_pair_count(D));
  return std::min({num_rows, kMaxBlocks, by_memory});
}

cudaError_t launch_gram_forward(const int64_t* addresses, const int64_t* rows, int64_t num_rows, int D,
                                DtypeCode dtype, double* block_partials, cudaStream_t stream) {
  if (!valid_dim(D)) return cudaErrorInvalidValue;
  if (num_rows <= 0) return cudaSuccess;
  switch (dtype) {
    case DtypeCode::kFloat32:
      return launch_forward_typed<float, float>(addresses, rows, num_rows, D, block_partials, stream);
    case DtypeCode::kFloat16:
      return launch_forward_typed<__half, float>(addresses, rows, num_rows, D, block_partials, stream);
    case DtypeCode::kBFloat16:
      return launch_forward_typed<__nv_bfloat16, float>(addresses, rows, num_rows, D, block_partials, stream);
    case DtypeCode::kFloat64:
      return launch_forward_typed<double, double>(addresses, rows, num_rows, D, block_partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gram_reduce(const double* partials, int64_t num_partials, int D, double* gram,
                               cudaStream_t stream) {
  if (!valid_dim(D)) return cudaErrorInvalidValue;
  gram_reduce_kernel<<<static_cast<unsigned>(gram_pair_count(D)), kThreads, 0, stream>>>(partials, num_partials, D,
                                                                                        gram);
  return cudaGetLastError();
}

cudaError_t launch_gram_backward(const int64_t* in_addresses, const int64_t* out_addresses, const int64_t* rows,
                                 int64_t num_rows, int D, DtypeCode dtype, const double* S, cudaStream_t stream) {
  if (!valid_dim(D)) return cudaErrorInvalidValue;
  if (num_rows <= 0) return cudaSuccess;
  switch (dtype) {
    case DtypeCode::kFloat32:
      return launch_backward_typed<float, float>(in_addresses, out_addresses, rows, num_rows, D, S, stream);
    case DtypeCode::kFloat16:
      return launch_backward_typed<__half, float>(in_addresses, out_addresses, rows, num_rows, D, S, stream);
    case DtypeCode::kBFloat16:
      return launch_backward_typed<__nv_bfloat16, float>(in_addresses, out_addresses, rows, num_rows, D, S, stream);
    case DtypeCode::kFloat64:
      return launch_backward_typed<double, double>(in_addresses, out_addresses, rows, num_rows, D, S, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace nio_fast
