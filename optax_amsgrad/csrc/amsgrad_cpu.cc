// One-pass AMSGrad for XLA:CPU, called through the XLA FFI.
//
// XLA:CPU compiles the update of m, v and v_max into one kernel per output
// array, each a full pass over memory. `AmsgradMoments` reads g, m, v and
// v_max once and writes m, v and v_max once, in place (28 bytes per float32
// parameter instead of 36 over three passes); `AmsgradStep` also applies the
// update to the params in the same pass (36 bytes, the least an AMSGrad step
// can move). The arithmetic is that of `_moments.moments`, `_rounding.store`
// and `store_max` (and, for the step, `_moments.direction` and the chain of
// `amsgrad`/`amsgradw`), operation for operation, each rounded as written
// (the build disables floating-point contraction).
//
// Operands: coefficients (compute dtype, shape [..., kNumCoefficients]),
// keys (uint32, shape [..., 2]: the stochastic-rounding stream keys of m and
// v), then g, [p,] m, v, v_max (shape [..., n]). Leading dimensions come from
// vmap: each of the `rows` slices has its own coefficients and keys, and
// element indices for the random bits restart at 0 in every row, as in the
// XLA path. Attribute `stochastic`: round m and v stochastically when stored
// narrower than the compute dtype (and v_max to nearest, kept nonzero, at
// least the stored v); `decay` (step only): add weight_decay * p to the
// update. Results: [p,] m, v, v_max, written over the operands when aliased.

// Python.h first, as the Python C API asks.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Everything the element loop calls is inlined into it, so that the copies of
// the loop compiled for AVX2 and AVX-512 (below) run that code throughout.
#define AMSGRAD_INLINE inline __attribute__((always_inline))

// Layout of the coefficient vector, shared with optax_amsgrad/_cpu_kernel.py.
enum Coefficient : int64_t {
  kB1,
  kB2,
  kOneMinusB1,
  kOneMinusB2,
  kNuMaxScale,
  // Read only by the step handler.
  kEps,
  kEpsRoot,
  kNumerator,
  kDenominator,
  kStepSize,
  kWeightDecay,
  kNumCoefficients,
};

// Multipliers of the random-bit streams, shared with _rounding._MULTIPLIERS.
constexpr uint32_t kMuMultiplier = 0xBB67AE85u;
constexpr uint32_t kNuMultiplier = 0x9E3779B9u;

// Elements per task: large enough that scheduling costs little, small enough
// to balance two threads on a few million elements.
constexpr int64_t kBlock = 1 << 15;

// bfloat16 values are handled as their bits (a struct would keep GCC from
// vectorizing the stores).
using BFloat16 = uint16_t;

AMSGRAD_INLINE uint32_t FloatBits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

