// CPU features that not every compiler's __builtin_cpu_supports knows (clang 14 rejects "f16c"
// and "avxvnni"), read from cpuid directly. x86-64 only; false elsewhere.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace lowbit::cpu {

// F16C (vcvtph2ps / vcvtps2ph): cpuid leaf 1, ECX bit 29. The caller also checks AVX, whose
// __builtin_cpu_supports test includes the operating system's support for the YMM state.
inline bool has_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1u);
#else
  return false;
#endif
}

// AVX-VNNI (VEX-encoded vpdpbusd): cpuid leaf 7 sub-leaf 1, EAX bit 4.
inline bool has_avxvnni() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1u);
#else
  return false;
#endif
}

}  // namespace lowbit::cpu
