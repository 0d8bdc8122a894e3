// Fused CPU kernel for the Fourier KAN reduction of KArAt's phi1_w2 operator (karat/cpu_kernel.py).
//
//   hidden[b,h,i,:] = sum_j mask_ij sum_m B_m(scale * q_i . k_j + bias_ij) coef[h,j,m,:],
//   B = (cos x, .., cos Gx, sin x, .., sin Gx); bias and mask optional, any strides (0 where they broadcast)
//
// One pass per (query tile, key tile) of every (batch, head) pair: the logits tile comes from one small GEMM,
// its 2G features are evaluated in cache (one sin/cos per logit, the angle-addition recurrence for the higher
// frequencies) and contracted at once with the coefficients by a second GEMM. Nothing N x N x 2G ever reaches
// memory. Backward recomputes the tile the same way (the logits are never stored).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <tuple>
#include <vector>

namespace {

constexpr float kSincosMax = 8192.0f;  // beyond this |x| the float range reduction loses accuracy

// cos and sin of n floats, Cody-Waite reduction by pi/2 and minimax polynomials (Cephes sinf/cosf):
// about 1 ulp for |x| <= kSincosMax, written so that the compiler vectorises the loop.
void sincos_block(const float* x, float* c, float* s, int64_t n) {
  constexpr float two_over_pi = 0.636619772367581343f;
  constexpr float p1 = 1.5703125f, p2 = 4.837512969970703125e-4f, p3 = 7.54978995489188216e-8f;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float xe = x[e];
    const float kf = std::nearbyint(xe * two_over_pi);
    const int quadrant = static_cast<int>(kf) & 3;
    const float r = ((xe - kf * p1) - kf * p2) - kf * p3;
    const float z = r * r;
    const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
                     - 0.5f * z + 1.0f;
    const bool swap = quadrant & 1;
    const float sv = swap ? cp : sp, cv = swap ? sp : cp;
    s[e] = (quadrant & 2) ? -sv : sv;
    c[e] = ((quadrant + 1) & 2) ? -cv : cv;
  }
}

void sincos_block(const double* x, double* c, double* s, int64_t n) {  // float64: the library's, exactly
  for (int64_t e = 0; e < n; ++e) {
    c[e] = std::cos(x[e]);
    s[e] = std::sin(x[e]);
  }
}

bool needs_exact(const float* x, int64_t n) {
  float m = 0.0f;
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < n; ++e) m = std::max(m, std::fabs(x[e]));
  return !(m <= kSincosMax);  // also true for NaN
}

bool needs_exact(const double*, int64_t) { return false; }

constexpr int64_t TQ = 32;  // queries per tile: the innermost, vectorised axis of every loop below

// Features of a logits tile laid out (key, query): x (nj, TQ), rows ld apart -> feats (nj, 2G, TQ), queries
// contiguous, so that the recurrence and both contractions below run along full vectors of queries.
template <typename T>
void tile_features(const T* x, int64_t ld, T* c1, T* s1, T* feats, int64_t nj, int64_t grid) {
  RECORD_FUNCTION("karat::tile_features", std::vector<c10::IValue>());  // torch.profiler sees the breakdown
  for (int64_t j = 0; j < nj; ++j) {
    const T* xj = x + j * ld;
    sincos_block(xj, c1 + j * TQ, s1 + j * TQ, TQ);
    if (needs_exact(xj, TQ)) {
      for (int64_t i = 0; i < TQ; ++i) {
        c1[j * TQ + i] = std::cos(xj[i]);
        s1[j * TQ + i] = std::sin(xj[i]);
      }
    }
  }
  const int64_t m = 2 * grid;
  for (int64_t j = 0; j < nj; ++j) {
    const T* c = c1 + j * TQ;
    const T* s = s1 + j * TQ;
    T* f = feats + j * m * TQ;
    for (int64_t i = 0; i < TQ; ++i) {
      f[i] = c[i];
      f[grid * TQ + i] = s[i];
    }
    for (int64_t g = 1; g < grid; ++g) {  // cos((g+1)x) = cos gx cos x - sin gx sin x, sin likewise
      const T* cp = f + (g - 1) * TQ;
      const T* sp = f + (grid + g - 1) * TQ;
      T* cn = f + g * TQ;
      T* sn = f + (grid + g) * TQ;
      for (int64_t i = 0; i < TQ; ++i) {
        cn[i] = cp[i] * c[i] - sp[i] * s[i];
        sn[i] = sp[i] * c[i] + cp[i] * s[i];
      }
    }
  }
}