AMSGRAD_INLINE float BitsFloat(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

template <typename T, typename C>
AMSGRAD_INLINE C Load(const T* data, int64_t i) {
  return static_cast<C>(data[i]);
}

template <>
AMSGRAD_INLINE float Load<BFloat16, float>(const BFloat16* data, int64_t i) {
  return BitsFloat(static_cast<uint32_t>(data[i]) << 16);
}

// The bfloat16 conversions below are branch-free integer arithmetic so that
// the loop vectorizes.

// NaN made quiet, in the top 16 bits, as XLA converts it.
AMSGRAD_INLINE uint32_t QuietNaNBits(uint32_t raw) { return raw | 0x00400000u; }

// float32 to bfloat16 as XLA converts: round to nearest even.
AMSGRAD_INLINE BFloat16 NearestBFloat16(float x) {
  const uint32_t raw = FloatBits(x);
  const uint32_t rounded = raw + 0x7FFFu + ((raw >> 16) & 1u);
  const uint32_t bits = x != x ? QuietNaNBits(raw) : rounded;
  return static_cast<BFloat16>(bits >> 16);
}

// _rounding._round_float32_to_bfloat16 for |x| at most the largest finite
// bfloat16, or infinite, or NaN, as every moment is (gradients are saturated
// at sqrt(float32 max) / 2, so |m| <= 9.2e18 and v, v_max <= 8.5e37 < 3.4e38):
// adds `increment` (or the round-half-to-even increment) to the 16 dropped
// bits and truncates. A carry lands on the next bfloat16 up, never past the
// largest finite one, and infinities keep their bits; so the XLA path's
// saturation at the largest bfloat16 and its special case for infinities are
// no-ops here. Adding to the sign-magnitude bits rounds the magnitude, as the
// XLA path does.
template <bool kNearestEven, bool kKeepNonzero>
AMSGRAD_INLINE BFloat16 RoundBoundedBFloat16(float x, uint32_t increment) {
  const uint32_t raw = FloatBits(x);
  if (kNearestEven) increment = 0x7FFFu + ((raw >> 16) & 1u);
  uint32_t rounded = (raw + increment) & 0xFFFF0000u;
  if (kKeepNonzero) {
    // x >= 0 here (a running maximum of squares): a positive value rounds
    // to at least the smallest positive bfloat16.
    rounded = (raw != 0 && rounded < 0x10000u) ? 0x10000u : rounded;
  }
  const uint32_t bits = x != x ? QuietNaNBits(raw) : rounded;
  return static_cast<BFloat16>(bits >> 16);
}

// Stores one moment: a plain copy when the storage is the compute dtype, a
// stochastic or nearest rounding to bfloat16 otherwise.
template <typename S, typename C>
struct Store {
  template <bool kStochastic>
  AMSGRAD_INLINE static S Moment(C x, uint32_t) { return static_cast<S>(x); }
  AMSGRAD_INLINE static S Max(C x) { return static_cast<S>(x); }
};

template <>
struct Store<BFloat16, float> {
  template <bool kStochastic>
  AMSGRAD_INLINE static BFloat16 Moment(float x, uint32_t bits) {
    return kStochastic ? RoundBoundedBFloat16<false, false>(x, bits >> 16)
                       : NearestBFloat16(x);
  }
  AMSGRAD_INLINE static BFloat16 Max(float x) {
    return RoundBoundedBFloat16<true, true>(x, 0);
  }
};

// jnp.maximum: NaN in either operand gives NaN. `a > b ? a : b` is one
// max instruction, which gives b when either is NaN.
template <typename C>
AMSGRAD_INLINE C Maximum(C a, C b) {
  const C larger = a > b ? a : b;
  return a != a ? a : larger;
}

// _moments.saturate for real g: finite magnitudes above `limit` come down to
// it; infinities and NaN pass. Each comparison is false for NaN, which keeps
// g; infinities are clipped and then restored.
template <typename C>
AMSGRAD_INLINE C Saturate(C g, C limit) {
  const C clipped = limit < g ? limit : (g < -limit ? -limit : g);
  return std::fabs(g) == std::numeric_limits<C>::infinity() ? g : clipped;
}

// The buffers of one leaf. `p` and `p_out` are set only when the step also
// applies the update to the params (the `AmsgradStep` handler).
template <typename G, typename M, typename V>
struct Leaf {
  const G* g;
  const G* p;
  const M* m;
  const V* v;
  const V* v_max;
  G* p_out;
  M* m_out;
  V* v_out;
  V* v_max_out;
};

// Elements [lo, hi) of one row: `k` its coefficients, `keys` its two stream
// keys, `row_begin` the flat position where the row starts.
template <typename G, typename M, typename V, typename C, bool kStochastic, bool kApply,
          bool kDecay>
AMSGRAD_INLINE void RowImpl(const C* k, const uint32_t* keys, const Leaf<G, M, V>& leaf,
                            int64_t row_begin, int64_t lo, int64_t hi) {
  const C b1 = k[kB1], b2 = k[kB2];
  const C one_minus_b1 = k[kOneMinusB1], one_minus_b2 = k[kOneMinusB2];
  const C scale = k[kNuMaxScale];
  const C eps = k[kEps], eps_root = k[kEpsRoot];
  const C numerator = k[kNumerator], denominator = k[kDenominator];
  const C step_size = k[kStepSize], weight_decay = k[kWeightDecay];
  const uint32_t mu_key = keys[0], nu_key = keys[1];
  constexpr bool kNarrowV = !std::is_same<V, C>::value;
  const C limit =
      static_cast<C>(std::sqrt(static_cast<double>(std::numeric_limits<C>::max())) / 2);
  const G* __restrict g = leaf.g;
  // The outputs may alias the inputs (the state is updated in place), but
  // every element is read before it is written and depends on no other.
  // A 32-bit induction variable: deriving the index from the 64-bit i in
  // every element costs AVX2 shuffles.
  uint32_t index = static_cast<uint32_t>(lo - row_begin);
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i, ++index) {
    const C grad = Saturate(Load<G, C>(g, i), limit);
    const C new_m = b1 * Load<M, C>(leaf.m, i) + one_minus_b1 * grad;
    const C new_v = b2 * Load<V, C>(leaf.v, i) + one_minus_b2 * (grad * grad);
    C new_v_max = Maximum(Load<V, C>(leaf.v_max, i), new_v * scale);
    const M stored_m =
        Store<M, C>::template Moment<kStochastic>(new_m, (index ^ mu_key) * kMuMultiplier);
    const V stored_v =
        Store<V, C>::template Moment<kStochastic>(new_v, (index ^ nu_key) * kNuMultiplier);
    V stored_v_max;
    if (kNarrowV && kStochastic) {
      // nu_max is at least the stored nu, rounded to nearest and kept nonzero.
      new_v_max = Maximum(new_v_max, Load<V, C>(&stored_v, 0) * scale);
      stored_v_max = Store<V, C>::Max(new_v_max);
    } else {
      stored_v_max = Store<V, C>::template Moment<false>(new_v_max, 0);
    }
    if (kApply) {
      // _transform._update from the stored moments, then the chain of
      // amsgrad/amsgradw: add_decayed_weights, scale_by_learning_rate and
      // apply_updates, each rounded in the params' dtype (== C here).
      const C m_u = Load<M, C>(&stored_m, 0), v_max_u = Load<V, C>(&stored_v_max, 0);
      C update = m_u * numerator / (std::sqrt(v_max_u * denominator + eps_root) + eps);
      const C param = Load<G, C>(leaf.p, i);
      if (kDecay) update = update + weight_decay * param;
      leaf.p_out[i] = static_cast<G>(param + step_size * update);
    }
    leaf.m_out[i] = stored_m;
    leaf.v_out[i] = stored_v;
    leaf.v_max_out[i] = stored_v_max;
  }
}

