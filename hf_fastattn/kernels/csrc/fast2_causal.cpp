// Causal FAST (fastmax) attention of order 2 on the CPU, float32, without autograd:
//
//     out_i = sum_{j <= i} f(s_ij) v_j / sum_{j <= i} f(s_ij),   f(s) = 1 + s + s^2 / 2,   s_ij = q_hat_i . k_hat_j / T
//
// (q_hat, k_hat: each token mean-centred and L2-normalized). The same algorithm as the torch path of
// `ops/fast._causal_order2_inference`: chunks of `chunk` tokens; inside a chunk the weights f(s) in D dimensions;
// before it a state S = sum_j phi(k_j) v_j^T over the F = 1 + D + D(D+1)/2 symmetric order-2 features, read with
// phi(q_i); the denominators from D-dimensional moments (count, sum k, sum k k^T). There the chunk loop runs in
// Python over all heads at once, each step a separate pass over [heads, F, chunk] temporaries (the features alone
// are 65 torch calls per chunk). Here one thread takes one (batch, K/V head) at a time: it normalizes the chunk's
// queries and keys, builds their features in one pass each into its own buffers (a head's chunk stays in cache),
// and hands the products to torch's GEMM (`at::mm_out` / `addmm_`, single-threaded inside the parallel region).
// With grouped K/V heads the state is kept once per K/V head and read by all the queries of its group.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// rows of x (row stride `stride`) mean-centred and L2-normalized (norm clamped at eps), times `scale`, into y (D wide)
void normalize_rows(const float* x, int64_t rows, int64_t D, int64_t stride, float scale, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * stride;
    float* yr = y + r * D;
    float mean = 0.f;
    for (int64_t d = 0; d < D; ++d) mean += xr[d];
    mean /= float(D);
    float sq = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      yr[d] = xr[d] - mean;
      sq += yr[d] * yr[d];
    }
    const float s = scale / std::max(std::sqrt(sq), eps);
    for (int64_t d = 0; d < D; ++d) yr[d] *= s;
  }
}

// the order-2 features of each row of x (D wide) into f (F wide): [1, x, then for every a: diag * x_a^2, x_a x_b for
// b > a]; the keys' side takes diag 1, the queries' side 1/2 (f's s^2 / 2: the off-diagonal pairs count twice).
// `keep` (or null): a row with keep 0 gets all-zero features (a padded key).
void features(const float* x, int64_t rows, int64_t D, int64_t F, float diag, const float* keep, float* f) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* fr = f + r * F;
    if (keep && keep[r] == 0.f) {
      std::fill(fr, fr + F, 0.f);
      continue;
    }
    fr[0] = 1.f;
    std::copy(xr, xr + D, fr + 1);
    int64_t off = 1 + D;
    for (int64_t a = 0; a < D; ++a) {
      const float xa = xr[a];
      float* fa = fr + off - a;  // fa[b] for b >= a
#pragma omp simd
      for (int64_t b = a; b < D; ++b) fa[b] = xa * xr[b];
      fr[off] *= diag;
      off += D - a;
    }
  }
}

void check(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "fast2_causal: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fast2_causal: ", name, " must be float32");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "fast2_causal: ", name, " must be contiguous [B, heads, N, dim]");
}

