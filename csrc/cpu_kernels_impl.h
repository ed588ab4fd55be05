// Kernel bodies shared by the CPU kernel variants. Deliberately no include
// guard and no #include: each cpu_kernels_<variant>.cpp includes this file
// inside its own namespace (and, for AVX2, inside a target pragma) after
// defining
//   NIO_VEC_BYTES              vector register width in bytes (16 or 32)
//   NIO_FMA_F32(acc, a, b)     acc + a * b on VecF32
//   NIO_FMA_F64(acc, a, b)     acc + a * b on VecF64
//   NIO_SMALL_GRAM_MAX_DIM     largest D (<= 8) for the all-pairs Gram kernel
//   NIO_GRAM_TILE_I, NIO_GRAM_TILE_J          register tile of the Gram kernel
//   NIO_COMBINE_TILE_OUT, NIO_COMBINE_TILE_VECS  register tile of the backward kernel
// Everything lives in an anonymous namespace so that the two compilations
// never share a symbol (an AVX2-compiled copy must not replace a baseline one).
// Only compiler builtins are used below for the same reason.

namespace {

typedef float VecF32 __attribute__((vector_size(NIO_VEC_BYTES)));
typedef double VecF64 __attribute__((vector_size(NIO_VEC_BYTES)));

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef VecF32 Vec;
  static constexpr int kLanes = NIO_VEC_BYTES / 4;
  static inline Vec load(const float* p) {
    Vec v;
    __builtin_memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(Vec)); }
  static inline Vec splat(float s) { return Vec{} + s; }
  static inline Vec fma(Vec acc, Vec a, Vec b) { return NIO_FMA_F32(acc, a, b); }
};

