// Multi-tensor SAGE updates on CPU: AdamW-SAGE and Adamax-SAGE (docs/algorithms.md §1).
//
// One call updates every tensor of a parameter group: the tensors are cut into chunks of
// kChunk elements and one parallel loop (ATen's OpenMP pool, torch.get_num_threads() threads)
// runs over all chunks of all tensors. Each element is read once (θ, g and the state) and written
// once, with no temporaries, so the update streams at memory bandwidth and the cost of a call
// does not grow with the number of tensors beyond a few microseconds of bookkeeping.
//
// The maths is the same algebra as the compiled kernels in schedules/sage/adamw.py and
// schedules/sage/adamax.py (see schedules/sage/optimizer.py for why the numerator uses the
// previous average). Tensors of dtype float and double are computed in their own precision;
// bfloat16 and half are computed in float and rounded once when stored. Built by
// schedules/sage/cpu_kernel.py with -O3 -march=native.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per work item (64K: ~1700 items for BERT-base)

struct Work {
  int64_t tensor, begin, end;
};

// Checks the lists and cuts the tensors into chunks. `state` holds the state lists, of which
// the last (the sensitivity average Ī) may be empty for a group without SAGE.
std::vector<Work> plan(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<std::vector<at::Tensor>>& state) {
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n, "sage_cpu: ", grads.size(), " gradients for ", n, " parameters");
  std::vector<Work> work;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    auto same = [&](const at::Tensor& t, const char* what) {
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == p.scalar_type() &&
                      t.numel() == p.numel() && t.is_contiguous(),
                  "sage_cpu: ", what, " ", i, " must be a contiguous CPU tensor of the parameter's "
                  "dtype and size");
    };
    same(p, "parameter");
    same(grads[i], "gradient");
    for (const auto& list : state) {
      if (!list.empty()) {
        TORCH_CHECK(list.size() == n, "sage_cpu: state list of length ", list.size(), " for ", n,
                    " parameters");
        same(list[i], "state tensor");
      }
    }
    for (int64_t a = 0; a < p.numel(); a += kChunk) {
      work.push_back({static_cast<int64_t>(i), a, std::min(p.numel(), a + kChunk)});
    }
  }
  return work;
}

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t) {
  return t.data_ptr<scalar_t>();
}

// AdamW-SAGE, c = bias-correction of Ī:  θ ← (θ - step_size·β3·|c_{t-1}·I - Ī|/(Ī_t + c_t·ε²)
//                                           · m/(sqrt(v) + ε))·(1 - lr·λ)
// and without S (a plain group) the same without the SAGE factor.
template <typename scalar_t, bool kSage>
void adamw_range(const Work& w, const std::vector<at::Tensor>& P, const std::vector<at::Tensor>& G,
                 const std::vector<at::Tensor>& M, const std::vector<at::Tensor>& V,
                 const std::vector<at::Tensor>& S, const at::opmath_type<scalar_t>* k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t b1 = k[0], b2 = k[1], b3 = k[2], c_prev = k[3], c_eps2 = k[4], step_size = k[5],
                 eps = k[6], keep = k[7];
  const opmath_t ob1 = 1 - b1, ob2 = 1 - b2, ob3 = 1 - b3;
  scalar_t* __restrict__ p = ptr<scalar_t>(P[w.tensor]);
  const scalar_t* __restrict__ g = ptr<scalar_t>(G[w.tensor]);
  scalar_t* __restrict__ m = ptr<scalar_t>(M[w.tensor]);
  scalar_t* __restrict__ v = ptr<scalar_t>(V[w.tensor]);
  scalar_t* __restrict__ s = kSage ? ptr<scalar_t>(S[w.tensor]) : nullptr;
#pragma omp simd
  for (int64_t j = w.begin; j < w.end; ++j) {
    const opmath_t gj = g[j], pj = p[j];
    const opmath_t mj = static_cast<opmath_t>(m[j]) * b1 + gj * ob1;
    const opmath_t vj = static_cast<opmath_t>(v[j]) * b2 + gj * gj * ob2;
    opmath_t update;
    if constexpr (kSage) {
      const opmath_t sj = s[j];
      const opmath_t sens = std::abs(pj * gj);
      const opmath_t num = std::abs(sens * c_prev - sj) * b3;
      const opmath_t s_new = sj * b3 + sens * ob3;
      update = num * mj / ((s_new + c_eps2) * (std::sqrt(vj) + eps));  // one division
      s[j] = s_new;
    } else {
      update = mj / (std::sqrt(vj) + eps);
    }
    p[j] = (pj - step_size * update) * keep;
    m[j] = mj;
    v[j] = vj;
  }
}

