// One-pass AMSGrad for XLA:CPU, called through the XLA FFI.
//
// XLA:CPU compiles the update of m, v and v_max into one kernel per output
// array, each a full pass over memory. `AmsgradMoments` reads g, m, v and
// v_max once and writes m, v and v_max once, in place (28 bytes per float32
// parameter instead of 36 over three passes); `AmsgradStep` also applies the
// update to the params in the same pass (36 bytes, the least an AMSGrad step
// can move). The arithmetic is that of `_math.moments`, `_rounding.store`
// and `store_max` (and, for the step, `_math.direction` and the chain of
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
//
// `AmsgradBlockwiseMoments` and `AmsgradBlockwiseStep` do the same for 8-bit
// blockwise state (optax_amsgrad/_blockwise.py; the codes in blockwise.h):
// each of m, v, v_max is passed as its uint8 codes and int8 block exponents,
// and a block of 256 elements is stepped and stored in one go.

// Python.h first, as the Python C API asks.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
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
#include <vector>

#include "blockwise.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Everything the element loop calls is inlined into it, so that the copies of
// the loop compiled for AVX2 and AVX-512 (below) run that code throughout.
#define AMSGRAD_INLINE inline __attribute__((always_inline))

// Layout of the coefficient vector, shared with optax_amsgrad/cpu/_ffi.py.
enum Coefficient : int64_t {
#define COEFFICIENT(python_name, enumerator) enumerator,
#include "coefficients.def"
#undef COEFFICIENT
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

using optax_amsgrad::Bits;
using optax_amsgrad::FromBits;

template <typename T, typename C>
AMSGRAD_INLINE C Load(const T* data, int64_t i) {
  return static_cast<C>(data[i]);
}

template <>
AMSGRAD_INLINE float Load<BFloat16, float>(const BFloat16* data, int64_t i) {
  return FromBits(static_cast<uint32_t>(data[i]) << 16);
}

// The bfloat16 conversions below are branch-free integer arithmetic so that
// the loop vectorizes.

// NaN made quiet, in the top 16 bits, as XLA converts it.
AMSGRAD_INLINE uint32_t QuietNaNBits(uint32_t raw) { return raw | 0x00400000u; }

// float32 to bfloat16 as XLA converts: round to nearest even.
AMSGRAD_INLINE BFloat16 NearestBFloat16(float x) {
  const uint32_t raw = Bits(x);
  const uint32_t rounded = raw + 0x7FFFu + ((raw >> 16) & 1u);
  const uint32_t bits = x != x ? QuietNaNBits(raw) : rounded;
  return static_cast<BFloat16>(bits >> 16);
}

// _rounding._stochastic_bfloat16 and _nearest_nonzero_bfloat16 for |x| at
// most the largest finite bfloat16, or infinite, or NaN, as every moment is
// (gradients are saturated at sqrt(float32 max) / 2, so |m| <= 9.2e18 and
// v, v_max <= 8.5e37 < 3.4e38):
// adds `increment` (or the round-half-to-even increment) to the 16 dropped
// bits and truncates. A carry lands on the next bfloat16 up, never past the
// largest finite one, and infinities keep their bits; so the XLA path's
// saturation at the largest bfloat16 and its special case for infinities are
// no-ops here. Adding to the sign-magnitude bits rounds the magnitude, as the
// XLA path does.
template <bool kNearestEven, bool kKeepNonzero>
AMSGRAD_INLINE BFloat16 RoundBoundedBFloat16(float x, uint32_t increment) {
  const uint32_t raw = Bits(x);
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

// _math.saturate for real g: finite magnitudes above `limit` come down to
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
      // _math.update_from_stored from the stored moments, then the chain of
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

// A loop as a type, for OnBestIsa: Loop::Run(args...) is inlined into each
// copy compiled for an instruction set.
template <typename G, typename M, typename V, typename C, bool kStochastic, bool kApply,
          bool kDecay>
struct RowLoop {
  template <typename... Args>
  AMSGRAD_INLINE static void Run(const Args&... args) {
    RowImpl<G, M, V, C, kStochastic, kApply, kDecay>(args...);
  }
};

template <typename Loop, typename... Args>
void RunBaseline(const Args&... args) { Loop::Run(args...); }

#if defined(__x86_64__) && defined(__GNUC__)
// The package is built for baseline x86-64 (SSE2), where the loops are
// compute-bound (the bfloat16 rounding and the 8-bit codes most of all).
// Copies compiled for AVX2 and for AVX-512 (whose masked blends and
// 32-to-16-bit truncation halve the cost of the bfloat16 conversions) are
// chosen at run time.
template <typename Loop, typename... Args>
__attribute__((target("avx2"))) void RunAvx2(const Args&... args) { Loop::Run(args...); }

template <typename Loop, typename... Args>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void RunAvx512(
    const Args&... args) {
  Loop::Run(args...);
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

// Loop::Run(args...) in the copy for the best instruction set here.
template <typename Loop, typename... Args>
void OnBestIsa(const Args&... args) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (BestIsa()) {
    case Isa::kAvx512:
      RunAvx512<Loop>(args...);
      return;
    case Isa::kAvx2:
      RunAvx2<Loop>(args...);
      return;
    case Isa::kBaseline:
      break;
  }
#endif
  RunBaseline<Loop>(args...);
}

AMSGRAD_INLINE void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Longest the caller spins for the pool's last blocks before it sleeps.
constexpr int64_t kMaxWaitSpinNanos = 100'000;

// Waits with pause instructions until ready() or `nanos` have passed; says
// whether ready() became true.
template <typename Ready>
bool SpinUntil(const Ready& ready, int64_t nanos) {
  const int64_t start = NowNanos();
  for (int64_t spins = 1;; ++spins) {
    if (ready()) return true;
    CpuRelax();
    if (spins % 64 == 0 && NowNanos() - start > nanos) return ready();
  }
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
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body, int64_t grain = kBlock) {
  const int64_t blocks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  auto progress = std::make_shared<Progress>();
  auto work = [progress, blocks, n, body, grain]() {
    for (;;) {
      const int64_t block = progress->next.fetch_add(1);
      if (block >= blocks) return;
      body(block * grain, std::min(n, (block + 1) * grain));
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
  // What is left is at most one block per helper, tens of µs: spin for it
  // rather than sleep, since waking a sleeping thread took 20 to 60 µs here.
  const auto finished = [&] { return progress->done.load(std::memory_order_acquire) == blocks; };
  if (SpinUntil(finished, kMaxWaitSpinNanos)) return;
  std::unique_lock<std::mutex> lock(progress->mutex);
  progress->finished.wait(lock, finished);
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

// The buffers of one leaf, untyped: operands g, p (the params, or g again
// when the call does not apply the step), m, v, v_max; then the results.
struct UntypedLeaf {
  std::array<const void*, 5> in;
  std::array<ffi::DataType, 5> types;
  std::array<int64_t, 5> sizes;
  std::array<void*, 4> out;
};

template <typename G, typename M, typename V>
Leaf<G, M, V> Typed(const UntypedLeaf& leaf, bool apply) {
  return Leaf<G, M, V>{
      static_cast<const G*>(leaf.in[0]),
      apply ? static_cast<const G*>(leaf.in[1]) : nullptr,
      static_cast<const M*>(leaf.in[2]),
      static_cast<const V*>(leaf.in[3]),
      static_cast<const V*>(leaf.in[4]),
      static_cast<G*>(leaf.out[0]),
      static_cast<M*>(leaf.out[1]),
      static_cast<V*>(leaf.out[2]),
      static_cast<V*>(leaf.out[3]),
  };
}

// Where the state of each leaf lives when it is one flat buffer per call
// (`flatten_by_dtype`): leaf i's elements of row r start at
// r * row_length + starts[i], and the random bits take that flat position.
struct FlatLayout {
  int64_t row_length;
  std::vector<int64_t> starts;
};

// Cuts [0, offsets.back()) into tasks on the thread pool and each task at
// the leaves and the batch rows it spans (leaf i holds units [offsets[i],
// offsets[i + 1]), `rows` rows of equal size): piece(leaf, row, lo, hi) for
// units [lo, hi) of one row of one leaf, counted from the leaf's start.
template <typename Piece>
void ForEachPiece(ffi::ThreadPool& pool, const std::vector<int64_t>& offsets, int64_t rows,
                  int64_t grain, const Piece& piece) {
  ParallelFor(
      pool, offsets.back(),
      [&](int64_t lo, int64_t hi) {
        int64_t leaf =
            std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
        while (lo < hi) {
          const int64_t leaf_begin = offsets[leaf];
          const int64_t row_size = (offsets[leaf + 1] - leaf_begin) / rows;
          const int64_t leaf_end = std::min(hi, offsets[leaf + 1]);
          while (lo < leaf_end) {
            const int64_t local = lo - leaf_begin;
            const int64_t row = local / row_size;
            const int64_t end = std::min(leaf_end - leaf_begin, (row + 1) * row_size);
            piece(leaf, row, local, end);
            lo = leaf_begin + end;
          }
          ++leaf;
        }
      },
      grain);
}

// Runs all leaves of one call on the thread pool (ForEachPiece): blocks of
// elements are cut across leaves (many small leaves share a block, a large
// one spans many), and within a leaf at its rows (each row has its own
// coefficients and keys).
// `keys` holds [row][leaf][m, v], or [row][m, v] with a flat state.
template <typename G, typename M, typename V, typename C, bool kApply>
void RunLeaves(ffi::ThreadPool& pool, const C* k, const uint32_t* keys,
               const std::vector<Leaf<G, M, V>>& leaves, const std::vector<int64_t>& offsets,
               int64_t rows, bool stochastic, ffi::Span<const int64_t> decay,
               const FlatLayout* flat) {
  const int64_t num_leaves = static_cast<int64_t>(leaves.size());
  ForEachPiece(pool, offsets, rows, kBlock, [&](int64_t leaf, int64_t row, int64_t local,
                                                 int64_t end) {
    int64_t row_begin = row * ((offsets[leaf + 1] - offsets[leaf]) / rows);
    const C* row_k = k + row * kNumCoefficients;
    Leaf<G, M, V> buffers = leaves[leaf];
    const uint32_t* row_keys;
    if (flat != nullptr) {
      // State element of local index j in this row: row * row_length +
      // start + (j - row_begin), never before the buffer's start.
      const int64_t start = flat->starts[leaf];
      const int64_t shift = row * flat->row_length + start - row_begin;
      buffers.m += shift;
      buffers.v += shift;
      buffers.v_max += shift;
      buffers.m_out += shift;
      buffers.v_out += shift;
      buffers.v_max_out += shift;
      row_begin -= start;  // the random bits follow the flat position
      row_keys = keys + 2 * row;
    } else {
      row_keys = keys + 2 * (row * num_leaves + leaf);
    }
    const bool decays = kApply && decay[leaf] != 0;
#define AMSGRAD_ROW(STOCHASTIC, DECAY)                                                \
  OnBestIsa<RowLoop<G, M, V, C, STOCHASTIC, kApply, DECAY>>(row_k, row_keys, buffers, \
                                                            row_begin, local, end)
    if (stochastic) {
      decays ? AMSGRAD_ROW(true, true) : AMSGRAD_ROW(true, false);
    } else {
      decays ? AMSGRAD_ROW(false, true) : AMSGRAD_ROW(false, false);
    }
#undef AMSGRAD_ROW
  });
}

// All handlers: `apply` says whether the params are among the buffers,
// `flat` whether the state is one flat buffer per call (after the leaves'
// g and p) rather than three buffers per leaf.
ffi::Error Run(const char* name, bool apply, bool flat, ffi::ThreadPool& pool,
               const ffi::AnyBuffer& coefficients, const ffi::AnyBuffer& keys,
               const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
               bool stochastic, ffi::Span<const int64_t> decay) {
  using DT = ffi::DataType;
  auto fail = [name](const char* what) {
    return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
  };
  const int64_t num_leaves = static_cast<int64_t>(decay.size());
  // Operands and results of each leaf, and those of the call's flat state.
  const int64_t per_leaf_args = flat ? 2 : (apply ? 5 : 4);
  const int64_t per_leaf_rets = flat ? 1 : (apply ? 4 : 3);
  const int64_t shared = flat ? 3 : 0;
  if (num_leaves == 0 ||
      static_cast<int64_t>(args.size()) != per_leaf_args * num_leaves + shared ||
      static_cast<int64_t>(rets.size()) != per_leaf_rets * num_leaves + shared) {
    return fail("the buffers do not match the number of leaves");
  }
  const int64_t rows = coefficients.element_count() / kNumCoefficients;
  const int64_t key_sets = flat ? 1 : num_leaves;
  if (rows == 0 || rows * kNumCoefficients != coefficients.element_count() ||
      keys.element_type() != DT::U32 || keys.element_count() != 2 * rows * key_sets) {
    return fail("inconsistent coefficients or keys");
  }
  // The flat state, when there is one: m, v, v_max after every leaf's g, p.
  std::array<const void*, 3> flat_in{};
  std::array<void*, 3> flat_out{};
  std::array<DT, 3> flat_types{};
  int64_t flat_size = 0;
  for (int64_t j = 0; j < shared; ++j) {
    auto in = args.get<ffi::AnyBuffer>(per_leaf_args * num_leaves + j);
    auto out = rets.get<ffi::AnyBuffer>(per_leaf_rets * num_leaves + j);
    if (!in || !out) return fail("an operand or result is not a buffer");
    flat_in[j] = in->untyped_data();
    flat_out[j] = (*out)->untyped_data();
    flat_types[j] = in->element_type();
    if (j > 0 && static_cast<int64_t>(in->element_count()) != flat_size) {
      return fail("the flat state buffers differ in size");
    }
    flat_size = static_cast<int64_t>(in->element_count());
  }
  std::vector<UntypedLeaf> leaves;
  std::vector<int64_t> offsets{0};
  FlatLayout layout{0, {}};
  for (int64_t i = 0; i < num_leaves; ++i) {
    UntypedLeaf leaf{};
    // Operand j of the leaf: g, p, m, v, v_max; without p, g stands in; with
    // a flat state, m, v and v_max are the call's.
    const int64_t first_arg = per_leaf_args * i, first_ret = per_leaf_rets * i;
    for (int64_t j = 0; j < 5; ++j) {
      if (flat && j >= 2) {
        leaf.in[j] = flat_in[j - 2];
        leaf.types[j] = flat_types[j - 2];
        leaf.sizes[j] = -1;  // checked against the sum below
        continue;
      }
      const int64_t index = apply ? j : (j == 0 ? 0 : j - 1);
      auto buffer = args.get<ffi::AnyBuffer>(first_arg + index);
      if (!buffer) return fail("an operand is not a buffer");
      leaf.in[j] = buffer->untyped_data();
      leaf.types[j] = buffer->element_type();
      leaf.sizes[j] = static_cast<int64_t>(buffer->element_count());
    }
    // Results: p, m, v, v_max; without p, none; with a flat state, the call's.
    for (int64_t j = apply ? 0 : 1; j < 4; ++j) {
      if (flat && j >= 1) {
        leaf.out[j] = flat_out[j - 1];
        continue;
      }
      auto buffer = rets.get<ffi::AnyBuffer>(first_ret + j - (apply ? 0 : 1));
      if (!buffer) return fail("a result is not a buffer");
      leaf.out[j] = (*buffer)->untyped_data();
    }
    const int64_t n = leaf.sizes[0];
    for (int64_t size : leaf.sizes) {
      if ((size != n && size != -1) || n % rows != 0) {
        return fail("the buffers of a leaf differ in size");
      }
    }
    const UntypedLeaf& first = leaves.empty() ? leaf : leaves.front();
    if (leaf.types != first.types || leaf.types[1] != leaf.types[0] ||
        leaf.types[4] != leaf.types[3]) {
      return fail("the leaves of a call differ in dtype");
    }
    layout.starts.push_back(layout.row_length);
    layout.row_length += n / rows;
    leaves.push_back(leaf);
    offsets.push_back(offsets.back() + n);
  }
  if (flat && flat_size != offsets.back()) {
    return fail("the flat state does not hold the leaves");
  }
  const FlatLayout* flat_layout = flat ? &layout : nullptr;
  const DT c = coefficients.element_type();
  const DT gt = leaves[0].types[0], mt = leaves[0].types[2], vt = leaves[0].types[3];
#define AMSGRAD_CASE(CT, GT, MT, VT, C, G, M, V)                                      \
  if (c == DT::CT && gt == DT::GT && mt == DT::MT && vt == DT::VT) {                  \
    /* Params are updated in their own dtype, which must be the compute dtype. */    \
    if (apply && !std::is_same<G, C>::value) return fail("params not in the compute dtype"); \
    std::vector<Leaf<G, M, V>> typed;                                                 \
    typed.reserve(leaves.size());                                                     \
    for (const UntypedLeaf& leaf : leaves) typed.push_back(Typed<G, M, V>(leaf, apply)); \
    const C* k = reinterpret_cast<const C*>(coefficients.untyped_data());             \
    const uint32_t* key = reinterpret_cast<const uint32_t*>(keys.untyped_data());     \
    if (apply) {                                                                      \
      RunLeaves<G, M, V, C, true>(pool, k, key, typed, offsets, rows, stochastic, decay, \
                                  flat_layout);                                       \
    } else {                                                                          \
      RunLeaves<G, M, V, C, false>(pool, k, key, typed, offsets, rows, stochastic, decay, \
                                   flat_layout);                                      \
    }                                                                                 \
    return ffi::Error::Success();                                                     \
  }
  AMSGRAD_FOR_EACH_DTYPES(AMSGRAD_CASE)
#undef AMSGRAD_CASE
  return fail("unsupported dtypes");
}

ffi::Error MomentsHandler(ffi::ThreadPool pool, ffi::AnyBuffer coefficients,
                          ffi::AnyBuffer keys, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, bool stochastic,
                          ffi::Span<const int64_t> decay) {
  return Run("amsgrad_moments", false, false, pool, coefficients, keys, args, rets,
             stochastic, decay);
}

ffi::Error StepHandler(ffi::ThreadPool pool, ffi::AnyBuffer coefficients,
                       ffi::AnyBuffer keys, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       bool stochastic, ffi::Span<const int64_t> decay) {
  return Run("amsgrad_step", true, false, pool, coefficients, keys, args, rets, stochastic,
             decay);
}

ffi::Error FlatStepHandler(ffi::ThreadPool pool, ffi::AnyBuffer coefficients,
                           ffi::AnyBuffer keys, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, bool stochastic,
                           ffi::Span<const int64_t> decay) {
  return Run("amsgrad_flat_step", true, true, pool, coefficients, keys, args, rets,
             stochastic, decay);
}

// ---------------------------------------------------------------------------
// 8-bit blockwise state (optax_amsgrad/_blockwise.py): m, v and v_max each as
// uint8 codes and one int8 scale exponent per block of 256 elements along the
// last axis. A block is read, stepped and stored in one go: the new m and v
// of its elements are kept in registers and a small buffer while their
// block's fresh scales are found, then rounded to codes (and the params
// moved) in a second loop over the same cache lines.

using optax_amsgrad::Decode;
using optax_amsgrad::Encode;
using optax_amsgrad::kCodeBlock;
using optax_amsgrad::kMaxExponent;
using optax_amsgrad::kMinExponent;
using optax_amsgrad::MuCode;
using optax_amsgrad::Needed;
using optax_amsgrad::NuCode;
using optax_amsgrad::RescaledUp;
using optax_amsgrad::Rounding;

// The buffers of one leaf: codes and exponents of m, v and v_max (in that
// order), and its shape's last axis, along which the blocks run.
struct BlockwiseLeaf {
  const float* g;
  const float* p;
  std::array<const uint8_t*, 3> codes;
  std::array<const int8_t*, 3> exponents;
  float* written;  // the update or the params after the step; null for the state alone
  std::array<uint8_t*, 3> codes_out;
  std::array<int8_t*, 3> exponents_out;
  int64_t row_length;
  int64_t blocks_per_row;
  int64_t batch_size;  // elements per batch row (vmap), each with its coefficients
};

// What a blockwise call writes besides the state: nothing more, the update
// (over g, which it reads first, block by block), or the params after the
// step.
enum class Writes { kState, kUpdate, kParams };

// One block: `begin` its first element, `length` its elements, `block` its
// exponents' index, `index` the first element's position in its batch row
// (for the random bits).
template <bool kStochastic, Writes kWrites, bool kDecay>
AMSGRAD_INLINE void BlockImpl(const float* k, const uint32_t* keys, const BlockwiseLeaf& leaf,
                              int64_t begin, int64_t length, int64_t block, uint32_t index) {
  const float b1 = k[kB1], b2 = k[kB2];
  const float one_minus_b1 = k[kOneMinusB1], one_minus_b2 = k[kOneMinusB2];
  const float scale = k[kNuMaxScale];
  const float eps = k[kEps], eps_root = k[kEpsRoot];
  const float numerator = k[kNumerator], denominator = k[kDenominator];
  const float step_size = k[kStepSize], weight_decay = k[kWeightDecay];
  const uint32_t mu_key = keys[0], nu_key = keys[1];
  const float limit = static_cast<float>(std::sqrt(static_cast<double>(std::numeric_limits<float>::max())) / 2);
  constexpr Rounding kMode = kStochastic ? Rounding::kStochastic : Rounding::kNearest;

  const uint8_t* __restrict m_codes = leaf.codes[0] + begin;
  const uint8_t* __restrict v_codes = leaf.codes[1] + begin;
  // Read element by element before it is written over (in place).
  const uint8_t* x_codes = leaf.codes[2] + begin;
  const int32_t m_scale = leaf.exponents[0][block], v_scale = leaf.exponents[1][block];
  const int32_t x_scale = leaf.exponents[2][block];
  // Not restricted: the update may be written over g (after this block's
  // first loop has read it).
  const float* g = leaf.g + begin;

  // The new moments and the scales they need (_math.moments, then
  // _blockwise.fresh_exponents_of).
  alignas(64) float new_m[kCodeBlock];
  alignas(64) float new_v[kCodeBlock];
  int32_t m_needed = kMinExponent, v_needed = kMinExponent;
  for (int64_t i = 0; i < length; ++i) {
    const float grad = Saturate(g[i], limit);
    const float m = b1 * Decode<MuCode>(m_codes[i], m_scale) + one_minus_b1 * grad;
    const float v = b2 * Decode<NuCode>(v_codes[i], v_scale) + one_minus_b2 * (grad * grad);
    new_m[i] = m;
    new_v[i] = v;
    const int32_t mn = Needed<MuCode>(m), vn = Needed<NuCode>(v);
    m_needed = m_needed > mn ? m_needed : mn;
    v_needed = v_needed > vn ? v_needed : vn;
  }
  // nu_max's scale never decreases and holds v * scale (_blockwise.scaled_exponents).
  const int32_t headroom = Needed<NuCode>(scale * NuCode::TopValue());
  int32_t x_needed = v_needed + (headroom > 0 ? headroom : 0);
  x_needed = x_needed < kMaxExponent ? x_needed : kMaxExponent;
  const int32_t new_x_scale = x_scale > x_needed ? x_scale : x_needed;
  const int32_t rescale = new_x_scale - x_scale;

  uint8_t* __restrict m_out = leaf.codes_out[0] + begin;
  uint8_t* __restrict v_out = leaf.codes_out[1] + begin;
  uint8_t* x_out = leaf.codes_out[2] + begin;
  constexpr bool kParams = kWrites == Writes::kParams;
  const float* __restrict p = kParams ? leaf.p + begin : nullptr;
  float* written = kWrites != Writes::kState ? leaf.written + begin : nullptr;
#pragma GCC ivdep
  for (int64_t i = 0; i < length; ++i) {
    const uint32_t position = index + static_cast<uint32_t>(i);
    const int32_t m = Encode<MuCode, kMode>(new_m[i], m_needed,
                                            (position ^ mu_key) * kMuMultiplier);
    const int32_t v = Encode<NuCode, kMode>(new_v[i], v_needed,
                                            (position ^ nu_key) * kNuMultiplier);
    // _blockwise.store_max: the rounded maximum is the larger of the new
    // value rounded and the old code rounded up to the new scale.
    const int32_t rounded = Encode<NuCode, Rounding::kNearestNonzero>(new_v[i] * scale,
                                                                      new_x_scale, 0);
    const int32_t kept = RescaledUp<NuCode>(x_codes[i], rescale);
    const int32_t x = rounded > kept ? rounded : kept;
    if (kWrites != Writes::kState) {
      const float m_u = Decode<MuCode>(m, m_needed), x_u = Decode<NuCode>(x, new_x_scale);
      float update = m_u * numerator / (std::sqrt(x_u * denominator + eps_root) + eps);
      if (kParams) {
        const float param = p[i];
        if (kDecay) update = update + weight_decay * param;
        written[i] = param + step_size * update;
      } else {
        written[i] = update;
      }
    }
    m_out[i] = static_cast<uint8_t>(m);
    v_out[i] = static_cast<uint8_t>(v);
    x_out[i] = static_cast<uint8_t>(x);
  }
  leaf.exponents_out[0][block] = static_cast<int8_t>(m_needed);
  leaf.exponents_out[1][block] = static_cast<int8_t>(v_needed);
  leaf.exponents_out[2][block] = static_cast<int8_t>(new_x_scale);
}

// Blocks [first, last) of one leaf, all in one batch row.
template <bool kStochastic, Writes kWrites, bool kDecay>
struct BlockLoop {
  AMSGRAD_INLINE static void Run(const float* const& k, const uint32_t* const& keys,
                                 const BlockwiseLeaf& leaf, const int64_t& first,
                                 const int64_t& last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t row = block / leaf.blocks_per_row;
      const int64_t within = (block - row * leaf.blocks_per_row) * kCodeBlock;
      const int64_t begin = row * leaf.row_length + within;
      const int64_t length = std::min<int64_t>(kCodeBlock, leaf.row_length - within);
      const uint32_t index = static_cast<uint32_t>(begin % leaf.batch_size);
      BlockImpl<kStochastic, kWrites, kDecay>(k, keys, leaf, begin, length, block, index);
    }
  }
};

// Blocks per task: as many elements as kBlock.
constexpr int64_t kBlocksPerTask = kBlock / kCodeBlock;

// The blockwise handlers: per leaf g, [p,] then codes and exponents of m, v,
// v_max; results [the update or p,] then the new codes and exponents. Blocks
// are cut across leaves, as elements are in RunLeaves, and never across
// batch rows.
ffi::Error RunBlockwise(const char* name, Writes writes, ffi::ThreadPool& pool,
                        const ffi::AnyBuffer& coefficients, const ffi::AnyBuffer& keys,
                        const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                        bool stochastic, ffi::Span<const int64_t> decay) {
  using DT = ffi::DataType;
  auto fail = [name](const char* what) {
    return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
  };
  const int64_t num_leaves = static_cast<int64_t>(decay.size());
  const bool apply = writes == Writes::kParams;
  // The first result of a leaf that is state (after the update or p).
  const int64_t first_state_ret = writes == Writes::kState ? 0 : 1;
  const int64_t per_leaf_args = apply ? 8 : 7, per_leaf_rets = 6 + first_state_ret;
  if (num_leaves == 0 || static_cast<int64_t>(args.size()) != per_leaf_args * num_leaves ||
      static_cast<int64_t>(rets.size()) != per_leaf_rets * num_leaves) {
    return fail("the buffers do not match the number of leaves");
  }
  const int64_t rows = coefficients.element_count() / kNumCoefficients;
  if (coefficients.element_type() != DT::F32 || rows == 0 ||
      rows * kNumCoefficients != coefficients.element_count() ||
      keys.element_type() != DT::U32 || keys.element_count() != 2 * rows * num_leaves) {
    return fail("inconsistent coefficients or keys");
  }
  std::vector<BlockwiseLeaf> leaves;
  std::vector<int64_t> offsets{0};  // in blocks
  for (int64_t i = 0; i < num_leaves; ++i) {
    std::vector<ffi::AnyBuffer> in;
    const int64_t first_arg = per_leaf_args * i, first_ret = per_leaf_rets * i;
    for (int64_t j = 0; j < per_leaf_args; ++j) {
      auto buffer = args.get<ffi::AnyBuffer>(first_arg + j);
      if (!buffer) return fail("an operand is not a buffer");
      in.push_back(*buffer);
    }
    std::array<void*, 7> out{};
    for (int64_t j = 0; j < per_leaf_rets; ++j) {
      auto buffer = rets.get<ffi::AnyBuffer>(first_ret + j);
      if (!buffer) return fail("a result is not a buffer");
      out[j] = (*buffer)->untyped_data();
    }
    const ffi::AnyBuffer& g = in[0];
    const int64_t state = apply ? 2 : 1;  // the first state operand
    const auto dims = g.dimensions();
    const int64_t n = dims.size() == 0 ? 0 : dims[dims.size() - 1];
    const int64_t size = static_cast<int64_t>(g.element_count());
    if (g.element_type() != DT::F32 || n == 0 || size % rows != 0 ||
        (size / rows) % n != 0 || (apply && (in[1].element_type() != DT::F32 ||
                                             in[1].element_count() != g.element_count()))) {
      return fail("g (and p) must be float32 arrays of one shape");
    }
    const int64_t blocks_per_row = (n + kCodeBlock - 1) / kCodeBlock;
    const int64_t blocks = size / n * blocks_per_row;
    BlockwiseLeaf leaf{};
    leaf.g = static_cast<const float*>(g.untyped_data());
    leaf.p = apply ? static_cast<const float*>(in[1].untyped_data()) : nullptr;
    leaf.written = writes != Writes::kState ? static_cast<float*>(out[0]) : nullptr;
    for (int64_t b = 0; b < 3; ++b) {
      const ffi::AnyBuffer& codes = in[state + 2 * b];
      const ffi::AnyBuffer& exponents = in[state + 2 * b + 1];
      if (codes.element_type() != DT::U8 || codes.element_count() != g.element_count() ||
          exponents.element_type() != DT::S8 ||
          static_cast<int64_t>(exponents.element_count()) != blocks) {
        return fail("the codes and exponents do not match g");
      }
      leaf.codes[b] = static_cast<const uint8_t*>(codes.untyped_data());
      leaf.exponents[b] = static_cast<const int8_t*>(exponents.untyped_data());
      leaf.codes_out[b] = static_cast<uint8_t*>(out[first_state_ret + 2 * b]);
      leaf.exponents_out[b] = static_cast<int8_t*>(out[first_state_ret + 2 * b + 1]);
    }
    leaf.row_length = n;
    leaf.blocks_per_row = blocks_per_row;
    leaf.batch_size = size / rows;
    leaves.push_back(leaf);
    offsets.push_back(offsets.back() + blocks);
  }
  const float* k = reinterpret_cast<const float*>(coefficients.untyped_data());
  const uint32_t* key = reinterpret_cast<const uint32_t*>(keys.untyped_data());
  ForEachPiece(pool, offsets, rows, kBlocksPerTask, [&](int64_t leaf, int64_t row,
                                                         int64_t local, int64_t end) {
    const float* row_k = k + row * kNumCoefficients;
    const uint32_t* row_keys = key + 2 * (row * num_leaves + leaf);
    const BlockwiseLeaf& buffers = leaves[leaf];
    const bool decays = apply && decay[leaf] != 0;
#define AMSGRAD_BLOCKS(STOCHASTIC, WRITES, DECAY) \
  OnBestIsa<BlockLoop<STOCHASTIC, Writes::WRITES, DECAY>>(row_k, row_keys, buffers, local, end)
    if (writes == Writes::kState) {
      stochastic ? AMSGRAD_BLOCKS(true, kState, false) : AMSGRAD_BLOCKS(false, kState, false);
    } else if (writes == Writes::kUpdate) {
      stochastic ? AMSGRAD_BLOCKS(true, kUpdate, false) : AMSGRAD_BLOCKS(false, kUpdate, false);
    } else if (stochastic) {
      decays ? AMSGRAD_BLOCKS(true, kParams, true) : AMSGRAD_BLOCKS(true, kParams, false);
    } else {
      decays ? AMSGRAD_BLOCKS(false, kParams, true) : AMSGRAD_BLOCKS(false, kParams, false);
    }
#undef AMSGRAD_BLOCKS
  });
  return ffi::Error::Success();
}

// The blockwise handlers, by what they write besides the state.
constexpr const char* BlockwiseName(Writes writes) {
  return writes == Writes::kState    ? "amsgrad_blockwise_moments"
         : writes == Writes::kUpdate ? "amsgrad_blockwise_update"
                                     : "amsgrad_blockwise_step";
}

template <Writes kWrites>
ffi::Error BlockwiseHandler(ffi::ThreadPool pool, ffi::AnyBuffer coefficients,
                            ffi::AnyBuffer keys, ffi::RemainingArgs args, ffi::RemainingRets rets,
                            bool stochastic, ffi::Span<const int64_t> decay) {
  return RunBlockwise(BlockwiseName(kWrites), kWrites, pool, coefficients, keys, args, rets,
                      stochastic, decay);
}

// The binding all handlers share: coefficients, keys, then the buffers;
// attribute `stochastic`, and `decay`, one entry per leaf (1 to add the
// weight decay; unused by AmsgradMoments, whose entries only count leaves).
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // coefficients
      .Arg<ffi::AnyBuffer>()  // keys
      .RemainingArgs()
      .RemainingRets()
      .Attr<bool>("stochastic")
      .Attr<ffi::Span<const int64_t>>("decay");
}

}  // namespace

// Buffers: per leaf g, m, v, v_max; results per leaf m, v, v_max.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradMoments, MomentsHandler, Binding());

// Buffers: per leaf g, p, m, v, v_max; results per leaf p, m, v, v_max.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradStep, StepHandler, Binding());

// Buffers: per leaf g, then the codes and exponents of m, v, v_max (uint8,
// int8); results per leaf the new codes and exponents.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradBlockwiseMoments, BlockwiseHandler<Writes::kState>,
                              Binding());

// Buffers: per leaf g, then the codes and exponents of m, v, v_max; results
// per leaf the update (written over g where XLA aliases them), then the new
// codes and exponents.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradBlockwiseUpdate, BlockwiseHandler<Writes::kUpdate>,
                              Binding());

// Buffers: per leaf g, p, then the codes and exponents of m, v, v_max;
// results per leaf p, then the new codes and exponents.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradBlockwiseStep, BlockwiseHandler<Writes::kParams>,
                              Binding());

// Buffers: per leaf g, p, then the flat m, v, v_max holding every leaf in
// order (keys: [..., m and v]); results per leaf p, then the flat m, v, v_max.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradFlatStep, FlatStepHandler, Binding());

// The Python module: `handlers()` gives the handlers as capsules for
// jax.ffi.register_ffi_target.
namespace {

PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* handlers = PyDict_New();
  if (handlers == nullptr) return nullptr;
  const std::pair<const char*, void*> entries[] = {
      {"moments", reinterpret_cast<void*>(&AmsgradMoments)},
      {"step", reinterpret_cast<void*>(&AmsgradStep)},
      {"flat_step", reinterpret_cast<void*>(&AmsgradFlatStep)},
      {"blockwise_moments", reinterpret_cast<void*>(&AmsgradBlockwiseMoments)},
      {"blockwise_update", reinterpret_cast<void*>(&AmsgradBlockwiseUpdate)},
      {"blockwise_step", reinterpret_cast<void*>(&AmsgradBlockwiseStep)},
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
