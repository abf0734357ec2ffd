#pragma once
// A region of functions compiled for one x86 instruction set inside a file built without -march
// (the library's kernels carry one copy per ISA and pick one at run time from cpuid):
//   LB_TARGET_BEGIN("avx2,fma") ... LB_TARGET_END()
// GCC's target pragmas, or clang's attribute pragma (clang ignores `#pragma GCC target`; the fuzz
// build uses clang).
#define LB_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define LB_TARGET_BEGIN(t) LB_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define LB_TARGET_END() LB_PRAGMA(clang attribute pop)
#else
#define LB_TARGET_BEGIN(t) LB_PRAGMA(GCC push_options) LB_PRAGMA(GCC target(t))
#define LB_TARGET_END() LB_PRAGMA(GCC pop_options)
#endif