#define AMSGRAD_ROW_TEMPLATE                                                       \
  template <typename G, typename M, typename V, typename C, bool kStochastic,      \
            bool kApply, bool kDecay>
#define AMSGRAD_ROW_PARAMS                                                         \
  const C *k, const uint32_t *keys, const Leaf<G, M, V> &leaf, int64_t row_begin,  \
      int64_t lo, int64_t hi
#define AMSGRAD_ROW_CALL(name) \
  name<G, M, V, C, kStochastic, kApply, kDecay>(k, keys, leaf, row_begin, lo, hi)

AMSGRAD_ROW_TEMPLATE
void RowBaseline(AMSGRAD_ROW_PARAMS) { AMSGRAD_ROW_CALL(RowImpl); }

#if defined(__x86_64__) && defined(__GNUC__)
// The package is built for baseline x86-64 (SSE2), where the loop is
// compute-bound (the bfloat16 rounding most of all). Copies compiled for
// AVX2 and for AVX-512 (whose masked blends and 32-to-16-bit truncation
// halve the cost of the bfloat16 conversions) are chosen at run time.
AMSGRAD_ROW_TEMPLATE
__attribute__((target("avx2"))) void RowAvx2(AMSGRAD_ROW_PARAMS) {
  AMSGRAD_ROW_CALL(RowImpl);
}

