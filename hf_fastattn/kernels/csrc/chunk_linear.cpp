// Chunked causal products for linear attention on the CPU, float32, AVX-512:
//
//     out_i = sum_{j <= i} (a_i . b_j) c_j          (j >= i when `reverse`)
//
// with a state S = sum_j b_j c_j^T carried from chunk to chunk (and optionally z = sum_j b_j for the denominators
// den_i = sum_{j <= i} a_i . b_j, and out_i / den_i). The same arithmetic as the torch path of
// `ops/linear_cpu._chunk_products`, which runs it as batched matmuls over (heads x chunks): there every product is a
// separate pass over N-sized (or segment-sized) temporaries, and at N = 16K the operator reached about 30 GFLOP/s
// where the CPU's sdpa kernel reaches 100+. Here one thread takes one (batch, head) row at a time and walks its chunks
// of 64 tokens with everything of a chunk in L1/L2: the chunk's weights W = a b^T (only the blocks on or below the
// diagonal), the outputs W c + a S accumulated in registers, then S += b^T c. The products are 4-row x 64-column
// register tiles (16 accumulators, a broadcast of a's element times four 16-lane rows of the right operand).
//
// `map` applies elu(x) + 1 to a and b as a chunk is loaded (the feature map of Katharopoulos et al.), `map_c` to c:
// no mapped copy of q and k is ever written to memory. `dx` multiplies the output by elu's derivative at dx (the
// backward of the map). exp is computed as 2^n * p(f) with n = round(x log2 e) (vscalefps) and
// a degree-7 polynomial on [-1/2, 1/2] (relative error below 1e-7).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kC = 64;  // tokens per chunk
constexpr int64_t kR = 4;   // rows per register tile
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (elu's negative part): 2^round(x) * 2^f, f in [-1/2, 1/2], 2^f = e^(f ln 2) by its Taylor series
inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// elu(x) + 1 = x + 1 for x > 0, e^x otherwise
inline __m512 elu_plus_one(__m512 x) {
  const __m512 neg = exp2_neg(_mm512_mul_ps(_mm512_min_ps(x, _mm512_setzero_ps()), _mm512_set1_ps(kLog2e)));
  return _mm512_add_ps(neg, _mm512_max_ps(x, _mm512_setzero_ps()));
}

// copy `rows` rows of width `width` (a multiple of 16) from src (row stride `width`) to dst (row stride `stride`
// >= width), mapped or not, zero the columns after `width` and the rows after `rows` up to kC
inline void load_rows(const float* src, int64_t rows, int64_t width, bool map, float* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t f = 0; f < width; f += 16) {
      const __m512 x = _mm512_loadu_ps(src + r * width + f);
      _mm512_storeu_ps(dst + r * stride + f, map ? elu_plus_one(x) : x);
    }
    std::fill(dst + r * stride + width, dst + (r + 1) * stride, 0.f);
  }
  std::fill(dst + rows * stride, dst + kC * stride, 0.f);
}

// dst[f, j] = src[j, f] for a 16 x 16 block (row strides lds, ldd): 32-bit, then 64-bit unpacks within 128-bit
// lanes, then 128-bit lane shuffles (a quarter of the instructions of an element-by-element copy)
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {  // t[2i] lane L: r[2i][4L], r[2i+1][4L], r[2i][4L+1], r[2i+1][4L+1]
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c] lane L: rows 4g..4g+3 at column 4L + c
    const __m512d t0 = _mm512_castps_pd(t[4 * g]), t1 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * g + 2]), t3 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 x1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 y0 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// acc[r][v] += sum_{k0 <= k < k1} A[r, k] B[k, 16 v .. 16 v + 15] for r < kR, v < NV. The accumulators are copied