template <typename T>
struct Scratch {  // per-thread tile buffers
  std::vector<T> qt, logits, c1, s1, feats, grads, dyt, dq, whole;
  Scratch(int64_t tk, int64_t m, int64_t d, int64_t r, int64_t npad, int64_t whole_size)
      : qt(npad * d), logits(tk * TQ), c1(tk * TQ), s1(tk * TQ), feats(tk * m * TQ), grads(tk * m * TQ), dyt(r * TQ),
        dq(TQ * d), whole(whole_size) {}
};

at::Tensor blob(void* data, at::IntArrayRef shape, const at::Tensor& like) {
  return at::from_blob(data, shape, like.options());
}

// Copy all n query rows times scale into the (npad, d) buffer; rows past n are zero.
template <typename T>
void load_queries(Scratch<T>& sc, const at::Tensor& qp, int64_t n, int64_t d, double scale) {
  std::fill(sc.qt.begin(), sc.qt.end(), T(0));
  const T s = static_cast<T>(scale);
  const T* q = qp.data_ptr<T>();
  const int64_t stride = qp.stride(0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c) sc.qt[i * d + c] = q[i * stride + c] * s;
}

// Rows with unit stride (the q, k views hosts hand over, e.g. slices of a fused qkv) are used in place.
at::Tensor rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Where the logits of a pair live: `whole` (nk, npad) when computed at once, else the per-tile buffer.
template <typename T>
struct Logits {
  T* whole;
  int64_t npad;
};

// A worker thread's tile buffers, its padded query tile and where its logits live, and the start of
// every (batch, head) pair both passes share: load the scaled queries and, when the pair's logits fit one GEMM
// (`whole`), compute them all at once.
template <typename T>
struct PairTiles {
  Scratch<T> sc;
  at::Tensor qpad;
  Logits<T> lg;
  int64_t nk;
  PairTiles(int64_t tk, int64_t m, int64_t d, int64_t r, int64_t npad, int64_t nk, bool whole,
            const at::Tensor& like)
      : sc(tk, m, d, r, npad, whole ? nk * npad : 0), qpad(blob(sc.qt.data(), {npad, d}, like)),
        lg{whole ? sc.whole.data() : nullptr, npad}, nk(nk) {}
  // The pair's (nk, npad) logits when `whole`, else an undefined tensor (the tiles compute theirs).
  at::Tensor start(const at::Tensor& qp, const at::Tensor& kp, int64_t n, double scale) {
    load_queries<T>(sc, qp, n, qpad.size(1), scale);
    if (lg.whole == nullptr) return at::Tensor();
    at::Tensor all = blob(lg.whole, {nk, lg.npad}, qp);
    at::mm_out(all, kp, qpad.t());
    return all;
  }
};

// The optional additive bias and boolean mask of one (batch, head) pair: element (i, j) at i * sq + j * sk
// (strides 0 where the host's tensor broadcasts); null pointers where absent.
template <typename T>
struct Extras {
  const T* bias = nullptr;
  int64_t bq = 0, bk = 0;
  const bool* mask = nullptr;
  int64_t mq = 0, mk = 0;
};

