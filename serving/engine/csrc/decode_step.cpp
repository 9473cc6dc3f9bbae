// One decode step of a dense Llama / Llama 4 model on CPU, in one C++ call.
//
// A decode step at small batch is a few hundred tiny ops; from Python (even torch.compile'd)
// each pays dispatch, guard and wrapper costs that dwarf its arithmetic. Here the layer loop,
// norms, RoPE, KV writes and paged attention are plain C++ loops over float32 rows, and only
// the projections go to ATen (torch's int4 / int8 / float GEMM kernels) or, for quantized weights
// on CPUs with AVX-512 VNNI, to herd's int8-activation kernels (vnni_matmul.h). Semantics follow
// models/llama4/model.py (see serving/engine/native_decode.py for who may use it). A bfloat16
// model keeps its KV cache in bfloat16 and rounds to bfloat16 wherever its eager ops round
// (after each norm, residual add, RoPE, attention, SiLU and product), so it computes what the
// eager model does, up to summation order. A float32 model may keep its KV cache in bfloat16
// (kv_cache_dtype): keys and values round as they are stored, nothing else does.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "vnni_matmul.h"

namespace {

void round_to_bf16(at::Tensor& t);

enum Kind : int64_t { kDense = 0, kInt4 = 1, kInt8 = 2, kInt4Vnni = 3, kInt8Vnni = 4 };

struct Linear {
  int64_t kind;
  // dense: (N, K) float32 or bf16; int4: torch's packed codes; int8: (N, K) int8;
  // int4 VNNI: (N / 16, K / 32, 4, 64) uint8; int8 VNNI: (N / 16, K / 4, 16, 4) int8 (vnni_matmul.h)
  at::Tensor weight;
  // int4 (either): Int4Linear.scales_zeros (bf16); int8 (either): per-row scales (bf16);
  // dense bf16: a float32 copy of the weight for inputs of `group` rows or more (cpu_gemm.py), or empty
  at::Tensor scales;
  int64_t group;

  at::Tensor operator()(const at::Tensor& x) const {
    switch (kind) {
      case kInt4Vnni:
      case kInt8Vnni:
        return vnni(x);
      case kInt4:
        return at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), weight, group, scales).to(at::kFloat);
      case kInt8:
        return at::_weight_int8pack_mm(x.to(at::kBFloat16), weight, scales).to(at::kFloat);
      default:  // float32 or bfloat16 weights; x holds values exact in either
        if (weight.scalar_type() == at::kFloat) return at::linear(x, weight);
        if (scales.numel() && x.size(0) >= group) {  // rounded as the bf16 GEMM's output is
          at::Tensor y = at::linear(x, scales);
          round_to_bf16(y);
          return y;
        }
        return at::linear(x.to(weight.scalar_type()), weight).to(at::kFloat);
    }
  }

  at::Tensor vnni(const at::Tensor& x) const {
    const int64_t B = x.size(0), K = x.size(1), G = K / herd::kQuantGroup;
    const bool int4 = kind == kInt4Vnni;
    const int64_t N = weight.size(0) * herd::kRows;
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat &&
                    K == (int4 ? weight.size(1) * herd::kQuantGroup : weight.size(1) * 4),
                "a VNNI linear got input ", x.sizes(), " for weight ", weight.sizes());
    // One scratch allocation per call (this runs ~120 times a step): per group of each row its
    // scale, sum and sum of q (4 bytes each), then per row int8_matmul's offset, then q itself.
    std::vector<int32_t> scratch(3 * B * G + B + (B * K + 3) / 4);
    float* scale = reinterpret_cast<float*>(scratch.data());
    float* sum = scale + B * G;
    int32_t* qsum = scratch.data() + 2 * B * G;
    float* offset = reinterpret_cast<float*>(qsum + B * G);
    int8_t* q = reinterpret_cast<int8_t*>(offset + B);
    at::Tensor y = at::empty({B, N}, x.options());
    herd::quantize_rows(x.data_ptr<float>(), B, K, q, scale, sum, qsum);
    const auto* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
    if (int4) {
      herd::int4_matmul(q, scale, sum, qsum, B, K, weight.data_ptr<uint8_t>(), s, group, N, y.data_ptr<float>(),
                        at::get_num_threads());
    } else {
      herd::int8_offsets(scale, qsum, B, K, offset);
      herd::int8_matmul(q, scale, offset, B, K, weight.data_ptr<int8_t>(), s, N, y.data_ptr<float>(),
                        at::get_num_threads());
    }
    return y;
  }
};