// into locals for the loop: kept in the caller's array (passed by reference) gcc stores all of them every iteration.
template <int NV>
inline void tile(__m512 (&acc)[kR][4], const float* A, int64_t lda, const float* B, int64_t ldb, int64_t k0,
                 int64_t k1) {
  __m512 c[kR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = acc[r][v];
  for (int64_t k = k0; k < k1; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = c[r][v];
}

inline void tile_n(int nv, __m512 (&acc)[kR][4], const float* A, int64_t lda, const float* B, int64_t ldb,
                   int64_t k0, int64_t k1) {
  switch (nv) {
    case 1: tile<1>(acc, A, lda, B, ldb, k0, k1); break;
    case 2: tile<2>(acc, A, lda, B, ldb, k0, k1); break;
    case 3: tile<3>(acc, A, lda, B, ldb, k0, k1); break;
    default: tile<4>(acc, A, lda, B, ldb, k0, k1); break;
  }
}

inline void zero(__m512 (&acc)[kR][4]) {
  for (auto& row : acc)
    for (auto& x : row) x = _mm512_setzero_ps();
}

struct Problem {
  int64_t n, f, fk, e;  // fk: the width of the products, f + 16 with the row terms ra / rb
  bool reverse, ones, normalize, map, map_c;
  float eps;
};

// one (batch, head) row: a, b [n, f], c [n, e], ra, rb [n] or null, out [n, e], den [n] (with ones), S [fk, e] and
// z [fk] in and out. With ra / rb the weights are a_i . b_j + ra_i + rb_j: a's rows get the columns [ra_i, 1] and
// b's rows [1, rb_j] after their f features (in the chunk's copies only), so the same products carry them.
void run_row(const Problem& p, const float* a, const float* b, const float* c, const float* ra, const float* rb,
             const float* dx, float* out, float* den, float* S, float* z) {
  const int64_t F = p.fk, E = p.e;
  std::vector<float> qa(kC * F), kb(kC * F), kt(F * kC), vc(kC * E), w(kC * kC), rowden(kC);
  const int64_t nc = (p.n + kC - 1) / kC;
  for (int64_t t = 0; t < nc; ++t) {
    const int64_t ch = p.reverse ? nc - 1 - t : t;
    const int64_t i0 = ch * kC, len = std::min(kC, p.n - i0);
    load_rows(a + i0 * p.f, len, p.f, p.map, qa.data(), F);
    load_rows(b + i0 * p.f, len, p.f, p.map, kb.data(), F);
    load_rows(c + i0 * E, len, E, p.map_c, vc.data(), E);
    if (F > p.f)
      for (int64_t j = 0; j < len; ++j) {
        qa[j * F + p.f] = ra ? ra[i0 + j] : 0.f;
        qa[j * F + p.f + 1] = rb ? 1.f : 0.f;
        kb[j * F + p.f] = ra ? 1.f : 0.f;
        kb[j * F + p.f + 1] = rb ? rb[i0 + j] : 0.f;
      }
    for (int64_t j = 0; j < kC; j += 16)
      for (int64_t f = 0; f < F; f += 16) transpose16(kb.data() + j * F + f, F, kt.data() + f * kC + j, kC);
    for (int64_t r0 = 0; r0 < len; r0 += kR) {
      // W rows r0..r0+3 over the 16-column blocks that hold allowed pairs (j <= i, or j >= i when reverse)
      const int64_t v0 = p.reverse ? r0 / 16 : 0, v1 = p.reverse ? kC / 16 - 1 : r0 / 16;
      __m512 acc[kR][4];
      zero(acc);
      tile_n(int(v1 - v0 + 1), acc, qa.data() + r0 * F, F, kt.data() + 16 * v0, kC, 0, F);
      for (int64_t r = 0; r < kR; ++r) {
        const int64_t i = r0 + r, lane = i % 16;
        float sum = 0.f;
        for (int64_t v = v0; v <= v1; ++v) {
          __m512 x = acc[r][v - v0];
          if (v == i / 16) {  // the diagonal block: keep lanes <= i (>= i when reverse)
            const __mmask16 keep = p.reverse ? __mmask16(0xFFFFu << lane) : __mmask16((2u << lane) - 1u);
            x = _mm512_maskz_mov_ps(keep, x);
          }
          _mm512_storeu_ps(w.data() + i * kC + 16 * v, x);
          if (p.ones) sum += _mm512_reduce_add_ps(x);
        }
        rowden[r] = sum;
      }
      if (p.ones) {
        for (int64_t r = 0; r < kR; ++r) {
          __m512 d = _mm512_setzero_ps();
          for (int64_t f = 0; f < F; f += 16)
            d = _mm512_fmadd_ps(_mm512_loadu_ps(qa.data() + (r0 + r) * F + f), _mm512_loadu_ps(z + f), d);
          rowden[r] += _mm512_reduce_add_ps(d);
        }
      }
      // outputs: W c over the allowed keys of the chunk, plus a . S (the chunks before)
      const int64_t k0 = p.reverse ? r0 : 0, k1 = p.reverse ? kC : std::min(kC, r0 + kR);
      const int64_t rows = std::min(kR, len - r0);
      for (int64_t e0 = 0; e0 < E; e0 += 64) {
        const int nv = int(std::min<int64_t>(4, (E - e0) / 16));
        zero(acc);
        tile_n(nv, acc, w.data() + r0 * kC, kC, vc.data() + e0, E, k0, k1);
        tile_n(nv, acc, qa.data() + r0 * F, F, S + e0, E, 0, F);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = out + (i0 + r0 + r) * E + e0;
          const __m512 scale = _mm512_set1_ps(p.normalize ? 1.f / std::max(rowden[r], p.eps) : 1.f);
          for (int v = 0; v < nv; ++v) {
            __m512 x = _mm512_mul_ps(acc[r][v], scale);
            if (dx != nullptr) {  // times elu's derivative at dx: e^min(dx, 0)
              const __m512 at = _mm512_loadu_ps(dx + (i0 + r0 + r) * E + e0 + 16 * v);
              x = _mm512_mul_ps(x, exp2_neg(_mm512_mul_ps(_mm512_min_ps(at, _mm512_setzero_ps()), _mm512_set1_ps(kLog2e))));
            }
            _mm512_storeu_ps(dst + 16 * v, x);
          }
        }
      }
      if (p.ones && den != nullptr)
        for (int64_t r = 0; r < rows; ++r) den[i0 + r0 + r] = rowden[r];
    }
    // the state after the chunk: S += b^T c, z += the sum of b
    for (int64_t f0 = 0; f0 < F; f0 += kR) {
      for (int64_t e0 = 0; e0 < E; e0 += 64) {
        const int nv = int(std::min<int64_t>(4, (E - e0) / 16));
        __m512 acc[kR][4];
        for (int64_t r = 0; r < kR; ++r)
          for (int v = 0; v < nv; ++v) acc[r][v] = _mm512_loadu_ps(S + (f0 + r) * E + e0 + 16 * v);
        tile_n(nv, acc, kt.data() + f0 * kC, kC, vc.data() + e0, E, 0, len);
        for (int64_t r = 0; r < kR; ++r)
          for (int v = 0; v < nv; ++v) _mm512_storeu_ps(S + (f0 + r) * E + e0 + 16 * v, acc[r][v]);
      }
    }
    if (p.ones)
      for (int64_t f = 0; f < F; f += 16) {
        __m512 sum = _mm512_loadu_ps(z + f);
        for (int64_t j = 0; j < len; ++j) sum = _mm512_add_ps(sum, _mm512_loadu_ps(kb.data() + j * F + f));
        _mm512_storeu_ps(z + f, sum);
      }
  }
}

void check(const torch::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu(), "chunk_linear: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "chunk_linear: ", name, " must be float32");
  TORCH_CHECK(x.dim() == dims && x.is_contiguous(), "chunk_linear: ", name, " must be contiguous with ", dims, " dims");
}

// a, b [BH, N, F]; c [BH, N, E]; ra, rb [BH, N] or empty (row terms added to the weights); out [BH, N, E]
// (written); den [BH, N] (written, with ones); S [BH, FK, E] and z [BH, FK] (the state before the first position,
// after the last when reverse; updated in place to the state at the other end), FK = F, or F + 16 with ra or rb.
// F and E multiples of 16.
void chunk_products(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c, const torch::Tensor& ra,
                    const torch::Tensor& rb, const torch::Tensor& dx, torch::Tensor& out, torch::Tensor& den,
                    torch::Tensor& S, torch::Tensor& z, bool reverse, bool ones, bool normalize, bool map, bool map_c,
                    double eps) {
  for (auto* x : {&a, &b}) check(*x, "a / b", 3);
  check(c, "c", 3);
  check(out, "out", 3);
  check(S, "S", 3);
  const int64_t BH = a.size(0), N = a.size(1), F = a.size(2), E = c.size(2);
  TORCH_CHECK(b.sizes() == a.sizes() && c.size(0) == BH && c.size(1) == N, "chunk_linear: a, b [BH, N, F], c [BH, N, E]");
  TORCH_CHECK(F % 16 == 0 && E % 16 == 0 && F > 0 && E > 0, "chunk_linear: F and E must be multiples of 16");
  const bool has_ra = ra.numel() > 0, has_rb = rb.numel() > 0;
  for (auto* x : {&ra, &rb})
    if (x->numel() > 0) {
      check(*x, "ra / rb", 2);
      TORCH_CHECK(x->size(0) == BH && x->size(1) == N, "chunk_linear: ra / rb [BH, N]");
    }
  const int64_t FK = has_ra || has_rb ? F + 16 : F;
  TORCH_CHECK(out.sizes() == c.sizes() && S.size(0) == BH && S.size(1) == FK && S.size(2) == E,
              "chunk_linear: out [BH, N, E], S [BH, FK, E]");
  if (ones) {
    check(z, "z", 2);
    check(den, "den", 2);
    TORCH_CHECK(z.size(0) == BH && z.size(1) == FK && den.size(0) == BH && den.size(1) == N,
                "chunk_linear: z [BH, FK], den [BH, N]");
  }
  if (dx.numel() > 0) {
    check(dx, "dx", 3);
    TORCH_CHECK(dx.sizes() == c.sizes(), "chunk_linear: dx [BH, N, E]");
  }
  const float* dxp = dx.numel() > 0 ? dx.data_ptr<float>() : nullptr;
  const Problem p{N, F, FK, E, reverse, ones, normalize && ones, map, map_c, float(eps)};
  const float* rap = has_ra ? ra.data_ptr<float>() : nullptr;
  const float* rbp = has_rb ? rb.data_ptr<float>() : nullptr;
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *cp = c.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = S.data_ptr<float>();
  float* zp = ones ? z.data_ptr<float>() : nullptr;
  float* dp = ones ? den.data_ptr<float>() : nullptr;
  at::parallel_for(0, BH, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i)
      run_row(p, ap + i * N * F, bp + i * N * F, cp + i * N * E, rap ? rap + i * N : nullptr,
              rbp ? rbp + i * N : nullptr, dxp ? dxp + i * N * E : nullptr, op + i * N * E, dp ? dp + i * N : nullptr, sp + i * FK * E,
              zp ? zp + i * FK : nullptr);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chunk_products", &chunk_products, "chunked causal products of linear attention (in place)");
}