// q [B, H, N, D]; k [B, Hkv, N, D]; v [B, Hkv, N, Dv]; keep [B, N] float (1 real, 0 padded) or empty;
// out [B, H, N, Dv] (written). Hkv divides H. The state, all four empty (start from nothing, keep nothing) or all
// given (the keys before position 0 on entry, updated in place to the state after the last token):
// S [B, Hkv, F, Dv] = sum phi(k) v^T in this kernel's features (keys' side: [1, k, k_a k_b for a <= b]),
// ksum [B, Hkv, D] = sum k_hat, kout [B, Hkv, D, D] = sum k_hat k_hat^T, count [B, Hkv] = number of keys.
void fast2_causal(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& keep,
                  torch::Tensor& out, torch::Tensor& S_io, torch::Tensor& ksum_io, torch::Tensor& kout_io,
                  torch::Tensor& count_io, double temperature, int64_t chunk) {
  check(q, "q");
  check(k, "k");
  check(v, "v");
  check(out, "out");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == N && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "fast2_causal: k must be [B, Hkv, N, D] with Hkv dividing H");
  TORCH_CHECK(v.size(0) == B && v.size(1) == Hkv && v.size(2) == N, "fast2_causal: v must be [B, Hkv, N, Dv]");
  TORCH_CHECK(out.size(0) == B && out.size(1) == H && out.size(2) == N && out.size(3) == Dv,
              "fast2_causal: out must be [B, H, N, Dv]");
  TORCH_CHECK(chunk > 0 && temperature > 0, "fast2_causal: chunk and temperature must be positive");
  const bool masked = keep.numel() > 0;
  if (masked) {
    TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.is_contiguous() && keep.dim() == 2 && keep.size(0) == B &&
                    keep.size(1) == N,
                "fast2_causal: keep must be a contiguous float32 [B, N]");
  }
  const int64_t G = H / Hkv, F = 1 + D + D * (D + 1) / 2, C = std::max<int64_t>(1, std::min(chunk, N));
  const bool stateful = S_io.numel() > 0;
  if (stateful) {
    for (auto* x : {&S_io, &ksum_io, &kout_io, &count_io})
      TORCH_CHECK(x->scalar_type() == at::kFloat && x->is_contiguous(), "fast2_causal: the state must be contiguous float32");
    TORCH_CHECK(S_io.numel() == B * Hkv * F * Dv && ksum_io.numel() == B * Hkv * D &&
                    kout_io.numel() == B * Hkv * D * D && count_io.numel() == B * Hkv,
                "fast2_causal: the state must be S [B, Hkv, F, Dv], ksum [B, Hkv, D], kout [B, Hkv, D, D], count [B, Hkv]");
  }
  const float inv_t = float(1.0 / temperature), eps = 1e-6f;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* keepp = masked ? keep.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const auto opts = q.options();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t first, int64_t last) {
    // this thread's buffers, reused over its (batch, K/V head) items and their chunks
    auto qn = at::empty({G * C, D}, opts), kn = at::empty({C, D}, opts);
    auto fq = at::empty({G * C, F}, opts), fk = at::empty({C, F}, opts);
    auto w = at::empty({G * C, C}, opts), num = at::empty({G * C, Dv}, opts), qk = at::empty({G * C, D}, opts);
    auto S_own = at::empty({F, Dv}, opts), kout_own = at::empty({D, D}, opts);
    std::vector<float> ksum_own(D), den(G * C), kept(C, 1.f);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv;
      const float* kh = kp + (b * Hkv + hk) * N * D;
      const float* vh = vp + (b * Hkv + hk) * N * Dv;
      // the state: this item's slices of the given one (updated in place), or this thread's zeroed buffers
      at::Tensor S = S_own, kout = kout_own;
      float* ksum = ksum_own.data();
      float count_own = 0.f;
      float* count = &count_own;
      if (stateful) {
        S = torch::from_blob(S_io.data_ptr<float>() + item * F * Dv, {F, Dv}, opts);
        kout = torch::from_blob(kout_io.data_ptr<float>() + item * D * D, {D, D}, opts);
        ksum = ksum_io.data_ptr<float>() + item * D;
        count = count_io.data_ptr<float>() + item;
      } else {
        S.zero_();
        kout.zero_();
        std::fill(ksum, ksum + D, 0.f);
      }
      for (int64_t start = 0; start < N; start += C) {
        const int64_t L = std::min(C, N - start), GL = G * L;
        const float* kc = keepp ? keepp + b * N + start : kept.data();
        float* knp = kn.data_ptr<float>();
        float* qnp = qn.data_ptr<float>();
        normalize_rows(kh + start * D, L, D, D, 1.f, eps, knp);
        for (int64_t j = 0; j < L; ++j)
          if (kc[j] == 0.f) std::fill(knp + j * D, knp + (j + 1) * D, 0.f);
        for (int64_t g = 0; g < G; ++g)
          normalize_rows(qp + ((b * H + hk * G + g) * N + start) * D, L, D, D, inv_t, eps, qnp + g * L * D);
        auto qv = qn.narrow(0, 0, GL), kv = kn.narrow(0, 0, L);
        auto vv = torch::from_blob(const_cast<float*>(vh + start * Dv), {L, Dv}, opts);
        auto wv = torch::from_blob(w.data_ptr<float>(), {GL, L}, opts), nv = num.narrow(0, 0, GL);
        // inside the chunk: f(s) in D dimensions, causal, padded keys dropped
        at::mm_out(wv, qv, kv.t());
        float* wp = w.data_ptr<float>();
        for (int64_t r = 0; r < GL; ++r) {
          const int64_t i = r % L;
          float* wr = wp + r * L;
          float sum = 0.f;
          for (int64_t j = 0; j < L; ++j) {
            const float s = wr[j];
            const float f = (j <= i && kc[j] != 0.f) ? 1.f + s + 0.5f * s * s : 0.f;
            wr[j] = f;
            sum += f;
          }
          den[r] = sum;
        }
        at::mm_out(nv, wv, vv);
        if (start > 0 || stateful) {  // the chunks before: the state read with the queries' features, denominators from moments
          auto fqv = fq.narrow(0, 0, GL);
          features(qnp, GL, D, F, 0.5f, nullptr, fq.data_ptr<float>());
          nv.addmm_(fqv, S);
          auto qkv = qk.narrow(0, 0, GL);
          at::mm_out(qkv, qv, kout);
          const float* qkp = qk.data_ptr<float>();
          for (int64_t r = 0; r < GL; ++r) {
            float lin = 0.f, quad = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              lin += qnp[r * D + d] * ksum[d];
              quad += qnp[r * D + d] * qkp[r * D + d];
            }
            den[r] += *count + lin + 0.5f * quad;
          }
        }
        // this chunk's keys into the state and the moments
        features(knp, L, D, F, 1.f, kc, fk.data_ptr<float>());
        S.addmm_(fk.narrow(0, 0, L).t(), vv);
        kout.addmm_(kv.t(), kv);
        for (int64_t j = 0; j < L; ++j) {
          for (int64_t d = 0; d < D; ++d) ksum[d] += knp[j * D + d];
          *count += kc[j];
        }
        const float* np = num.data_ptr<float>();
        for (int64_t g = 0; g < G; ++g) {
          float* orow = op + ((b * H + hk * G + g) * N + start) * Dv;
          for (int64_t i = 0; i < L; ++i) {
            const int64_t r = g * L + i;
            const float inv = 1.f / std::max(den[r], 1e-6f);
            for (int64_t e = 0; e < Dv; ++e) orow[i * Dv + e] = np[r * Dv + e] * inv;
          }
        }
      }
    }
  });
}