struct Layer {
  at::Tensor in_norm, post_norm, k_cache, v_cache;  // caches (blocks, block_size, K, d), model dtype
  Linear qkv, o, gate_up, down;
  bool rope;
  double qk_norm_eps;  // < 0: no qk norm
  bool temperature;
  double floor_scale, attn_scale;
  int64_t chunk;  // 0: global attention
};

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) {  // the nearest bfloat16, ties to even (as torch rounds)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  p->x = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// The nearest bfloat16 (ties to even), as a float; in plain arithmetic so that loops vectorize.
inline float bf16_round(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

// In place, in one pass (no bfloat16 tensor and back): float32 values -> the nearest bfloat16s.
void round_to_bf16(at::Tensor& t) {
  float* p = t.data_ptr<float>();
  at::parallel_for(0, t.numel(), 16384, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) p[i] = bf16_round(p[i]);
  });
}

// Rounds where the eager model's dtype rounds: bfloat16 models do, float32 ones not.
struct Rounding {
  bool bf16;
  float operator()(float v) const { return bf16 ? bf16_round(v) : v; }
};

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * as_float(b[i]);
  return acc;
}

// exp(x) to about 1 ulp (Cephes' expf: 2^k * e^r, |r| <= ln2 / 2) in plain arithmetic, so
// loops over it vectorize (libm's expf does not, and softmax and SiLU call it per element).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

// res = first ? x : x + res; out = res / rms(res) * w (w may be null: weightless).
void add_rms_norm(const float* x, float* res, const float* w, float* out, int64_t D, double eps, bool first,
                  Rounding R) {
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) {
    const float r = first ? x[i] : R(x[i] + res[i]);
    res[i] = r;
    ss += static_cast<double>(r) * r;
  }
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i) out[i] = w ? R(R(res[i] * inv) * w[i]) : R(res[i] * inv);
}

void rms_norm_inplace(float* x, int64_t D, double eps, Rounding R) {
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i) x[i] = R(x[i] * inv);
}

void rotate(float* x, const float* cos, const float* sin, int64_t d, bool interleaved, Rounding R) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float x1 = x[a], x2 = x[b];
    x[a] = R(x1 * cos[i] - x2 * sin[i]);
    x[b] = R(x2 * cos[i] + x1 * sin[i]);
  }
}

constexpr int64_t kRowGrain = 16;  // rows per thread for the elementwise work (batch 1: no fork)

class DecodeStep {
 public:
  DecodeStep(at::Tensor embed, at::Tensor final_norm, at::Tensor inv_freq, double eps, int64_t n_heads,
             int64_t n_kv, int64_t head_dim, double scale, bool interleaved)
      : embed_(std::move(embed)), final_norm_(std::move(final_norm)), inv_freq_(std::move(inv_freq)),
        eps_(eps), H_(n_heads), K_(n_kv), d_(head_dim), scale_(scale), interleaved_(interleaved),
        dtype_(embed_.scalar_type()), R_{dtype_ == at::kBFloat16} {
    TORCH_CHECK((dtype_ == at::kFloat || dtype_ == at::kBFloat16) && embed_.is_contiguous(),
                "embed must be contiguous float32 or bfloat16");
    TORCH_CHECK(inv_freq_.numel() * 2 == d_, "inv_freq has ", inv_freq_.numel(), " entries for head_dim ", d_);
    TORCH_CHECK(H_ % K_ == 0, "n_heads ", H_, " is not a multiple of n_kv ", K_);
  }