// The (B, H, N, Nk) views of the optional bias and mask; pair(b, h) gives one pair's pointers.
template <typename T>
struct ExtrasAll {
  at::Tensor bias, mask;
  Extras<T> pair(int64_t b, int64_t h) const {
    Extras<T> e;
    if (bias.defined()) {
      e.bias = bias.data_ptr<T>() + b * bias.stride(0) + h * bias.stride(1);
      e.bq = bias.stride(2);
      e.bk = bias.stride(3);
    }
    if (mask.defined()) {
      e.mask = mask.data_ptr<bool>() + b * mask.stride(0) + h * mask.stride(1);
      e.mq = mask.stride(2);
      e.mk = mask.stride(3);
    }
    return e;
  }
};

at::Tensor optional_view(const c10::optional<at::Tensor>& t, const at::Tensor& q, int64_t nk) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  at::Tensor v = t->detach();
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2) &&
                  v.size(3) == nk,
              "karat::fourier_reduce: bias and key_mask must be (B, H, N, Nk) views (expand them)");
  return v;
}

// Logits (nj, TQ) of keys [j0, j0+nj) and queries [i0, i0+TQ) (plus the bias) and their (masked) features;
// returns the logits pointer and its row stride (the backward writes the logit gradients there).
template <typename T>
std::pair<T*, int64_t> logits_and_features(Scratch<T>& sc, const Logits<T>& lg, const at::Tensor& qpad,
                                           const at::Tensor& kp, int64_t i0, int64_t j0, int64_t nj, int64_t ni,
                                           int64_t grid, const Extras<T>& ex) {
  T* x = sc.logits.data();
  int64_t ld = TQ;
  if (lg.whole != nullptr) {
    x = lg.whole + j0 * lg.npad + i0;
    ld = lg.npad;
  } else {
    at::Tensor s = blob(x, {nj, TQ}, kp);
    at::mm_out(s, kp.narrow(0, j0, nj), qpad.narrow(0, i0, TQ).t());
  }
  if (ex.bias != nullptr) {  // each tile is visited once per pass, so the bias is added in place
    for (int64_t j = 0; j < nj; ++j) {
      const T* bj = ex.bias + i0 * ex.bq + (j0 + j) * ex.bk;
      T* xj = x + j * ld;
      for (int64_t i = 0; i < ni; ++i) xj[i] += bj[i * ex.bq];
    }
  }
  tile_features<T>(x, ld, sc.c1.data(), sc.s1.data(), sc.feats.data(), nj, grid);
  const int64_t m = 2 * grid;
  if (ni < TQ) {  // padded queries add nothing
    const int64_t rows = nj * m;
    for (int64_t e = 0; e < rows; ++e) std::fill(sc.feats.data() + e * TQ + ni, sc.feats.data() + (e + 1) * TQ, T(0));
  }
  if (ex.mask != nullptr) {  // masked entries have zero features: no output, zero gradients
    for (int64_t j = 0; j < nj; ++j) {
      const bool* mj = ex.mask + i0 * ex.mq + (j0 + j) * ex.mk;
      T* f = sc.feats.data() + j * m * TQ;
      for (int64_t i = 0; i < ni; ++i) {
        if (mj[i * ex.mq]) continue;
        for (int64_t mm = 0; mm < m; ++mm) f[mm * TQ + i] = T(0);
      }
    }
  }
  return {x, ld};
}

// acc[o, :] += sum_e feats[e, :] coef[e, o] for outputs [o0, o0 + OB): OB accumulator rows stay in registers
// while the feature tile streams through once.
template <typename T, int OB>
void contract_block(const T* f, const T* c, int64_t ne, int64_t r, int64_t o0, T* acc) {
  T a[OB][TQ];
  for (int b = 0; b < OB; ++b)
    for (int64_t i = 0; i < TQ; ++i) a[b][i] = acc[(o0 + b) * TQ + i];
  for (int64_t e = 0; e < ne; ++e) {
    const T* fe = f + e * TQ;
    const T* ce = c + e * r + o0;
    for (int b = 0; b < OB; ++b) {
      const T w = ce[b];
#pragma omp simd
      for (int64_t i = 0; i < TQ; ++i) a[b][i] += fe[i] * w;
    }
  }
  for (int b = 0; b < OB; ++b)
    for (int64_t i = 0; i < TQ; ++i) acc[(o0 + b) * TQ + i] = a[b][i];
}