template <>
struct Simd<double> {
  typedef VecF64 Vec;
  static constexpr int kLanes = NIO_VEC_BYTES / 8;
  static inline Vec load(const double* p) {
    Vec v;
    __builtin_memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static inline void store(double* p, Vec v) { __builtin_memcpy(p, &v, sizeof(Vec)); }
  static inline Vec splat(double s) { return Vec{} + s; }
  static inline Vec fma(Vec acc, Vec a, Vec b) { return NIO_FMA_F64(acc, a, b); }
};

inline int min_int(int a, int b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------
// Gram accumulation.
//
// Small D (<= NIO_SMALL_GRAM_MAX_DIM): every pair i <= j lives in its own vector accumulator; one
// pass loads D vectors per step and does D(D+1)/2 FMAs. Accumulator layout:
// acc[pair][lane], pairs in row-major upper-triangle order.
//
// Larger D: register tiles of TI x TJ rows. Each tile streams its TI + TJ rows
// once per call, so the caller keeps D * n elements cache-resident. Rows past
// D are clamped to row D - 1 (their products are computed and ignored),
// which keeps the inner loop free of edge cases. Layout: acc[tile][a][b][lane]
// over the tiles that touch the upper triangle, in (it, jt) order.
// ---------------------------------------------------------------------------

constexpr int kSmallGramMaxDim = NIO_SMALL_GRAM_MAX_DIM;
static_assert(kSmallGramMaxDim >= 1 && kSmallGramMaxDim <= 8, "gram_accumulate dispatches D <= 8");
constexpr int kTileI = NIO_GRAM_TILE_I;
constexpr int kTileJ = NIO_GRAM_TILE_J;

inline bool gram_tile_is_used(int it, int jt) {
  // Some column j of the tile reaches some row i of it (j >= i).
  return jt * kTileJ + kTileJ - 1 >= it * kTileI;
}

inline int64_t gram_tile_count(int D) {
  const int tiles_i = (D + kTileI - 1) / kTileI;
  const int tiles_j = (D + kTileJ - 1) / kTileJ;
  int64_t count = 0;
  for (int it = 0; it < tiles_i; ++it)
    for (int jt = 0; jt < tiles_j; ++jt) count += gram_tile_is_used(it, jt) ? 1 : 0;
  return count;
}

template <typename T>
int64_t gram_acc_size(int D) {
  const int64_t lanes = Simd<T>::kLanes;
  if (D <= kSmallGramMaxDim) return int64_t(D) * (D + 1) / 2 * lanes;
  return gram_tile_count(D) * kTileI * kTileJ * lanes;
}

template <typename T, int D>
void gram_accumulate_small(const T* const* rows, int64_t n, T* acc) {
  typedef Simd<T> S;
  typedef typename S::Vec Vec;
  constexpr int L = S::kLanes;
  constexpr int kPairs = D * (D + 1) / 2;
  const T* r[D];
  for (int d = 0; d < D; ++d) r[d] = rows[d];
  Vec sums[kPairs];
  for (int q = 0; q < kPairs; ++q) sums[q] = S::load(acc + q * L);
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    Vec x[D];
    for (int d = 0; d < D; ++d) x[d] = S::load(r[d] + k);
    int q = 0;
    for (int i = 0; i < D; ++i)
      for (int j = i; j < D; ++j, ++q) sums[q] = S::fma(sums[q], x[i], x[j]);
  }
  for (int q = 0; q < kPairs; ++q) S::store(acc + q * L, sums[q]);
  for (; k < n; ++k) {
    int q = 0;
    for (int i = 0; i < D; ++i)
      for (int j = i; j < D; ++j, ++q) acc[q * L] += r[i][k] * r[j][k];
  }
}

template <typename T>
void gram_accumulate_tiled(const T* const* rows, int D, int64_t n, T* acc) {
  typedef Simd<T> S;
  typedef typename S::Vec Vec;
  constexpr int L = S::kLanes;
  const int tiles_i = (D + kTileI - 1) / kTileI;
  const int tiles_j = (D + kTileJ - 1) / kTileJ;
  T* tile_acc = acc;
  for (int it = 0; it < tiles_i; ++it) {
    const T* ri[kTileI];
    for (int a = 0; a < kTileI; ++a) ri[a] = rows[min_int(it * kTileI + a, D - 1)];
    for (int jt = 0; jt < tiles_j; ++jt) {
      if (!gram_tile_is_used(it, jt)) continue;
      const T* rj[kTileJ];
      for (int b = 0; b < kTileJ; ++b) rj[b] = rows[min_int(jt * kTileJ + b, D - 1)];
      Vec c[kTileI][kTileJ];
      for (int a = 0; a < kTileI; ++a)
        for (int b = 0; b < kTileJ; ++b) c[a][b] = S::load(tile_acc + (a * kTileJ + b) * L);
      int64_t k = 0;
      for (; k + L <= n; k += L) {
        Vec xj[kTileJ];
        for (int b = 0; b < kTileJ; ++b) xj[b] = S::load(rj[b] + k);
        for (int a = 0; a < kTileI; ++a) {
          const Vec xi = S::load(ri[a] + k);
          for (int b = 0; b < kTileJ; ++b) c[a][b] = S::fma(c[a][b], xi, xj[b]);
        }
      }
      for (int a = 0; a < kTileI; ++a)
        for (int b = 0; b < kTileJ; ++b) S::store(tile_acc + (a * kTileJ + b) * L, c[a][b]);
      for (; k < n; ++k)
        for (int a = 0; a < kTileI; ++a)
          for (int b = 0; b < kTileJ; ++b) tile_acc[(a * kTileJ + b) * L] += ri[a][k] * rj[b][k];
      tile_acc += kTileI * kTileJ * L;
    }
  }
}

template <typename T>
void gram_accumulate(const T* const* rows, int D, int64_t n, T* acc) {
  if (D <= kSmallGramMaxDim) {
    switch (D) {
      case 1: return gram_accumulate_small<T, 1>(rows, n, acc);
      case 2: return gram_accumulate_small<T, 2>(rows, n, acc);
      case 3: return gram_accumulate_small<T, 3>(rows, n, acc);
      case 4: return gram_accumulate_small<T, 4>(rows, n, acc);
      case 5: return gram_accumulate_small<T, 5>(rows, n, acc);
      case 6: return gram_accumulate_small<T, 6>(rows, n, acc);
      case 7: return gram_accumulate_small<T, 7>(rows, n, acc);
      case 8: return gram_accumulate_small<T, 8>(rows, n, acc);
    }
  }
  gram_accumulate_tiled<T>(rows, D, n, acc);
}

template <typename T>
inline double lane_sum_and_clear(T* lanes) {
  double sum = 0.0;
  for (int l = 0; l < Simd<T>::kLanes; ++l) {
    sum += double(lanes[l]);
    lanes[l] = T(0);
  }
  return sum;
}

template <typename T>
void gram_flush(T* acc, int D, double* gram) {
  constexpr int L = Simd<T>::kLanes;
  if (D <= kSmallGramMaxDim) {
    int q = 0;
    for (int i = 0; i < D; ++i)
      for (int j = i; j < D; ++j, ++q) gram[i * D + j] += lane_sum_and_clear(acc + q * L);
    return;
  }
  const int tiles_i = (D + kTileI - 1) / kTileI;
  const int tiles_j = (D + kTileJ - 1) / kTileJ;
  T* tile_acc = acc;
  for (int it = 0; it < tiles_i; ++it) {
    for (int jt = 0; jt < tiles_j; ++jt) {
      if (!gram_tile_is_used(it, jt)) continue;
      for (int a = 0; a < kTileI; ++a) {
        for (int b = 0; b < kTileJ; ++b) {
          const int i = it * kTileI + a;
          const int j = jt * kTileJ + b;
          T* lanes = tile_acc + (a * kTileJ + b) * L;
          const double sum = lane_sum_and_clear(lanes);
          if (i < D && j < D && i <= j) gram[i * D + j] += sum;
        }
      }
      tile_acc += kTileI * kTileJ * L;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward combination out[d] = sum_j S[d, j] * in[j].
// Small D: all outputs of one vector step at once. Larger D: a tile of
// TO outputs x VB vectors of elements, sweeping j; S entries are broadcast.
// ---------------------------------------------------------------------------

constexpr int kSmallCombineMaxDim = 4;
constexpr int kCombineTileOut = NIO_COMBINE_TILE_OUT;
constexpr int kCombineTileVecs = NIO_COMBINE_TILE_VECS;

template <typename T, int D>
void combine_small(const T* const* in, int64_t n, const T* S_matrix, T* const* out) {
  typedef Simd<T> S;
  typedef typename S::Vec Vec;
  constexpr int L = S::kLanes;
  const T* r[D];
  T* w[D];
  for (int d = 0; d < D; ++d) {
    r[d] = in[d];
    w[d] = out[d];
  }
  Vec s[D][D];
  for (int d = 0; d < D; ++d)
    for (int j = 0; j < D; ++j) s[d][j] = S::splat(S_matrix[d * D + j]);
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    Vec x[D];
    for (int j = 0; j < D; ++j) x[j] = S::load(r[j] + k);
    for (int d = 0; d < D; ++d) {
      Vec y = x[0] * s[d][0];
      for (int j = 1; j < D; ++j) y = S::fma(y, x[j], s[d][j]);
      S::store(w[d] + k, y);
    }
  }
  for (; k < n; ++k) {
    for (int d = 0; d < D; ++d) {
      T y = r[0][k] * S_matrix[d * D];
      for (int j = 1; j < D; ++j) y += r[j][k] * S_matrix[d * D + j];
      w[d][k] = y;
    }
  }
}

template <typename T>
void combine_tiled(const T* const* in, int D, int64_t n, const T* S_matrix, T* const* out) {
  typedef Simd<T> S;
  typedef typename S::Vec Vec;
  constexpr int L = S::kLanes;
  constexpr int TO = kCombineTileOut;
  constexpr int VB = kCombineTileVecs;
  // Output tiles outside: each sweeps the whole D x n input block, which the
  // caller keeps small enough to stay in L1 (see gram_cpu.cpp).
  for (int d0 = 0; d0 < D; d0 += TO) {
    const T* s_row[TO];
    for (int o = 0; o < TO; ++o) s_row[o] = S_matrix + int64_t(min_int(d0 + o, D - 1)) * D;
    const int outputs = min_int(TO, D - d0);
    int64_t k = 0;
    for (; k + VB * L <= n; k += VB * L) {
      Vec y[TO][VB];
      for (int o = 0; o < TO; ++o)
        for (int v = 0; v < VB; ++v) y[o][v] = Vec{};
      for (int j = 0; j < D; ++j) {
        Vec x[VB];
        for (int v = 0; v < VB; ++v) x[v] = S::load(in[j] + k + v * L);
        for (int o = 0; o < TO; ++o) {
          const Vec s = S::splat(s_row[o][j]);
          for (int v = 0; v < VB; ++v) y[o][v] = S::fma(y[o][v], x[v], s);
        }
      }
      for (int o = 0; o < outputs; ++o)
        for (int v = 0; v < VB; ++v) S::store(out[d0 + o] + k + v * L, y[o][v]);
    }
    for (; k < n; ++k) {
      for (int o = 0; o < outputs; ++o) {
        T y = T(0);
        for (int j = 0; j < D; ++j) y += in[j][k] * s_row[o][j];
        out[d0 + o][k] = y;
      }
    }
  }
}

template <typename T>
void combine(const T* const* in, int D, int64_t n, const T* S_matrix, T* const* out) {
  switch (D) {
    case 1: return combine_small<T, 1>(in, n, S_matrix, out);
    case 2: return combine_small<T, 2>(in, n, S_matrix, out);
    case 3: return combine_small<T, 3>(in, n, S_matrix, out);
    case 4: return combine_small<T, 4>(in, n, S_matrix, out);
    default: return combine_tiled<T>(in, D, n, S_matrix, out);
  }
}

// ---------------------------------------------------------------------------
// Dot product with four independent accumulators (hides FMA latency).
// ---------------------------------------------------------------------------

template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  typedef Simd<T> S;
  typedef typename S::Vec Vec;
  constexpr int L = S::kLanes;
  Vec s0 = Vec{}, s1 = Vec{}, s2 = Vec{}, s3 = Vec{};
  int64_t k = 0;
  for (; k + 4 * L <= n; k += 4 * L) {
    s0 = S::fma(s0, S::load(a + k), S::load(b + k));
    s1 = S::fma(s1, S::load(a + k + L), S::load(b + k + L));
    s2 = S::fma(s2, S::load(a + k + 2 * L), S::load(b + k + 2 * L));
    s3 = S::fma(s3, S::load(a + k + 3 * L), S::load(b + k + 3 * L));
  }
  for (; k + L <= n; k += L) s0 = S::fma(s0, S::load(a + k), S::load(b + k));
  const Vec total = (s0 + s1) + (s2 + s3);
  double sum = 0.0;
  for (int l = 0; l < L; ++l) sum += double(total[l]);
  for (; k < n; ++k) sum += double(a[k] * b[k]);
  return sum;
}

// ---------------------------------------------------------------------------
// bfloat16 <-> float: bfloat16 is the upper half of a float; rounding is to
// nearest even, NaN stays a quiet NaN.
// ---------------------------------------------------------------------------

void bfloat16_to_float_impl(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = uint32_t(src[k]) << 16;
    __builtin_memcpy(dst + k, &bits, sizeof(bits));
  }
}

void float_to_bfloat16_impl(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    __builtin_memcpy(&bits, src + k, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[k] = src[k] != src[k] ? uint16_t(0x7fc0) : uint16_t(rounded);
  }
}

// Non-template entry points whose addresses go into the KernelTable.
int64_t gram_acc_size_f32(int D) { return gram_acc_size<float>(D); }
int64_t gram_acc_size_f64(int D) { return gram_acc_size<double>(D); }
void gram_accumulate_f32(const float* const* rows, int D, int64_t n, float* acc) {
  gram_accumulate<float>(rows, D, n, acc);
}
void gram_accumulate_f64(const double* const* rows, int D, int64_t n, double* acc) {
  gram_accumulate<double>(rows, D, n, acc);
}
void gram_flush_f32(float* acc, int D, double* gram) { gram_flush<float>(acc, D, gram); }
void gram_flush_f64(double* acc, int D, double* gram) { gram_flush<double>(acc, D, gram); }
void combine_f32(const float* const* in, int D, int64_t n, const float* S, float* const* out) {
  combine<float>(in, D, n, S, out);
}
void combine_f64(const double* const* in, int D, int64_t n, const double* S, double* const* out) {
  combine<double>(in, D, n, S, out);
}
double dot_f32(const float* a, const float* b, int64_t n) { return dot<float>(a, b, n); }
double dot_f64(const double* a, const double* b, int64_t n) { return dot<double>(a, b, n); }

}  // namespace
