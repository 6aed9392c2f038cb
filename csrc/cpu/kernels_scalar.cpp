// Portable scalar kernels: the fallback on any CPU, and the reference path the vector ones are
// tested against. Same algorithms (kernels_impl.h) with a "vector" of one float.
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace xk {
namespace {

#include "common.h"

struct I {
  using V = float;
  static constexpr int W = 1;
  static constexpr int NV = 32;
  static constexpr int kMaxAcc = 8;
  static constexpr int kMaxAccIg = 32;
  static constexpr int kGroupFwd = 4;
  static constexpr int kGroupIg = 1;
  struct Tab {
    float t[16];
  };

  static inline Tab make_tab(float s) {
    Tab tab;
    for (int i = 0; i < 16; ++i) tab.t[i] = kNF4Code[i] * s;
    return tab;
  }
  static inline void decode32(const uint8_t* p, const Tab& tab, V* w) {
    for (int i = 0; i < 16; ++i) {
      w[i] = tab.t[p[i] >> 4];
      w[16 + i] = tab.t[p[i] & 15];
    }
  }
  static inline void keep(V&) {}
  static inline V zero() { return 0.f; }
  static inline V set1(float f) { return f; }
  static inline V load(const float* p) { return *p; }
  static inline void store(float* p, V v) { *p = v; }
  static inline V add(V a, V b) { return a + b; }
  static inline V fmadd(V a, V b, V c) { return a * b + c; }
  static inline float hsum(V v) { return v; }
  static inline V hsum_many(const V* v) { return v[0]; }
  static inline void prefetch(const void*) {}
  static inline V load_cvt(const void* base, int dt, int64_t i) { return load1(base, dt, i); }
  static inline V load_cvt_part(const void* base, int dt, int64_t i, int count) {
    return count > 0 ? load1(base, dt, i) : 0.f;
  }
  static inline void store_cvt(void* base, int dt, int64_t i, V v) { store1(base, dt, i, v); }
  static inline void store_bf16_split(uint16_t* hi, uint16_t* lo, V v) {
    *hi = f32_to_bf16(v);
    *lo = f32_to_bf16(v - bf16_to_f32(*hi));
  }
  static constexpr bool kHasBf16Tables = false;
  struct Bf16Tab {};
  static inline Bf16Tab make_bf16_tab(float) { return {}; }
  static inline void decode64_bf16(const uint8_t*, const Bf16Tab&, uint16_t*, uint16_t*) {}
  static inline void decode64_bf16_nat(const uint8_t*, const Bf16Tab&, uint16_t*) {}
  static inline void load_perm32(const void* base, int dt, int64_t i, V* w) {
    for (int j = 0; j < 16; ++j) {
      w[j] = load1(base, dt, i + 2 * j);
      w[16 + j] = load1(base, dt, i + 2 * j + 1);
    }
  }
  static inline void store_nat32(void* base, int dt, int64_t i, const V* w) {
    for (int j = 0; j < 16; ++j) {
      store1(base, dt, i + 2 * j, w[j]);
      store1(base, dt, i + 2 * j + 1, w[16 + j]);
    }
  }
};

#define XK_ISA_NAME "scalar"
#include "kernels_impl.h"
#undef XK_ISA_NAME

}  // namespace

const KernelTable* kernels_scalar() { return &kTable; }

}  // namespace xk