// acc (r, TQ) += coef^T feats for a feature tile (ne = keys x 2G rows of TQ queries), coef (ne, r).
template <typename T>
void contract(const T* f, const T* c, int64_t ne, int64_t r, T* acc) {
  RECORD_FUNCTION("karat::contract_coefficients", std::vector<c10::IValue>());
  constexpr int ob = sizeof(T) == 4 ? 6 : 3;
  int64_t o = 0;
  for (; o + ob <= r; o += ob) contract_block<T, ob>(f, c, ne, r, o, acc);
  for (; o < r; ++o) contract_block<T, 1>(f, c, ne, r, o, acc);
}

// grads[e, :] = sum_o dyt[o, :] coef_rot[e, o], OB rows of dyt held in registers per pass over the tile.
template <typename T, int OB>
void rotate_block(const T* dyt, const T* c, int64_t ne, int64_t r, int64_t o0, T* grads) {
  T d[OB][TQ];
  for (int b = 0; b < OB; ++b)
    for (int64_t i = 0; i < TQ; ++i) d[b][i] = dyt[(o0 + b) * TQ + i];
  for (int64_t e = 0; e < ne; ++e) {
    T g[TQ];
    T* ge = grads + e * TQ;
    for (int64_t i = 0; i < TQ; ++i) g[i] = o0 ? ge[i] : T(0);
    const T* ce = c + e * r + o0;
    for (int b = 0; b < OB; ++b) {
      const T w = ce[b];
#pragma omp simd
      for (int64_t i = 0; i < TQ; ++i) g[i] += d[b][i] * w;
    }
    for (int64_t i = 0; i < TQ; ++i) ge[i] = g[i];
  }
}

// logits[j, :] = sum_m feats[j, m, :] (coef_rot[j, m] . dy): the gradient of the loss at the (scaled) logits.
template <typename T>
void logit_grads(Scratch<T>& sc, const T* c, int64_t nj, int64_t m, int64_t r, T* out, int64_t ld) {
  RECORD_FUNCTION("karat::logit_grads", std::vector<c10::IValue>());
  constexpr int ob = sizeof(T) == 4 ? 6 : 3;
  T* grads = sc.grads.data();
  int64_t o = 0;
  for (; o + ob <= r; o += ob) rotate_block<T, ob>(sc.dyt.data(), c, nj * m, r, o, grads);
  for (; o < r; ++o) rotate_block<T, 1>(sc.dyt.data(), c, nj * m, r, o, grads);
  const T* f = sc.feats.data();
  for (int64_t j = 0; j < nj; ++j) {
    T ds[TQ] = {};
    for (int64_t mm = 0; mm < m; ++mm) {
      const T* fe = f + (j * m + mm) * TQ;
      const T* ge = grads + (j * m + mm) * TQ;
#pragma omp simd
      for (int64_t i = 0; i < TQ; ++i) ds[i] += fe[i] * ge[i];
    }
    for (int64_t i = 0; i < TQ; ++i) out[j * ld + i] = ds[i];
  }
}

}  // namespace