  void add_layer(at::Tensor in_norm, at::Tensor post_norm, at::Tensor k_cache, at::Tensor v_cache,
                 std::vector<Linear> linears, bool rope, double qk_norm_eps, bool temperature,
                 double floor_scale, double attn_scale, int64_t chunk) {
    TORCH_CHECK(linears.size() == 4, "a layer has 4 linears (qkv, o, gate_up, down)");
    if (layers_.empty()) kv_dtype_ = k_cache.scalar_type();
    for (const auto& c : {k_cache, v_cache}) {
      TORCH_CHECK((kv_dtype_ == at::kFloat || kv_dtype_ == at::kBFloat16) && c.scalar_type() == kv_dtype_ &&
                      c.is_contiguous() && c.dim() == 4 && c.size(2) == K_ && c.size(3) == d_,
                  "KV caches must be contiguous float32 or bfloat16, all alike (blocks, block_size, ", K_, ", ",
                  d_, ")");
    }
    layers_.push_back(Layer{std::move(in_norm), std::move(post_norm), std::move(k_cache), std::move(v_cache),
                            linears[0], linears[1], linears[2], linears[3], rope, qk_norm_eps, temperature,
                            floor_scale, attn_scale, chunk});
  }

  // ids, positions, slots (B,) int64; block_table (B, nb) int64 -> final hidden states (B, D)
  // in the model's dtype.
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& block_table) const {
    const int64_t B = ids.size(0), half = d_ / 2;
    TORCH_CHECK(positions.size(0) == B && slots.size(0) == B && block_table.size(0) == B,
                "ids, positions, slots and block_table disagree on the batch size");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* table = block_table.data_ptr<int64_t>();
    const int64_t nb = block_table.size(1);

    // cos/sin of every token's angles, shared by all RoPE layers.
    std::vector<float> cos(B * half), sin(B * half);
    const float* inv_freq = inv_freq_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(pos[b]) * inv_freq[i];
        cos[b * half + i] = std::cos(f);
        sin[b * half + i] = std::sin(f);
      }

    at::Tensor x = embed_.index_select(0, ids).to(at::kFloat);
    at::Tensor res = at::empty_like(x), h = at::empty_like(x), attn = at::empty({B, H_ * d_}, x.options());
    const Rounding R = R_;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      norm_rows(x, res, L.in_norm, h, l == 0);
      at::Tensor qkv = L.qkv(h);
      if (kv_dtype_ == at::kBFloat16) {
        prepare_qkv<c10::BFloat16>(L, qkv.data_ptr<float>(), B, pos, slot, cos.data(), sin.data());
        attend<c10::BFloat16>(L, qkv.data_ptr<float>(), attn.data_ptr<float>(), B, pos, table, nb);
      } else {
        prepare_qkv<float>(L, qkv.data_ptr<float>(), B, pos, slot, cos.data(), sin.data());
        attend<float>(L, qkv.data_ptr<float>(), attn.data_ptr<float>(), B, pos, table, nb);
      }
      at::Tensor o = L.o(attn);
      norm_rows(o, res, L.post_norm, h, false);
      at::Tensor gu = L.gate_up(h);
      const int64_t I = gu.size(1) / 2;
      at::Tensor act = at::empty({B, I}, x.options());
      const float* g = gu.data_ptr<float>();
      float* a = act.data_ptr<float>();
      at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const float* gate = g + b * 2 * I;
          const float* up = gate + I;
          float* ab = a + b * I;