// The rows of one step for Dv = 64 and G query heads per K/V head: the value row and the G x 64 accumulators in
// registers, S's row loaded, updated and stored once, read by every query head from the registers.
template <int G>
void step_rows_64(const float* fk, const float* fq, int64_t F, const float* vr, float* Sh, float* zh, float* num,
                  float* den) {
  const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
               v3 = _mm512_loadu_ps(vr + 48);
  __m512 n[G][4];
  float d[G];
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < 4; ++i) n[g][i] = _mm512_setzero_ps();
    d[g] = 0.f;
  }
  for (int64_t f = 0; f < F; ++f) {
    float* row = Sh + f * 64;
    const __m512 kf = _mm512_set1_ps(fk[f]);
    const __m512 r0 = _mm512_fmadd_ps(kf, v0, _mm512_loadu_ps(row));
    const __m512 r1 = _mm512_fmadd_ps(kf, v1, _mm512_loadu_ps(row + 16));
    const __m512 r2 = _mm512_fmadd_ps(kf, v2, _mm512_loadu_ps(row + 32));
    const __m512 r3 = _mm512_fmadd_ps(kf, v3, _mm512_loadu_ps(row + 48));
    _mm512_storeu_ps(row, r0);
    _mm512_storeu_ps(row + 16, r1);
    _mm512_storeu_ps(row + 32, r2);
    _mm512_storeu_ps(row + 48, r3);
    const float zf = (zh[f] += fk[f]);
    for (int g = 0; g < G; ++g) {
      const float qs = fq[g * F + f];
      const __m512 qf = _mm512_set1_ps(qs);
      n[g][0] = _mm512_fmadd_ps(qf, r0, n[g][0]);
      n[g][1] = _mm512_fmadd_ps(qf, r1, n[g][1]);
      n[g][2] = _mm512_fmadd_ps(qf, r2, n[g][2]);
      n[g][3] = _mm512_fmadd_ps(qf, r3, n[g][3]);
      d[g] += qs * zf;
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(num + g * 64 + i * 16, n[g][i]);
    den[g] = d[g];
  }
}

