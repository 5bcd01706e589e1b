// y[M, N] = x[M, K] . W[N, K]^T (+ b) for a few rows M (1..~16), float32, AVX-512.
//
// A forward over a few tokens of a small model on a CPU is memory-bound: every weight is read once whatever M is,
// so M rows should cost about what one row costs. MKL's sgemm does not get there for 4..12 rows (it switches
// kernels at 4 rows and packs the weight: on this project's Xeon, 30 layers of SmolLM2-135M's linear shapes took
// 30 ms at 1 row, 51 ms at 4 and 65 ms at 8). Here the weight is streamed once, four of its rows at a time, with the
// next four prefetched; each of the M input rows (held in L1) is multiplied into 16-lane partial sums, reduced at
// the end of the row, 16 at a time (`reduce16`): 34 ms at 4 rows and 41 ms at 8 for the same layers. Which route a
// forward takes is still measured (`generation.fastpath.RowPlan`).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kWRows = 4;  // weight rows (output features) per block
constexpr int64_t kXRows = 4;  // input rows per tile: 4 x 4 accumulators

// out[4 a + r] = the sum of the 16 lanes of acc[a][r]: the 16 horizontal sums at once, by transposing while adding
// (45 shuffles and adds where 16 separate reductions take ~130 instructions; per block of 4 weight rows that was a
// fifth of the work at 8 rows)
inline void reduce16(const __m512 (&acc)[kXRows][kWRows], float* out) {
  const __m512* v = &acc[0][0];
  __m512 pairs[8];  // per 128-bit lane: partial sums of v[2i] and v[2i + 1]
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 quads[4];  // per 128-bit lane: the lane's sums of v[4i .. 4i + 3]
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const auto fold = [](__m512 a, __m512 b) {  // the lanes 0 + 1 and 2 + 3 of a, then of b
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  _mm512_storeu_ps(out, fold(fold(quads[0], quads[1]), fold(quads[2], quads[3])));
}

void block(const float* x, int64_t M, int64_t K, const float* W, int64_t j, int64_t R, float* y, int64_t N,
           const float* bias) {
  const float* next = W + (j + kWRows) * K;  // the next block, prefetched while this one is read
  const bool prefetch = j + kWRows < N;
  for (int64_t m0 = 0; m0 < M; m0 += kXRows) {
    const int64_t mt = std::min(kXRows, M - m0);
    __m512 acc[kXRows][kWRows];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 w[kWRows];
      for (int64_t r = 0; r < kWRows; ++r) w[r] = r < R ? _mm512_loadu_ps(W + (j + r) * K + k) : _mm512_setzero_ps();
      if (m0 == 0 && prefetch) {
        for (int64_t line = 0; line < 4; ++line) _mm_prefetch((const char*)(next + 4 * k + 16 * line), _MM_HINT_T0);
      }
      for (int64_t a = 0; a < mt; ++a) {
        const __m512 xv = _mm512_loadu_ps(x + (m0 + a) * K + k);
        for (int64_t r = 0; r < kWRows; ++r) acc[a][r] = _mm512_fmadd_ps(xv, w[r], acc[a][r]);
      }
    }
    float sums[kXRows * kWRows];
    reduce16(acc, sums);
    for (int64_t a = 0; a < mt; ++a) {
      for (int64_t r = 0; r < R; ++r) {
        float s = sums[a * kWRows + r];
        for (int64_t kk = k; kk < K; ++kk) s += x[(m0 + a) * K + kk] * W[(j + r) * K + kk];
        y[(m0 + a) * N + j + r] = s + (bias ? bias[j + r] : 0.f);
      }
    }
  }
}

torch::Tensor rows_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "rows_linear: x [M, K], weight [N, K]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rows_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rows_linear: float32 only");
  TORCH_CHECK(weight.is_contiguous(), "rows_linear: the weight must be contiguous");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = weight.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "rows_linear: bias [N] float32 on the CPU");
    b = bias->contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::parallel_for(0, (N + kWRows - 1) / kWRows, 16, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t j = blk * kWRows;
      block(xp, M, K, wp, j, std::min(kWRows, N - j), yp, N, bp);
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rows_linear", &rows_linear, "x . W^T (+ b) for a few rows"); }