// Adamax-SAGE:  u ← max(β2·u, |g| + ε),  d = m/(u + ε) + λ·θ,
//               θ ← θ - lr·β3·|I - Ī_{t-1}|/(Ī_t + ε²)·d   (plain group: θ ← θ - lr·d)
// max(a, b) is written so that a NaN gradient propagates into u, like torch.maximum.
template <typename scalar_t, bool kSage>
void adamax_range(const Work& w, const std::vector<at::Tensor>& P, const std::vector<at::Tensor>& G,
                  const std::vector<at::Tensor>& M, const std::vector<at::Tensor>& U,
                  const std::vector<at::Tensor>& S, const at::opmath_type<scalar_t>* k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t b1 = k[0], b2 = k[1], b3 = k[2], eps = k[3], eps2 = k[4], wd = k[5], lr = k[6];
  const opmath_t ob1 = 1 - b1, ob3 = 1 - b3;
  scalar_t* __restrict__ p = ptr<scalar_t>(P[w.tensor]);
  const scalar_t* __restrict__ g = ptr<scalar_t>(G[w.tensor]);
  scalar_t* __restrict__ m = ptr<scalar_t>(M[w.tensor]);
  scalar_t* __restrict__ u = ptr<scalar_t>(U[w.tensor]);
  scalar_t* __restrict__ s = kSage ? ptr<scalar_t>(S[w.tensor]) : nullptr;
#pragma omp simd
  for (int64_t j = w.begin; j < w.end; ++j) {
    const opmath_t gj = g[j], pj = p[j];
    const opmath_t mj = static_cast<opmath_t>(m[j]) * b1 + gj * ob1;
    const opmath_t decayed = static_cast<opmath_t>(u[j]) * b2, gabs = std::abs(gj) + eps;
    const opmath_t uj = decayed > gabs ? decayed : gabs;
    const opmath_t u_eps = uj + eps;
    opmath_t d;
    if constexpr (kSage) {
      const opmath_t sj = s[j];
      const opmath_t sens = std::abs(pj * gj);
      const opmath_t num = std::abs(sens - sj) * b3;
      const opmath_t s_new = sj * b3 + sens * ob3;
      d = num * (mj + wd * pj * u_eps) / ((s_new + eps2) * u_eps);  // one division
      s[j] = s_new;
    } else {
      d = mj / u_eps + wd * pj;
    }
    p[j] = pj - lr * d;
    m[j] = mj;
    u[j] = uj;
  }
}

// Runs `range` over all work items in parallel, for the dtype of the parameters.
template <typename Fn>
void run(const std::vector<at::Tensor>& P, const std::vector<at::Tensor>& G,
         const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
         const std::vector<at::Tensor>& S, const std::vector<double>& coefficients, Fn&& kernel_for) {
  const auto work = plan(P, G, {A, B, S});
  if (work.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, P[0].scalar_type(), "sage_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> k(coefficients.begin(), coefficients.end());
    auto range = kernel_for(static_cast<scalar_t*>(nullptr));
    at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) range(work[i], P, G, A, B, S, k.data());
    });
  });
}

void adamw_sage_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& exp_avg_sens, double beta1, double beta2,
                 double beta3, double c_prev, double c_eps2, double step_size, double eps,
                 double keep) {
  const bool sage = !exp_avg_sens.empty();
  run(params, grads, exp_avgs, exp_avg_sqs, exp_avg_sens,
      {beta1, beta2, beta3, c_prev, c_eps2, step_size, eps, keep}, [sage](auto* tag) {
        using scalar_t = std::remove_pointer_t<decltype(tag)>;
        return sage ? &adamw_range<scalar_t, true> : &adamw_range<scalar_t, false>;
      });
}

void adamax_sage_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_infs,
                  const std::vector<at::Tensor>& exp_avg_sens, double beta1, double beta2,
                  double beta3, double eps, double eps2, double weight_decay, double lr) {
  const bool sage = !exp_avg_sens.empty();
  run(params, grads, exp_avgs, exp_infs, exp_avg_sens,
      {beta1, beta2, beta3, eps, eps2, weight_decay, lr}, [sage](auto* tag) {
        using scalar_t = std::remove_pointer_t<decltype(tag)>;
        return sage ? &adamax_range<scalar_t, true> : &adamax_range<scalar_t, false>;
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaptune: multi-tensor SAGE updates on CPU";
  m.def("adamw_sage_", &adamw_sage_, "AdamW-SAGE update of a group's tensors, in place",
        py::call_guard<py::gil_scoped_release>());
  m.def("adamax_sage_", &adamax_sage_, "Adamax-SAGE update of a group's tensors, in place",
        py::call_guard<py::gil_scoped_release>());
}