// One decoding step on the state of `FastmaxFeatureMap` (order 2), updated in place: phi(x) = [1, x / sqrt(T),
// x_a x_b / T for a < b and x_a^2 / (sqrt(2) T) on the diagonal, in row order of the upper triangle], S += phi(k)
// v^T, z += phi(k), out = phi(q)^T S / max(phi(q) . z, 1e-6) for each query head of the K/V group. The torch step
// builds phi(q) and phi(k) (a few gathers) and passes over S twice (the update, then the read); here the features
// are built in the thread's buffer and each row of S is read and written once, the update and the read together.
// q [B, H, 1, D]; k [B, Hkv, 1, D]; v [B, Hkv, 1, Dv] (raw: normalized here); keep [B] float or empty;
// S [B, Hkv, F, Dv], z [B, Hkv, F] (updated); out [B, H, 1, Dv] (written).
void fast2_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& keep,
                torch::Tensor& S, torch::Tensor& z, torch::Tensor& out, double temperature) {
  check(q, "q");
  check(k, "k");
  check(v, "v");
  check(out, "out");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  const int64_t G = H / Hkv, F = 1 + D + D * (D + 1) / 2;
  TORCH_CHECK(q.size(2) == 1 && k.size(2) == 1 && v.size(2) == 1, "fast2_step: one token (q, k, v [B, heads, 1, dim])");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && v.size(0) == B && v.size(1) == Hkv,
              "fast2_step: k [B, Hkv, 1, D] and v [B, Hkv, 1, Dv] with Hkv dividing H");
  TORCH_CHECK(S.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && S.is_contiguous() && z.is_contiguous() &&
                  S.numel() == B * Hkv * F * Dv && z.numel() == B * Hkv * F,
              "fast2_step: the state must be contiguous float32 S [B, Hkv, F, Dv] and z [B, Hkv, F], F = 1 + D + D(D+1)/2");
  TORCH_CHECK(out.numel() == B * H * Dv, "fast2_step: out must be [B, H, 1, Dv]");
  const bool masked = keep.numel() > 0;
  if (masked)
    TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.numel() == B, "fast2_step: keep must be float32 [B]");
  const float lin = float(1.0 / std::sqrt(temperature)), off = float(1.0 / temperature);
  const float diag = float(1.0 / (std::sqrt(2.0) * temperature)), eps = 1e-6f;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* keepp = masked ? keep.data_ptr<float>() : nullptr;
  float *sp = S.data_ptr<float>(), *zp = z.data_ptr<float>(), *op = out.data_ptr<float>();

  // phi(x_hat) into f (F wide), times `scale`
  auto phi = [&](const float* x, float scale, float* f) {
    f[0] = scale;
    for (int64_t d = 0; d < D; ++d) f[1 + d] = x[d] * lin * scale;
    int64_t off_f = 1 + D;
    for (int64_t a = 0; a < D; ++a) {
      const float xa = x[a] * off * scale;
      for (int64_t b = a; b < D; ++b) f[off_f + b - a] = xa * x[b];
      f[off_f] *= diag / off;
      off_f += D - a;
    }
  };

  at::parallel_for(0, B * Hkv, 1, [&](int64_t first, int64_t last) {
    std::vector<float> kn(D), qn(G * D), fk(F), fq(G * F), num(G * Dv), den(G);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv;
      normalize_rows(kp + item * D, 1, D, D, 1.f, eps, kn.data());
      phi(kn.data(), keepp ? keepp[b] : 1.f, fk.data());
      for (int64_t g = 0; g < G; ++g) {
        normalize_rows(qp + (b * H + hk * G + g) * D, 1, D, D, 1.f, eps, qn.data() + g * D);
        phi(qn.data() + g * D, 1.f, fq.data() + g * F);
      }
      std::fill(num.begin(), num.end(), 0.f);
      std::fill(den.begin(), den.end(), 0.f);
      const float* vr = vp + item * Dv;
      float* Sh = sp + item * F * Dv;
      float* zh = zp + item * F;
      if (Dv == 64 && G <= 3) {
        if (G == 1) step_rows_64<1>(fk.data(), fq.data(), F, vr, Sh, zh, num.data(), den.data());
        if (G == 2) step_rows_64<2>(fk.data(), fq.data(), F, vr, Sh, zh, num.data(), den.data());
        if (G == 3) step_rows_64<3>(fk.data(), fq.data(), F, vr, Sh, zh, num.data(), den.data());
      } else {
      for (int64_t f = 0; f < F; ++f) {
        float* row = Sh + f * Dv;
        const float kf = fk[f];
#pragma omp simd
        for (int64_t e = 0; e < Dv; ++e) row[e] += kf * vr[e];
        zh[f] += kf;
        for (int64_t g = 0; g < G; ++g) {
          const float qf = fq[g * F + f];
          float* ng = num.data() + g * Dv;
#pragma omp simd
          for (int64_t e = 0; e < Dv; ++e) ng[e] += qf * row[e];
          den[g] += qf * zh[f];
        }
      }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / std::max(den[g], eps);
        float* orow = op + (b * H + hk * G + g) * Dv;
        for (int64_t e = 0; e < Dv; ++e) orow[e] = num[g * Dv + e] * inv;
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fast2_causal", &fast2_causal, "causal fastmax attention of order 2, float32, inference (out written)");
  m.def("fast2_step", &fast2_step, "one decoding step of fastmax of order 2 on its state, updated in place");
}