AMSGRAD_ROW_TEMPLATE
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void RowAvx512(
    AMSGRAD_ROW_PARAMS) {
  AMSGRAD_ROW_CALL(RowImpl);
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa BestIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    return __builtin_cpu_supports("avx2") ? Isa::kAvx2 : Isa::kBaseline;
  }();
  return isa;
}
#endif

AMSGRAD_ROW_TEMPLATE
void Row(AMSGRAD_ROW_PARAMS) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (BestIsa()) {
    case Isa::kAvx512:
      AMSGRAD_ROW_CALL(RowAvx512);
      return;
    case Isa::kAvx2:
      AMSGRAD_ROW_CALL(RowAvx2);
      return;
    case Isa::kBaseline:
      break;
  }
#endif
  AMSGRAD_ROW_CALL(RowBaseline);
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs body(lo, hi) over [0, n) in blocks on the caller and the intra-op
// thread pool. Blocks are claimed from a shared counter, so a task the pool
// starts late finds nothing left and returns: the caller never waits for a
// task that has not started, and cannot deadlock on a busy pool.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  auto progress = std::make_shared<Progress>();
  auto work = [progress, blocks, n, body]() {
    for (;;) {
      const int64_t block = progress->next.fetch_add(1);
      if (block >= blocks) return;
      body(block * kBlock, std::min(n, (block + 1) * kBlock));
      if (progress->done.fetch_add(1) + 1 == blocks) {
        std::lock_guard<std::mutex> lock(progress->mutex);
        progress->finished.notify_all();
      }
    }
  };
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(progress->mutex);
  progress->finished.wait(lock, [&] { return progress->done.load() == blocks; });
}

// Every (compute, g, m, v) dtype combination the handlers are built for.
#define AMSGRAD_FOR_EACH_DTYPES(CASE)                              \
  CASE(F64, F64, F64, F64, double, double, double, double)         \
  CASE(F32, F32, F32, F32, float, float, float, float)             \
  CASE(F32, F32, BF16, BF16, float, float, BFloat16, BFloat16)     \
  CASE(F32, F32, F32, BF16, float, float, float, BFloat16)         \
  CASE(F32, F32, BF16, F32, float, float, BFloat16, float)         \
  CASE(F32, BF16, BF16, BF16, float, BFloat16, BFloat16, BFloat16) \
  CASE(F32, BF16, BF16, F32, float, BFloat16, BFloat16, float)     \
  CASE(F32, BF16, F32, F32, float, BFloat16, float, float)         \
  CASE(F32, BF16, F32, BF16, float, BFloat16, float, BFloat16)

template <typename T>
T* Data(const ffi::AnyBuffer& buffer) {
  return reinterpret_cast<T*>(buffer.untyped_data());
}

template <typename T>
T* Data(ffi::Result<ffi::AnyBuffer>& buffer) {
  return reinterpret_cast<T*>(buffer->untyped_data());
}

// Splits [0, n) into rows of `row_size` elements, each with its own
// coefficients and keys, and runs them on the thread pool.
template <typename G, typename M, typename V, typename C, bool kApply, bool kDecay>
void RunRows(ffi::ThreadPool& pool, const C* k, const uint32_t* keys, const Leaf<G, M, V>& leaf,
             int64_t n, int64_t row_size, bool stochastic) {
  ParallelFor(pool, n, [=](int64_t lo, int64_t hi) {
    // A block may span rows (vmap): split it where the coefficients change.
    while (lo < hi) {
      const int64_t row = lo / row_size;
      const int64_t row_begin = row * row_size;
      const int64_t end = std::min(hi, row_begin + row_size);
      const C* row_k = k + row * kNumCoefficients;
      const uint32_t* row_keys = keys + 2 * row;
      if (stochastic) {
        Row<G, M, V, C, true, kApply, kDecay>(row_k, row_keys, leaf, row_begin, lo, end);
      } else {
        Row<G, M, V, C, false, kApply, kDecay>(row_k, row_keys, leaf, row_begin, lo, end);
      }
      lo = end;
    }
  });
}