#pragma omp simd
          for (int64_t i = 0; i < I; ++i) ab[i] = R(R(gate[i] / (1.0f + fast_exp(-gate[i]))) * up[i]);
        }
      });
      x = L.down(act);
    }
    at::Tensor out = at::empty_like(x);
    norm_rows(x, res, final_norm_, out, false);
    return out.to(dtype_);
  }

 private:
  void norm_rows(const at::Tensor& x, at::Tensor& res, const at::Tensor& w, at::Tensor& out, bool first) const {
    const int64_t B = x.size(0), D = x.size(1);
    const float* xp = x.data_ptr<float>();
    float* rp = res.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) add_rms_norm(xp + b * D, rp + b * D, wp, op + b * D, D, eps_, first, R_);
    });
  }

  // RoPE / qk-norm / temperature on q and k in place, then k and v into the cache.
  template <typename T>
  void prepare_qkv(const Layer& L, float* qkv, int64_t B, const int64_t* pos, const int64_t* slot,
                   const float* cos, const float* sin) const {
    const int64_t d = d_, H = H_, K = K_, half = d_ / 2, row = (H + 2 * K) * d;
    const Rounding R = R_;
    T* kc = L.k_cache.data_ptr<T>();
    T* vc = L.v_cache.data_ptr<T>();
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* q = qkv + b * row;
        float* k = q + H * d;
        const float* v = k + K * d;
        if (L.rope) {
          for (int64_t hh = 0; hh < H; ++hh) rotate(q + hh * d, cos + b * half, sin + b * half, d, interleaved_, R);
          for (int64_t kk = 0; kk < K; ++kk) rotate(k + kk * d, cos + b * half, sin + b * half, d, interleaved_, R);
          if (L.qk_norm_eps >= 0) {
            for (int64_t hh = 0; hh < H; ++hh) rms_norm_inplace(q + hh * d, d, L.qk_norm_eps, R);
            for (int64_t kk = 0; kk < K; ++kk) rms_norm_inplace(k + kk * d, d, L.qk_norm_eps, R);
          }
        } else if (L.temperature) {
          const float fs = static_cast<float>(L.floor_scale), as = static_cast<float>(L.attn_scale);
          const float t = std::log1p(std::floor((static_cast<float>(pos[b]) + 1.0f) / fs)) * as + 1.0f;
          for (int64_t i = 0; i < H * d; ++i) q[i] = R(q[i] * t);
        }
        for (int64_t i = 0; i < K * d; ++i) {
          store(kc + slot[b] * K * d + i, k[i]);
          store(vc + slot[b] * K * d + i, v[i]);
        }
      }
    });
  }

  // Each (sequence, KV head): its G query heads against the keys it may see, read in place
  // from the paged cache (no gather), softmax in float32.
  template <typename T>
  void attend(const Layer& L, const float* qkv, float* out, int64_t B, const int64_t* pos, const int64_t* table,
              int64_t nb) const {
    const int64_t d = d_, H = H_, K = K_, G = H_ / K_, row = (H + 2 * K) * d;
    const int64_t bs = L.k_cache.size(1);
    const T* kc = L.k_cache.data_ptr<T>();
    const T* vc = L.v_cache.data_ptr<T>();
    const Rounding R = R_;
    const float scale = static_cast<float>(scale_);
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, kv = task % K, p = pos[b];
        const int64_t lo = L.chunk > 0 ? p / L.chunk * L.chunk : 0, n = p - lo + 1;
        TORCH_CHECK((p / bs) < nb, "position ", p, " is past the block table");
        const float* q = qkv + b * row + kv * G * d;
        scores.assign(G * n, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = lo + j;
          const T* key = kc + ((table[b * nb + t / bs] * bs + t % bs) * K + kv) * d;
          for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot(q + g * d, key, d) * scale;
        }
        float* o = out + b * H * d + kv * G * d;
        std::fill(o, o + G * d, 0.f);
        std::vector<float> total(G);
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores.data() + g * n;
          const float m = *std::max_element(s, s + n);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            s[j] = fast_exp(s[j] - m);
            sum += s[j];
          }
          total[g] = sum;
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = lo + j;
          const T* val = vc + ((table[b * nb + t / bs] * bs + t % bs) * K + kv) * d;
          for (int64_t g = 0; g < G; ++g) {
            const float w = scores[g * n + j];
            float* og = o + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) og[i] += w * as_float(val[i]);
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int64_t i = 0; i < d; ++i) o[g * d + i] = R(o[g * d + i] / total[g]);
      }
    });
  }

  at::Tensor embed_, final_norm_, inv_freq_;
  double eps_;
  int64_t H_, K_, d_;
  double scale_;
  bool interleaved_;
  at::ScalarType dtype_;  // the model's: activations round to it
  at::ScalarType kv_dtype_ = at::kFloat;  // the KV caches' (the model's, or bfloat16 under a float32 one)
  Rounding R_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Linear>(m, "Linear")
      .def(py::init([](int64_t kind, at::Tensor weight, at::Tensor scales, int64_t group) {
             TORCH_CHECK(kind >= kDense && kind <= kInt8Vnni, "unknown linear kind ", kind);
             TORCH_CHECK(kind < kInt4Vnni || herd::vnni_supported(), "this CPU has no AVX-512 VNNI");
             return Linear{kind, std::move(weight), std::move(scales), group};
           }),
           py::arg("kind"), py::arg("weight"), py::arg("scales"), py::arg("group"))
      .def("__call__", &Linear::operator(), py::call_guard<py::gil_scoped_release>());  // (B, K) float32
  m.def("vnni_supported", &herd::vnni_supported);
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, double, int64_t, int64_t, int64_t, double, bool>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>());
}