// q (B,H,N,d), k (B,H,Nk,d), coef (H,Nk,2G,r) -> hidden (B,H,N,r). Keys go in tiles of tk; a (batch, head)
// pair with at most whole_limit (padded) logits gets them all from one GEMM (fewer, larger calls), a larger one
// from one GEMM per tile (a small buffer).
at::Tensor fourier_reduce_forward(at::Tensor q, at::Tensor k, at::Tensor coef, double scale, int64_t grid,
                                  int64_t tk, int64_t whole_limit, c10::optional<at::Tensor> bias,
                                  c10::optional<at::Tensor> key_mask) {
  // Detached: the tiles below run on worker threads, where autograd's thread-local state does not follow.
  q = rows(q.detach());
  k = rows(k.detach());
  coef = coef.detach().contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3), nk = k.size(2);
  const int64_t r = coef.size(3), m = 2 * grid, npad = (n + TQ - 1) / TQ * TQ;
  const bool whole = nk * npad <= whole_limit;
  at::Tensor out = at::zeros({batch, heads, n, r}, q.options());
  at::Tensor bview = optional_view(bias, q, nk), mview = optional_view(key_mask, q, nk);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fourier_reduce_forward", [&] {
    const ExtrasAll<scalar_t> extras{bview, mview};
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;
      PairTiles<scalar_t> pt(tk, m, d, r, npad, nk, whole, q);
      std::vector<scalar_t> acc(r * TQ);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / heads, h = p % heads;
        at::Tensor kp = k[b][h];
        const scalar_t* cp = coef[h].data_ptr<scalar_t>();
        scalar_t* op = out[b][h].data_ptr<scalar_t>();
        const Extras<scalar_t> ex = extras.pair(b, h);
        pt.start(q[b][h], kp, n, scale);
        for (int64_t i0 = 0; i0 < n; i0 += TQ) {
          const int64_t ni = std::min(TQ, n - i0);
          std::fill(acc.begin(), acc.end(), scalar_t(0));
          for (int64_t j0 = 0; j0 < nk; j0 += tk) {
            const int64_t nj = std::min(tk, nk - j0);
            logits_and_features<scalar_t>(pt.sc, pt.lg, pt.qpad, kp, i0, j0, nj, ni, grid, ex);
            contract<scalar_t>(pt.sc.feats.data(), cp + j0 * m * r, nj * m, r, acc.data());
          }
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t o = 0; o < r; ++o) op[(i0 + i) * r + o] = acc[o * TQ + i];
        }
      }
    });
  });
  return out;
}