// Checks the operands and returns the number of rows (batch elements), or an
// error message.
const char* CheckOperands(const ffi::AnyBuffer& coefficients, const ffi::AnyBuffer& keys,
                          const ffi::AnyBuffer& g, const ffi::AnyBuffer& m,
                          const ffi::AnyBuffer& v, const ffi::AnyBuffer& v_max,
                          int64_t* rows) {
  using DT = ffi::DataType;
  const int64_t n = g.element_count();
  *rows = coefficients.element_count() / kNumCoefficients;
  if (keys.element_type() != DT::U32 || v_max.element_type() != v.element_type() ||
      m.element_count() != n || v.element_count() != n || v_max.element_count() != n) {
    return "mismatched operands";
  }
  if (*rows == 0 || *rows * kNumCoefficients != coefficients.element_count() ||
      keys.element_count() != 2 * *rows || n % *rows != 0) {
    return "inconsistent batch shapes";
  }
  return nullptr;
}

ffi::Error MomentsDispatch(ffi::ThreadPool pool, ffi::AnyBuffer coefficients,
                           ffi::AnyBuffer keys, ffi::AnyBuffer g, ffi::AnyBuffer m,
                           ffi::AnyBuffer v, ffi::AnyBuffer v_max, bool stochastic,
                           ffi::Result<ffi::AnyBuffer> m_out,
                           ffi::Result<ffi::AnyBuffer> v_out,
                           ffi::Result<ffi::AnyBuffer> v_max_out) {
  using DT = ffi::DataType;
  int64_t rows;
  if (const char* error = CheckOperands(coefficients, keys, g, m, v, v_max, &rows)) {
    return ffi::Error::InvalidArgument(std::string("amsgrad_moments: ") + error);
  }
  const int64_t n = g.element_count();
  const DT c = coefficients.element_type();
  const DT gt = g.element_type(), mt = m.element_type(), vt = v.element_type();
#define AMSGRAD_CASE(CT, GT, MT, VT, C, G, M, V)                                   \
  if (c == DT::CT && gt == DT::GT && mt == DT::MT && vt == DT::VT) {               \
    const Leaf<G, M, V> leaf{Data<const G>(g), nullptr, Data<const M>(m),          \
                             Data<const V>(v), Data<const V>(v_max), nullptr,      \
                             Data<M>(m_out), Data<V>(v_out), Data<V>(v_max_out)};  \
    RunRows<G, M, V, C, false, false>(pool, Data<const C>(coefficients),           \
                                      Data<const uint32_t>(keys), leaf, n,         \
                                      n / rows, stochastic);                       \
    return ffi::Error::Success();                                                  \
  }
  AMSGRAD_FOR_EACH_DTYPES(AMSGRAD_CASE)
#undef AMSGRAD_CASE
  return ffi::Error::InvalidArgument("amsgrad_moments: unsupported dtypes");
}