// Gradients of fourier_reduce_forward: dy (B,H,N,r); coef_rot (H,Nk,2G,r) holds row m = scale_m coef[perm(m)]
// (the derivative map dB_m/dx = scale_m B_perm(m)), so dL/dx = sum_m (dy coef_rot^T)_m B_m needs no new sin/cos.
// With a bias that needs a gradient (need_bias), the logit gradients dL/dS also come back, dense (B,H,N,Nk).
std::vector<at::Tensor> fourier_reduce_backward(at::Tensor dy, at::Tensor q, at::Tensor k, at::Tensor coef_rot,
                                                double scale, int64_t grid, int64_t tk, int64_t whole_limit,
                                                c10::optional<at::Tensor> bias, c10::optional<at::Tensor> key_mask,
                                                bool need_bias) {
  q = rows(q.detach());
  k = rows(k.detach());
  dy = dy.detach().contiguous();
  coef_rot = coef_rot.detach().contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3), nk = k.size(2);
  const int64_t r = coef_rot.size(3), m = 2 * grid, npad = (n + TQ - 1) / TQ * TQ;
  const bool whole = nk * npad <= whole_limit;
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options());
  // Pairs run head-major (p = h * batch + b) in contiguous ranges per thread, so a thread accumulates the
  // coefficient gradient of one head at a time in its own buffer, kept with the first pair it covers. The buffers
  // are summed after the loop in pair order, not as threads finish: the same inputs and thread count give the same
  // bits (a resumed run continues bit for bit), however many threads share a head.
  at::Tensor dcoef_all = at::zeros({heads, nk * m, r}, q.options());
  std::vector<std::tuple<int64_t, int64_t, at::Tensor>> dcoef_parts;  // (first pair, head, partial gradient)
  at::Tensor bview = optional_view(bias, q, nk), mview = optional_view(key_mask, q, nk);
  // every (query, key) entry is written below
  at::Tensor dbias = need_bias ? at::empty({batch, heads, n, nk}, q.options()) : at::empty({0}, q.options());
  std::mutex dcoef_lock;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fourier_reduce_backward", [&] {
    const ExtrasAll<scalar_t> extras{bview, mview};
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;
      PairTiles<scalar_t> pt(tk, m, d, r, npad, nk, whole, q);
      at::Tensor dyt = blob(pt.sc.dyt.data(), {r, TQ}, q);
      at::Tensor dqt = blob(pt.sc.dq.data(), {TQ, d}, q);
      at::Tensor dcoef;
      int64_t dcoef_head = -1, dcoef_first = -1;
      auto flush = [&] {
        if (dcoef_head < 0) return;
        std::lock_guard<std::mutex> guard(dcoef_lock);
        dcoef_parts.emplace_back(dcoef_first, dcoef_head, dcoef);
      };
      const scalar_t s = static_cast<scalar_t>(scale);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t h = p / batch, b = p % batch;
        at::Tensor kp = k[b][h], dkp = dk[b][h], dqp = dq[b][h];
        if (h != dcoef_head) {
          flush();
          dcoef = at::zeros({nk * m, r}, q.options());
          dcoef_head = h;
          dcoef_first = p;
        }
        const scalar_t* crot = coef_rot[h].data_ptr<scalar_t>();
        const scalar_t* dyp = dy[b][h].data_ptr<scalar_t>();
        const Extras<scalar_t> ex = extras.pair(b, h);
        scalar_t* dbp = need_bias ? dbias.data_ptr<scalar_t>() + (b * heads + h) * n * nk : nullptr;
        at::Tensor all = pt.start(q[b][h], kp, n, scale);
        for (int64_t i0 = 0; i0 < n; i0 += TQ) {
          const int64_t ni = std::min(TQ, n - i0);
          std::fill(pt.sc.dyt.begin(), pt.sc.dyt.end(), scalar_t(0));
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t o = 0; o < r; ++o) pt.sc.dyt[o * TQ + i] = dyp[(i0 + i) * r + o];
          if (!whole) dqt.zero_();
          at::Tensor qt = pt.qpad.narrow(0, i0, TQ);
          for (int64_t j0 = 0; j0 < nk; j0 += tk) {
            const int64_t nj = std::min(tk, nk - j0);
            auto [x, ld] = logits_and_features<scalar_t>(pt.sc, pt.lg, pt.qpad, kp, i0, j0, nj, ni, grid, ex);
            at::Tensor feats = blob(pt.sc.feats.data(), {nj * m, TQ}, q);
            dcoef.narrow(0, j0 * m, nj * m).addmm_(feats, dyt.t());
            // dL/dlogit[j, i] = sum_m feats[j, m, i] sum_o dy[i, o] coef_rot[j, m, o], over the logits just used
            logit_grads<scalar_t>(pt.sc, crot + j0 * m * r, nj, m, r, x, ld);
            if (dbp != nullptr) {  // dL/dbias = dL/dS
              for (int64_t i = 0; i < ni; ++i) {
                scalar_t* row = dbp + (i0 + i) * nk + j0;
                for (int64_t j = 0; j < nj; ++j) row[j] = x[j * ld + i];
              }
            }
            if (!whole) {
              at::Tensor dst = blob(x, {nj, TQ}, q);
              dqt.addmm_(dst.t(), kp.narrow(0, j0, nj));
              dkp.narrow(0, j0, nj).addmm_(dst, qt);  // qt holds scale * q: dk = ds^T (scale q)
            }
          }
          if (!whole) dqp.narrow(0, i0, ni).add_(dqt.narrow(0, 0, ni), s);
        }
        if (whole) {  // all logit gradients of the pair at once: padded queries have zero gradients
          dqp.add_(at::mm(all.t(), kp).narrow(0, 0, n), s);
          dkp.addmm_(all, pt.qpad);
        }
      }
      flush();
    });
  });
  std::sort(dcoef_parts.begin(), dcoef_parts.end(),
            [](const auto& a, const auto& b) { return std::get<0>(a) < std::get<0>(b); });
  for (const auto& [first, h, part] : dcoef_parts) dcoef_all[h].add_(part);
  return {dq, dk, dcoef_all.view({heads, nk, m, r}), dbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fourier_reduce_forward, "fused Fourier KAN key reduction (forward)");
  m.def("backward", &fourier_reduce_backward, "fused Fourier KAN key reduction (backward)");
}