ffi::Error StepDispatch(ffi::ThreadPool pool, ffi::AnyBuffer coefficients,
                        ffi::AnyBuffer keys, ffi::AnyBuffer g, ffi::AnyBuffer p,
                        ffi::AnyBuffer m, ffi::AnyBuffer v, ffi::AnyBuffer v_max,
                        bool stochastic, bool decay, ffi::Result<ffi::AnyBuffer> p_out,
                        ffi::Result<ffi::AnyBuffer> m_out,
                        ffi::Result<ffi::AnyBuffer> v_out,
                        ffi::Result<ffi::AnyBuffer> v_max_out) {
  using DT = ffi::DataType;
  int64_t rows;
  if (const char* error = CheckOperands(coefficients, keys, g, m, v, v_max, &rows)) {
    return ffi::Error::InvalidArgument(std::string("amsgrad_step: ") + error);
  }
  const int64_t n = g.element_count();
  if (p.element_type() != g.element_type() || p.element_count() != n) {
    return ffi::Error::InvalidArgument("amsgrad_step: params unlike the gradients");
  }
  const DT c = coefficients.element_type();
  const DT gt = g.element_type(), mt = m.element_type(), vt = v.element_type();
  // Params are updated in their own dtype, which must be the compute dtype.
#define AMSGRAD_CASE(CT, GT, MT, VT, C, G, M, V)                                    \
  if (c == DT::CT && gt == DT::GT && mt == DT::MT && vt == DT::VT &&                \
      std::is_same<G, C>::value) {                                                  \
    const Leaf<G, M, V> leaf{Data<const G>(g), Data<const G>(p), Data<const M>(m),  \
                             Data<const V>(v), Data<const V>(v_max), Data<G>(p_out), \
                             Data<M>(m_out), Data<V>(v_out), Data<V>(v_max_out)};   \
    if (decay) {                                                                    \
      RunRows<G, M, V, C, true, true>(pool, Data<const C>(coefficients),            \
                                      Data<const uint32_t>(keys), leaf, n,          \
                                      n / rows, stochastic);                        \
    } else {                                                                        \
      RunRows<G, M, V, C, true, false>(pool, Data<const C>(coefficients),           \
                                       Data<const uint32_t>(keys), leaf, n,         \
                                       n / rows, stochastic);                       \
    }                                                                               \
    return ffi::Error::Success();                                                   \
  }
  AMSGRAD_FOR_EACH_DTYPES(AMSGRAD_CASE)
#undef AMSGRAD_CASE
  return ffi::Error::InvalidArgument("amsgrad_step: unsupported dtypes");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradMoments, MomentsDispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // coefficients
                                  .Arg<ffi::AnyBuffer>()  // keys
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // m
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // v_max
                                  .Attr<bool>("stochastic")
                                  .Ret<ffi::AnyBuffer>()   // m
                                  .Ret<ffi::AnyBuffer>()   // v
                                  .Ret<ffi::AnyBuffer>());  // v_max

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradStep, StepDispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // coefficients
                                  .Arg<ffi::AnyBuffer>()  // keys
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // p
                                  .Arg<ffi::AnyBuffer>()  // m
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // v_max
                                  .Attr<bool>("stochastic")
                                  .Attr<bool>("decay")
                                  .Ret<ffi::AnyBuffer>()   // p
                                  .Ret<ffi::AnyBuffer>()   // m
                                  .Ret<ffi::AnyBuffer>()   // v
                                  .Ret<ffi::AnyBuffer>());  // v_max

// The Python module: `handlers()` gives the handlers as capsules for
// jax.ffi.register_ffi_target.
namespace {

PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* handlers = PyDict_New();
  if (handlers == nullptr) return nullptr;
  const std::pair<const char*, void*> entries[] = {
      {"moments", reinterpret_cast<void*>(&AmsgradMoments)},
      {"step", reinterpret_cast<void*>(&AmsgradStep)},
  };
  for (const auto& [name, handler] : entries) {
    PyObject* capsule = PyCapsule_New(handler, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(handlers, name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(handlers);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return handlers;
}

PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS,
     "The XLA FFI handlers of this module, by name, as PyCapsules."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_amsgrad_cpu",
    "One-pass AMSGrad moment update for XLA:CPU.", -1, kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__amsgrad_cpu() { return PyModule_Create(&kModule); }
